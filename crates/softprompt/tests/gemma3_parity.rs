//! Tiny random Gemma 3 text models saved by transformers (`fixtures/transformers/gemma3*`,
//! written by `scripts/fixtures/make_transformers_fixtures.py`) load through softprompt's normal
//! loader and give transformers' logits at every position on the composed and on the fused
//! implementation: `gemma3` (4 layers sliding, sliding, full, sliding with a window of 4 on a
//! 12-token input, rotary bases 1e4 / 1e6, `query_pre_attn_scalar` 24 with head_dim 16, tied
//! head) and `gemma3_scaled` (full then sliding, linear rotary scaling on the full layer, untied
//! head). Also: cached forwards (two chunks, one position at a time), a random key/value prefix
//! (transformers given it as `past_key_values`), the `gemma3` fixture written as llama.cpp
//! writes a gemma3 GGUF, and config fields that would change the numbers refused by name.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::gemma3::{self, Gemma3Weights};
use softprompt::backbone::{lm_logits, Arch, BackboneInput, CausalLm, KernelPath, KvCache, LoadedModel, WeightStorage};
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

/// The token ids the fixture ran and transformers' logits `[T, vocab]` for them (from `file`).
fn expected(dir: &Path, file: &str) -> (Vec<u32>, Tensor) {
    let input: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input.json")).unwrap()).unwrap();
    let ids = input["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let logits = candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap();
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

/// Logits `[T, vocab]` of `ids` (one row) after the chunks of `split` positions (the rest last),
/// each forwarded after the cache the earlier ones built; `prefix`: a K/V prefix first.
fn logits(model: &dyn CausalLm, ids: &[u32], split: &[usize], prefix: Option<&KvCache>) -> Tensor {
    let mut cache = prefix.cloned().unwrap_or_default();
    let mut rows = Vec::new();
    let mut start = 0;
    for end in split.iter().copied().chain([ids.len()]) {
        let ids = Tensor::new(&ids[start..end], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embeds = model.embed(&ids).unwrap();
        let mask = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu).unwrap();
        let input = BackboneInput::new(&embeds, &mask);
        let hidden = if split.is_empty() && prefix.is_none() {
            model.forward(&input).unwrap()
        } else {
            model.forward_cached(&input, &mut cache).unwrap()
        };
        rows.push(lm_logits(model, &hidden.squeeze(0).unwrap()).unwrap());
        start = end;
    }
    Tensor::cat(&rows, 0).unwrap()
}

/// The fixture's K/V prefix as a one-row cache.
fn fixture_prefix(dir: &Path, layers: usize) -> KvCache {
    let t = candle_core::safetensors::load(dir.join("prefix.safetensors"), &Device::Cpu).unwrap();
    let layers: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|l| {
            (
                t[&format!("layer{l}.key")].clone(),
                t[&format!("layer{l}.value")].clone(),
            )
        })
        .collect();
    let v = layers[0].0.dim(2).unwrap();
    KvCache {
        layers,
        mask: Some(Tensor::ones((1, v), DType::F32, &Device::Cpu).unwrap()),
        next_pos: None,
    }
}

/// Loads fixture `name` on both implementations and checks every way of running it against
/// transformers' logits; returns the (composed, fused) max abs differences of the plain forward.
fn check(name: &str) -> (f32, f32) {
    let dir = fixture(name);
    let (ids, want) = expected(&dir, "logits.safetensors");
    let (_, want_prefixed) = expected(&dir, "logits_prefixed.safetensors");
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let mut plain = Vec::new();
    let mut outputs = Vec::new();
    for path in [KernelPath::Composed, KernelPath::Fused] {
        let model = load(&dir, path);
        let m = model.backbone.require_causal("parity").unwrap();
        let prefix = fixture_prefix(&dir, m.info().layers);
        let one_by_one: Vec<usize> = (1..ids.len()).collect();
        let runs = [
            ("forward", logits(m, &ids, &[], None), &want),
            ("cached 7 + 5", logits(m, &ids, &[7], None), &want),
            ("cached 1 by 1", logits(m, &ids, &one_by_one, None), &want),
            (
                "after the K/V prefix",
                logits(m, &ids, &[], Some(&prefix)),
                &want_prefixed,
            ),
        ];
        for (what, got, want) in runs {
            let d = max_abs(&got, want);
            println!("{name} {path:?} {what}: max abs diff vs transformers {d:.2e} (max |logit| {scale:.2})");
            assert!(d <= TOLERANCE, "{name} {path:?} {what}: {d}");
            if what == "forward" {
                plain.push(d);
            }
            outputs.push(got);
        }
    }
    let (c, f) = outputs.split_at(outputs.len() / 2);
    for (a, b) in c.iter().zip(f) {
        let d = max_abs(a, b);
        assert!(d <= TOLERANCE, "{name}: fused and composed differ by {d}");
    }
    println!("{name}: fused vs composed at most {:.2e}", max_abs(&c[0], &f[0]));
    (plain[0], plain[1])
}

#[test]
fn gemma3_sliding_and_global_layers_match_transformers() {
    check("gemma3");
    let model = load(&fixture("gemma3"), KernelPath::Fused);
    let info = model.backbone.info();
    assert_eq!((info.arch, info.model_type.as_str()), (Arch::Gemma3, "gemma3_text"));
    assert!(info.qk_norm);
    assert_eq!((info.hidden, info.heads, info.kv_heads, info.head_dim), (32, 4, 2, 16));
    let c = model.backbone.require_causal("parity").unwrap();
    // Tied: the head is the file's table, the input embeddings that table times sqrt(32).
    let table = c.lm_head().affine(32f64.sqrt(), 0.0).unwrap();
    assert!(max_abs(&table, c.embedding_table()) < 1e-5);
    // Parameters: embed, per layer 4 norms, q/k/v/o, q/k norms, MLP; the final norm.
    let per_layer = 4 * 32 + 64 * 32 + 2 * 32 * 32 + 32 * 64 + 2 * 16 + 3 * 32 * 48;
    assert_eq!(info.params, 128 * 32 + 4 * per_layer + 32);
}

#[test]
fn gemma3_with_linear_scaling_and_an_untied_head_matches_transformers() {
    check("gemma3_scaled");
    let model = load(&fixture("gemma3_scaled"), KernelPath::Composed);
    let c = model.backbone.require_causal("parity").unwrap();
    assert!(max_abs(c.lm_head(), c.embedding_table()) > 0.1, "untied");
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

/// llama.cpp's name of a Gemma 3 Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
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

/// The `gemma3` fixture written as llama.cpp writes a gemma3 GGUF (its names, every norm
/// stored as `1 + w`, no head, the layer pattern and `query_pre_attn_scalar` as metadata) loads
/// with the same logits, on both paths and with its linear weights kept in the file's storage.
#[test]
fn gemma3_from_gguf_matches_transformers() {
    let dir = fixture("gemma3");
    let (ids, want) = expected(&dir, "logits.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let entries: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            let t = if n.ends_with("norm.weight") {
                t.affine(1.0, 1.0).unwrap()
            } else {
                t.clone()
            };
            (
                gguf_name(n),
                t.dims().to_vec(),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    let key = |k: &str| format!("gemma3.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str("gemma3")),
        (key("block_count"), Meta::U32(4)),
        (key("context_length"), Meta::U32(64)),
        (key("embedding_length"), Meta::U32(32)),
        (key("feed_forward_length"), Meta::U32(48)),
        (key("attention.head_count"), Meta::U32(4)),
        (key("attention.head_count_kv"), Meta::U32(2)),
        (key("attention.key_length"), Meta::U32(16)),
        (key("attention.value_length"), Meta::U32(16)),
        (key("attention.layer_norm_rms_epsilon"), Meta::F32(1e-6)),
        (key("attention.sliding_window"), Meta::U32(4)),
        (key("attention.sliding_window_pattern"), Meta::U32(3)),
        (key("attention.scale"), Meta::F32((1.0 / 24f64.sqrt()) as f32)),
        (key("rope.freq_base"), Meta::F32(1_000_000.0)),
        (key("rope.freq_base_swa"), Meta::F32(10_000.0)),
    ];
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("gemma3.gguf");
    write_gguf(&path, &meta, &entries);
    let file = GgufFile::open(&path).unwrap();
    for (path_kind, storage) in [
        (KernelPath::Composed, WeightStorage::F32),
        (KernelPath::Fused, WeightStorage::F32),
        (KernelPath::Fused, WeightStorage::File),
    ] {
        let w = Gemma3Weights::from_gguf(&file, &Device::Cpu, storage).unwrap();
        assert_eq!(w.cfg.sliding_window, 4);
        let model = gemma3::build(w, path_kind).unwrap();
        let d = max_abs(&logits(&*model, &ids, &[], None), &want);
        println!("gemma3 GGUF, {path_kind:?} {storage:?}: max abs diff vs transformers {d:.2e}");
        assert!(d <= TOLERANCE, "{path_kind:?} {storage:?}: {d}");
    }
}

/// A change to a model file's tensors.
type TensorEdit<'a> = &'a dyn Fn(&mut HashMap<String, Tensor>);

/// A copy of the `gemma3` fixture whose `config.json` is edited by `edit` (and its tensors
/// by `tensors`); the loader's error, empty when it loads.
fn load_error(edit: impl FnOnce(&mut serde_json::Value), tensors: Option<TensorEdit>) -> String {
    let src = fixture("gemma3");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    if let Some(change) = tensors {
        let weights = dir.path().join("model.safetensors");
        let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        change(&mut t);
        candle_core::safetensors::save(&t, &weights).unwrap();
    }
    let loaded = softprompt::backbone::load_with(
        &ModelLocation::HfDir(dir.path().to_path_buf()),
        &Device::Cpu,
        KernelPath::Fused,
    );
    match loaded {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn fields_that_change_the_numbers_are_refused_by_name() {
    let cases = [
        ("attn_logit_softcapping", 50.0.into(), "`attn_logit_softcapping`"),
        ("final_logit_softcapping", 30.0.into(), "`final_logit_softcapping`"),
        ("hidden_activation", "gelu".into(), "`hidden_activation`"),
        ("attention_bias", true.into(), "`attention_bias`"),
        (
            "use_bidirectional_attention",
            true.into(),
            "`use_bidirectional_attention`",
        ),
        ("sliding_window", serde_json::Value::Null, "`sliding_window`"),
        (
            "layer_types",
            serde_json::json!([
                "sliding_attention",
                "chunked_attention",
                "full_attention",
                "sliding_attention"
            ]),
            "`layer_types`[1]",
        ),
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "full_attention"]),
            "`layer_types` names 2 layers",
        ),
        (
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            "`yarn`",
        ),
        ("model_type", "gemma3".into(), "`gemma3_text`"),
    ];
    for (key, value, named) in cases {
        let e = load_error(|c| c[key] = value, None);
        assert!(
            e.contains(named) && e.contains("config.json"),
            "expected {named} named: {e}"
        );
    }
    // The shipped config loads; softcapping fields set to null are fine.
    assert_eq!(load_error(|_| {}, None), "");
    // A layer without its post-feedforward norm names the tensor.
    let e = load_error(
        |_| {},
        Some(&|t: &mut HashMap<String, Tensor>| {
            t.remove("model.layers.2.post_feedforward_layernorm.weight");
        }),
    );
    assert!(e.contains("model.layers.2.post_feedforward_layernorm.weight"), "{e}");
    // tie_word_embeddings false without a stored head names the field and the tensor.
    let e = load_error(|c| c["tie_word_embeddings"] = false.into(), None);
    assert!(e.contains("tie_word_embeddings") && e.contains("lm_head.weight"), "{e}");
}
