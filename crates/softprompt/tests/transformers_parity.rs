//! Tiny random models saved by transformers (`fixtures/transformers/`, written by
//! `scripts/fixtures/make_transformers_fixtures.py`; versions in `VERSIONS.json`) load through
//! softprompt's normal loader and give transformers' logits at every position, on the composed
//! and on the fused implementation, which also agree with each other: Qwen3 with an untied and a
//! tied head (per-head q/k norms, head_dim 32 with hidden 64 and 4 heads), Qwen2 with its q/k/v
//! biases, and Llama with `llama3` and `linear` rotary scaling. A cached forward in two chunks
//! (generation) gives the same logits, and so does Qwen3 written as a GGUF file (llama.cpp's
//! names, no q/k row permutation, `qwen3.attention.key_length`).

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::llama::{self, LlamaWeights};
use softprompt::backbone::{lm_logits, BackboneInput, CausalLm, KernelPath, KvCache, LoadedModel, WeightStorage};
use softprompt::gguf::GgufFile;
use softprompt::model_source::ModelLocation;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Logits may differ from transformers' by this much (max abs), f32 on both sides.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/transformers")
        .join(name)
}

/// The token ids the fixture ran and transformers' logits `[T, vocab]` for them.
fn expected(dir: &Path) -> (Vec<u32>, Tensor) {
    let input: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input.json")).unwrap()).unwrap();
    let ids = input["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let logits = candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu).unwrap();
    (ids, logits["logits"].clone())
}

fn load(dir: &Path, path: KernelPath) -> LoadedModel {
    let model = softprompt::backbone::load_with(&ModelLocation::HfDir(dir.to_path_buf()), &Device::Cpu, path)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    assert_eq!(model.backbone.kernel_path(), path);
    model
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Logits `[T, vocab]` of every position of `ids` (one row), in one forward.
fn logits(model: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let embeds = model.embed(&ids).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu).unwrap();
    let hidden = model.forward(&BackboneInput::new(&embeds, &mask)).unwrap();
    lm_logits(model, &hidden.squeeze(0).unwrap()).unwrap()
}

/// The same logits from a cached forward in two chunks (`split` positions, then the rest).
fn cached_logits(model: &dyn CausalLm, ids: &[u32], split: usize) -> Tensor {
    let mut cache = KvCache::default();
    let mut rows = Vec::new();
    for part in [&ids[..split], &ids[split..]] {
        let ids = Tensor::new(part, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let embeds = model.embed(&ids).unwrap();
        let mask = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu).unwrap();
        let hidden = model
            .forward_cached(&BackboneInput::new(&embeds, &mask), &mut cache)
            .unwrap();
        rows.push(lm_logits(model, &hidden.squeeze(0).unwrap()).unwrap());
    }
    Tensor::cat(&rows, 0).unwrap()
}

/// Loads fixture `name` on both implementations and checks the logits against transformers'
/// and against each other; returns (composed, fused) max abs differences from transformers.
fn check(name: &str) -> (f32, f32) {
    let dir = fixture(name);
    let (ids, want) = expected(&dir);
    let composed = load(&dir, KernelPath::Composed);
    let fused = load(&dir, KernelPath::Fused);
    let (c, f) = (
        composed.backbone.require_causal("parity").unwrap(),
        fused.backbone.require_causal("parity").unwrap(),
    );
    let (lc, lf) = (logits(c, &ids), logits(f, &ids));
    let (dc, df, dcf) = (max_abs(&lc, &want), max_abs(&lf, &want), max_abs(&lc, &lf));
    let (cc, cf) = (cached_logits(c, &ids, 7), cached_logits(f, &ids, 7));
    let (dcc, dcf_cached) = (max_abs(&cc, &want), max_abs(&cf, &want));
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    println!(
        "{name}: max |logit| {scale:.2}; max abs diff vs transformers: composed {dc:.2e}, fused {df:.2e}; \
         fused vs composed {dcf:.2e}; cached (7 + 5): composed {dcc:.2e}, fused {dcf_cached:.2e}"
    );
    for (what, d) in [
        ("composed", dc),
        ("fused", df),
        ("fused vs composed", dcf),
        ("cached composed", dcc),
        ("cached fused", dcf_cached),
    ] {
        assert!(d <= TOLERANCE, "{name}: {what} differs from transformers by {d}");
    }
    (dc, df)
}

#[test]
fn qwen3_untied_matches_transformers() {
    check("qwen3");
    let model = load(&fixture("qwen3"), KernelPath::Fused);
    let info = model.backbone.info();
    assert_eq!(info.model_type, "qwen3");
    assert!(info.qk_norm);
    assert_eq!(
        (info.hidden, info.heads, info.kv_heads, info.head_dim()),
        (64, 4, 2, 32)
    );
    assert_eq!((info.q_dim(), info.kv_dim()), (128, 64));
    let c = model.backbone.require_causal("parity").unwrap();
    let (head, embed) = (c.lm_head(), c.embedding_table());
    assert!(max_abs(head, embed) > 0.1, "untied: the head is its own matrix");
    // Parameters: embed + head, per layer 2 norms, q/k/v/o, q/k norms, MLP; the final norm.
    let per_layer = 2 * 64 + 128 * 64 + 2 * 64 * 64 + 64 * 128 + 2 * 32 + 3 * 64 * 32;
    assert_eq!(info.params, 2 * 128 * 64 + 2 * per_layer + 64);
}

#[test]
fn qwen3_tied_matches_transformers() {
    check("qwen3_tied");
    let model = load(&fixture("qwen3_tied"), KernelPath::Composed);
    let c = model.backbone.require_causal("parity").unwrap();
    assert_eq!(max_abs(c.lm_head(), c.embedding_table()), 0.0, "tied");
}

#[test]
fn qwen2_with_biases_matches_transformers() {
    check("qwen2");
    let info = load(&fixture("qwen2"), KernelPath::Fused).backbone.info().clone();
    assert!(!info.qk_norm);
    assert_eq!(info.head_dim(), 8);
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    check("llama_rope_llama3");
}

#[test]
fn llama_with_linear_rope_scaling_matches_transformers() {
    check("llama_rope_linear");
}

/// A GGUF metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// A GGUF v3 file of f32 tensors (`[rows, cols]` row-major, written in GGUF's reversed order).
fn write_gguf(path: &Path, meta: &[(String, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut b, key);
        match value {
            Meta::U32(v) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Meta::F32(v) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Meta::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                string(&mut b, s);
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, data) in tensors {
        string(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&offset.to_le_bytes());
        offset += ((data.len() * 4) as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, data) in tensors {
        let start = b.len();
        b.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        b.resize(start + (data.len() * 4).div_ceil(32) * 32, 0);
    }
    std::fs::write(path, b).unwrap();
}

/// llama.cpp's name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{part}")
}

/// The Qwen3 fixture written as llama.cpp writes a qwen3 GGUF (q/k rows as in the Hugging Face
/// file: qwen-family rotations are not permuted) loads with the same logits, on both paths and
/// with its linear weights kept in the file's storage.
#[test]
fn qwen3_from_gguf_matches_transformers() {
    let dir = fixture("qwen3");
    let (ids, want) = expected(&dir);
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let entries: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            (
                gguf_name(n),
                t.dims().to_vec(),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    let key = |k: &str| format!("qwen3.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str("qwen3")),
        (key("block_count"), Meta::U32(2)),
        (key("context_length"), Meta::U32(64)),
        (key("embedding_length"), Meta::U32(64)),
        (key("feed_forward_length"), Meta::U32(32)),
        (key("attention.head_count"), Meta::U32(4)),
        (key("attention.head_count_kv"), Meta::U32(2)),
        (key("attention.key_length"), Meta::U32(32)),
        (key("attention.value_length"), Meta::U32(32)),
        (key("attention.layer_norm_rms_epsilon"), Meta::F32(1e-6)),
        (key("rope.freq_base"), Meta::F32(1_000_000.0)),
    ];
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("qwen3.gguf");
    write_gguf(&path, &meta, &entries);
    let file = GgufFile::open(&path).unwrap();
    for (path_kind, storage) in [
        (KernelPath::Composed, WeightStorage::F32),
        (KernelPath::Fused, WeightStorage::F32),
        (KernelPath::Fused, WeightStorage::File),
    ] {
        let w = LlamaWeights::from_gguf(&file, &Device::Cpu, storage).unwrap();
        assert!(w.info.qk_norm);
        assert_eq!(w.info.head_dim(), 32);
        let model = llama::build(w, path_kind).unwrap();
        let d = max_abs(&logits(&*model, &ids), &want);
        println!("qwen3 GGUF, {path_kind:?} {storage:?}: max abs diff vs transformers {d:.2e}");
        assert!(d <= TOLERANCE, "{path_kind:?} {storage:?}: {d}");
    }
}
