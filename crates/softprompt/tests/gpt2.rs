//! GPT-2: the tiny random model transformers saved (`fixtures/transformers/gpt2`, written by
//! `scripts/fixtures/make_transformers_fixtures.py`: 2 layers, hidden 32, 4 heads, n_inner 48,
//! a trained byte-level BPE of 300 tokens, tied head) loads from its Hugging Face folder and
//! from the GGUF written as llama.cpp writes one, and gives transformers' logits (every position,
//! two inputs, cached in chunks, after a random key/value prefix), tokens and greedy
//! continuation. On a tiny random GPT-2 in f64 the input gradient and a key/value prefix's
//! gradient equal central finite differences; a stacked decode step continues each row from its
//! own position; every method for causal models lowers the loss on the fixture; config fields
//! that would change the numbers, the fused path and positions past `n_positions` are refused.

mod common;
use candle_core::{DType, Device, Tensor};
use common::tiny::rand;
use softprompt::backbone::gpt2::{self, Gpt2Config, Gpt2Weights};
use softprompt::backbone::weights::MemoryWeights;
use softprompt::backbone::{
    lm_logits, Arch, Backbone, BackboneInput, CausalLm, KernelPath, KvCache, LoadedModel, Shape, WeightStorage,
};
use softprompt::config::TaskData;
use softprompt::model_source::ModelLocation;
use softprompt::task::TaskKind;
use softprompt::train::optim::Schedule;
use softprompt::train::{self, InitKind, Method, Quiet, TrainConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Logits may differ from transformers' by this much (max abs), f32 on both sides.
const TOLERANCE: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/transformers/gpt2")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn load(location: ModelLocation) -> LoadedModel {
    softprompt::backbone::load(&location, &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The fixture from its folder and from its GGUF.
fn both() -> [(&'static str, LoadedModel); 2] {
    [
        ("folder", load(ModelLocation::HfDir(dir()))),
        ("gguf", load(ModelLocation::Gguf(dir().join("model.gguf")))),
    ]
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Logits `[T, vocab]` of `ids` (one row) run after `cache` in chunks ending at `split` (the
/// rest last); a plain forward when there is neither.
fn logits(model: &dyn CausalLm, ids: &[u32], split: &[usize], prefix: Option<&KvCache>) -> Tensor {
    let mut cache = prefix.cloned().unwrap_or_default();
    let mut rows = Vec::new();
    let mut start = 0;
    for end in split.iter().copied().chain([ids.len()]) {
        let part = Tensor::new(&ids[start..end], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embeds = model.embed(&part).unwrap();
        let mask = Tensor::ones(part.dims(), DType::U32, &Device::Cpu).unwrap();
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

/// The fixture's random key/value prefix as a one-row cache.
fn fixture_prefix(layers: usize) -> KvCache {
    let t = tensors("prefix.safetensors");
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

/// Every position's logits of both inputs, in one forward and cached in chunks, and after the
/// random key/value prefix (as a prefix and as a cache), from the folder and from the GGUF.
#[test]
fn gpt2_matches_transformers_from_the_folder_and_the_gguf() {
    let input = json("input.json");
    let greedy = json("greedy.json");
    let want = tensors("logits.safetensors");
    let want_prefixed = tensors("logits_prefixed.safetensors")["logits"].clone();
    let (ids, prompt) = (ids_of(&input["input_ids"]), ids_of(&greedy["ids"]));
    for (source, model) in both() {
        assert_eq!(model.backbone.kernel_path(), KernelPath::Composed);
        let m = model.backbone.require_causal("parity").unwrap();
        let pre = fixture_prefix(m.info().layers);
        let ids_tensor = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let embeds = m.embed(&ids_tensor).unwrap();
        let mask = Tensor::ones((1, ids.len()), DType::U32, &Device::Cpu).unwrap();
        let prefixed = m.forward_prefixed(&BackboneInput::new(&embeds, &mask), &pre).unwrap();
        let diffs = [
            ("input", max_abs(&logits(m, &ids, &[], None), &want["logits"])),
            (
                "input cached 5+7",
                max_abs(&logits(m, &ids, &[5], None), &want["logits"]),
            ),
            ("input cached 1 by 1", {
                let split: Vec<usize> = (1..ids.len()).collect();
                max_abs(&logits(m, &ids, &split, None), &want["logits"])
            }),
            ("prompt", max_abs(&logits(m, &prompt, &[], None), &want["prompt"])),
            (
                "after the prefix (cache)",
                max_abs(&logits(m, &ids, &[4], Some(&pre)), &want_prefixed),
            ),
            (
                "after the prefix (forward_prefixed)",
                max_abs(&lm_logits(m, &prefixed.squeeze(0).unwrap()).unwrap(), &want_prefixed),
            ),
        ];
        println!("gpt2 {source}: max abs diff vs transformers {diffs:?}");
        for (what, d) in diffs {
            assert!(d <= TOLERANCE, "{source}, {what}: {d}");
        }
    }
}

/// Both tokenizers (tokenizer.json, the GGUF's metadata) give transformers' ids for the greedy
/// prompt, and greedy decoding gives transformers' tokens (each step's margin is in the fixture:
/// the smallest is 0.09, far above the tolerance).
#[test]
fn gpt2_tokenizes_and_decodes_greedily_as_transformers() {
    let greedy = json("greedy.json");
    let (text, ids, want) = (
        greedy["text"].as_str().unwrap(),
        ids_of(&greedy["ids"]),
        ids_of(&greedy["greedy"]),
    );
    for (source, model) in both() {
        assert_eq!(model.tokenizer.encode(text, false).unwrap(), ids, "{source}");
        let m = model.backbone.require_causal("greedy").unwrap();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let got = softprompt::infer::generate::greedy(m, &m.embed(&t).unwrap(), want.len(), &[]).unwrap();
        assert_eq!(got, want, "{source}");
    }
}

/// What `softprompt info` prints for the fixture: the architecture, its features and the
/// parameter count (wte, wpe, per block 2 LayerNorms, c_attn, c_proj, the MLP with biases; ln_f).
#[test]
fn gpt2_info_names_its_features() {
    let [(_, model), (_, gguf)] = both();
    let info = model.backbone.info();
    assert_eq!((info.arch, info.model_type.as_str()), (Arch::Gpt2, "gpt2"));
    assert!(info.arch.is_causal());
    let (d, i) = (32, 48);
    let per_layer = 4 * d + 3 * d * d + 3 * d + d * d + d + i * d + i + d * i + d;
    assert_eq!(info.params, 300 * d + 64 * d + 2 * per_layer + 2 * d);
    assert_eq!(gguf.backbone.info().params, info.params);
    assert_eq!((info.intermediate, info.max_positions, info.vocab), (48, 64, 300));
    let features = info.features.join("; ");
    for f in [
        "learned absolute positions (64 rows",
        "pre-LayerNorm",
        "Conv1D c_attn",
        "gelu_new",
        "tied head",
    ] {
        assert!(features.contains(f), "{f} missing from {features}");
    }
    let c = model.backbone.require_causal("info").unwrap();
    assert_eq!(max_abs(c.lm_head(), c.embedding_table()), 0.0, "tied");
}

const D: usize = 12;
const HEADS: usize = 3;
const LAYERS: usize = 2;

/// A tiny random GPT-2 (Hugging Face names, Conv1D `[in, out]`) in f64: hidden 12, 3 heads,
/// inner 20, 16 positions, LayerNorm gains around 1, every bias non-zero.
fn tiny(scale_attn_weights: bool) -> Box<dyn CausalLm> {
    let cfg = Gpt2Config {
        shape: Shape {
            layers: LAYERS,
            hidden: D,
            heads: HEADS,
            kv_heads: HEADS,
            head_dim: D / HEADS,
            intermediate: 20,
            vocab: 24,
            max_positions: 16,
        },
        eps: 1e-5,
        scale_attn_weights,
    };
    let mut s = 41u64;
    let mut t = HashMap::new();
    let mut ins = |n: String, shape: &[usize], scale: f64, shift: f64, s: &mut u64| {
        t.insert(n, rand(shape, scale, s).affine(1.0, shift).unwrap());
    };
    ins("transformer.wte.weight".into(), &[24, D], 1.0, 0.0, &mut s);
    ins("transformer.wpe.weight".into(), &[16, D], 0.5, 0.0, &mut s);
    for n in ["ln_f"]
        .into_iter()
        .map(String::from)
        .chain((0..LAYERS).flat_map(|l| ["ln_1", "ln_2"].map(|p| format!("h.{l}.{p}"))))
    {
        ins(format!("transformer.{n}.weight"), &[D], 0.3, 1.0, &mut s);
        ins(format!("transformer.{n}.bias"), &[D], 0.3, 0.0, &mut s);
    }
    for l in 0..LAYERS {
        for (part, inp, out) in [
            ("attn.c_attn", D, 3 * D),
            ("attn.c_proj", D, D),
            ("mlp.c_fc", D, 20),
            ("mlp.c_proj", 20, D),
        ] {
            ins(
                format!("transformer.h.{l}.{part}.weight"),
                &[inp, out],
                0.6,
                0.0,
                &mut s,
            );
            ins(format!("transformer.h.{l}.{part}.bias"), &[out], 0.2, 0.0, &mut s);
        }
    }
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("tiny-gpt2"),
    };
    gpt2::build(
        Gpt2Weights::from_source(cfg, &w, &Device::Cpu).unwrap(),
        KernelPath::Composed,
    )
    .unwrap()
}

/// A random one-row key/value prefix of `v` positions (f64).
fn prefix(v: usize, seed: u64) -> KvCache {
    let mut s = seed;
    let hd = D / HEADS;
    KvCache {
        layers: (0..LAYERS)
            .map(|_| {
                (
                    rand(&[1, HEADS, v, hd], 1.0, &mut s),
                    rand(&[1, HEADS, v, hd], 1.0, &mut s),
                )
            })
            .collect(),
        mask: Some(Tensor::ones((1, v), DType::F64, &Device::Cpu).unwrap()),
        next_pos: None,
    }
}

/// Largest relative error, over every input embedding and (with a prefix) every prefix key and
/// value, of the backward pass against central finite differences of `Σ r ⊙ forward`.
fn finite_difference_error(model: &dyn Backbone, pre: Option<&KvCache>, embeds: &Tensor, mask: &Tensor) -> f64 {
    let r = rand(embeds.dims(), 1.0, &mut 77u64);
    let loss = |pre: Option<&KvCache>, embeds: &Tensor| -> f64 {
        let input = BackboneInput::new(embeds, mask);
        let h = match pre {
            Some(p) => model.forward_prefixed(&input, p).unwrap(),
            None => model.forward(&input).unwrap(),
        };
        (h * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let input = BackboneInput::new(embeds, mask);
    let (d_embeds, d_prefix) = match pre {
        Some(p) => {
            let (_, tape) = model.forward_train_prefixed(&input, p).unwrap();
            model.backward_prefixed(&tape, &r).unwrap()
        }
        None => {
            let (_, tape) = model.forward_train(&input).unwrap();
            (model.backward(&tape, &r).unwrap(), Vec::new())
        }
    };
    // Central differences of one value of `t`, with `rebuild` making the inputs from the bumped
    // values.
    let eps = 1e-5;
    let mut worst = 0f64;
    let mut check = |grad: &Tensor, base: &Tensor, f: &dyn Fn(Tensor) -> f64| {
        let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..v.len() {
            let bump = |delta: f64| {
                let mut w = v.clone();
                w[i] += delta;
                f(Tensor::from_vec(w, base.shape(), &Device::Cpu).unwrap())
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
            worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
        }
    };
    check(&d_embeds, embeds, &|e| loss(pre, &e));
    if let Some(p) = pre {
        assert_eq!(d_prefix.len(), LAYERS);
        for (l, (dk, dv)) in d_prefix.iter().enumerate() {
            check(dk, &p.layers[l].0, &|k| {
                let mut q = p.clone();
                q.layers[l].0 = k;
                loss(Some(&q), embeds)
            });
            check(dv, &p.layers[l].1, &|v| {
                let mut q = p.clone();
                q.layers[l].1 = v;
                loss(Some(&q), embeds)
            });
        }
    }
    worst
}

/// The input gradient through the position add, both LayerNorms, the fused q/k/v attention,
/// the GELU-tanh MLP and the final LayerNorm equals finite differences (f64), with a padded
/// row, scaled and unscaled attention; and after a key/value prefix, the prefix's too.
#[test]
fn gpt2_gradients_match_finite_differences() {
    let mut s = 3u64;
    let embeds = rand(&[2, 5, D], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    for scaled in [true, false] {
        let model = tiny(scaled);
        let plain = finite_difference_error(model.as_ref(), None, &embeds, &mask);
        let prefixed = finite_difference_error(model.as_ref(), Some(&prefix(3, 9)), &embeds, &mask);
        println!("gpt2 (scale_attn_weights {scaled}): max relative error vs finite differences: input {plain:.2e}, with a K/V prefix {prefixed:.2e}");
        assert!(plain < 1e-6 && prefixed < 1e-6, "{plain} {prefixed}");
    }
}

/// Two sequences (7 and 4 positions) prefilled alone, their caches stacked (the shorter padded
/// at its end, keeping its own position), one step for both: each row gets the hidden state of
/// decoding alone, its position embedding that of its own next position.
#[test]
fn a_stacked_decode_step_continues_each_row_from_its_position() {
    let model = tiny(true);
    let mut s = 31u64;
    let seqs = [rand(&[1, 8, D], 1.0, &mut s), rand(&[1, 5, D], 1.0, &mut s)];
    let ones = |n: usize| Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
    let (mut alone, mut caches) = (Vec::new(), Vec::new());
    for e in &seqs {
        let n = e.dim(1).unwrap();
        let mut cache = KvCache::default();
        let head = e.narrow(1, 0, n - 1).unwrap();
        model
            .forward_cached(&BackboneInput::new(&head, &ones(n - 1)), &mut cache)
            .unwrap();
        caches.push(cache.clone());
        let last = e.narrow(1, n - 1, 1).unwrap();
        alone.push(
            model
                .forward_cached(&BackboneInput::new(&last, &ones(1)), &mut cache)
                .unwrap(),
        );
    }
    let mut stacked = KvCache::stack(&[&caches[0], &caches[1]]).unwrap();
    let step = Tensor::cat(&[seqs[0].narrow(1, 7, 1).unwrap(), seqs[1].narrow(1, 4, 1).unwrap()], 0).unwrap();
    let mask = Tensor::ones((2, 1), DType::U32, &Device::Cpu).unwrap();
    let both = model
        .forward_cached(&BackboneInput::new(&step, &mask), &mut stacked)
        .unwrap();
    assert_eq!(stacked.positions(), vec![8, 5]);
    for (row, want) in alone.iter().enumerate() {
        let d = max_abs(&both.narrow(0, row, 1).unwrap(), want);
        assert!(d < 1e-9, "row {row}: {d}");
    }
}

/// The fixture's folder with `edit` applied to its config.json, loaded.
fn load_edited(edit: impl FnOnce(&mut serde_json::Value), options: softprompt::backbone::LoadOptions) -> String {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
    }
    let mut config = json("config.json");
    edit(&mut config);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let location = ModelLocation::HfDir(tmp.path().to_path_buf());
    match softprompt::backbone::load_with(&location, &Device::Cpu, options) {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

/// Fields that would change the numbers are refused by name; so are the fused path, weights in
/// the file's storage, and positions past `n_positions` (also after a prefix).
#[test]
fn what_gpt2_does_not_run_is_refused() {
    let plain = softprompt::backbone::LoadOptions::default();
    assert_eq!(load_edited(|_| {}, plain), "");
    for (field, value, words) in [
        (
            "activation_function",
            serde_json::json!("relu"),
            "`activation_function` is `relu`",
        ),
        (
            "scale_attn_by_inverse_layer_idx",
            serde_json::json!(true),
            "`scale_attn_by_inverse_layer_idx` is true",
        ),
        (
            "reorder_and_upcast_attn",
            serde_json::json!(true),
            "`reorder_and_upcast_attn` is true",
        ),
        (
            "n_inner",
            serde_json::json!(64),
            "has shape [32, 48], expected [32, 64]",
        ),
    ] {
        let e = load_edited(|c| c[field] = value, plain);
        assert!(e.contains(words), "{field}: {e}");
    }
    let e = load_edited(|c| c["tie_word_embeddings"] = serde_json::json!(false), plain);
    assert!(
        e.contains("`tie_word_embeddings` is false") && e.contains("`lm_head.weight`"),
        "{e}"
    );
    let e = load_edited(|_| {}, KernelPath::Fused.into());
    assert!(e.contains("composed candle ops only"), "{e}");
    let e = load_edited(|_| {}, WeightStorage::File.into());
    assert!(e.contains("weights = \"file\""), "{e}");

    let model = load(ModelLocation::HfDir(dir()));
    let m = model.backbone.require_causal("positions").unwrap();
    let run = |t: usize, pre: Option<&KvCache>| -> String {
        let ids = Tensor::zeros((1, t), DType::U32, &Device::Cpu).unwrap();
        let embeds = m.embed(&ids).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let input = BackboneInput::new(&embeds, &mask);
        let r = match pre {
            Some(p) => m.forward_prefixed(&input, p),
            None => m.forward(&input),
        };
        r.err().map(|e| format!("{e:#}")).unwrap_or_default()
    };
    assert_eq!(run(64, None), "");
    assert!(
        run(65, None).contains("exceeds GPT-2's 64 learned positions"),
        "{}",
        run(65, None)
    );
    let pre = fixture_prefix(2);
    assert_eq!(run(61, Some(&pre)), "");
    let e = run(62, Some(&pre));
    assert!(e.contains("positions 3..65") && e.contains("n_positions"), "{e}");
}

/// A short run on four capital-city rows with the fixture.
fn short_run(out: &Path, method: Method) -> TrainConfig {
    TrainConfig {
        model: dir().display().to_string(),
        train: common::first_rows("facts-countries/capital/train.jsonl", 4, &out.join("data")),
        dev: Some(common::data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(4),
        template: "{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        method,
        num_virtual_tokens: 4,
        // The fixture has 64 positions: a prefix's 4 and the input's.
        max_len: 48,
        init: InitKind::RandomNormal,
        lr: 0.5,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(20),
        batch: 4,
        eval_every: 10,
        output: out.join("out"),
        ..TrainConfig::default()
    }
}

/// Every method that trains on a causal model lowers the training loss on the GPT-2 fixture
/// in 20 steps, evaluating on dev rows as it goes (scoring after a prompt's cached keys and
/// values): prompt tuning, p-tuning, residual prompt tuning, DePT, multitask prompt tuning (two
/// tasks), prefix tuning and a Cartridge.
#[test]
fn every_method_lowers_the_loss() {
    let tmp = common::scratch("gpt2");
    let methods = [
        Method::PromptTuning,
        Method::PTuning,
        Method::ResidualPromptTuning,
        Method::Dept,
        Method::MultitaskPromptTuning,
        Method::PrefixTuning,
        Method::Cartridge,
    ];
    let losses: Vec<(Method, Vec<f64>)> = methods
        .into_iter()
        .map(|method| {
            let mut cfg = short_run(&tmp.path().join(format!("{method:?}")), method);
            let out = tmp.path().join(format!("{method:?}"));
            if method == Method::Cartridge {
                cfg.init = InitKind::Text;
                cfg.init_text = Some("Facts about countries and their capital cities:".into());
            }
            if method == Method::MultitaskPromptTuning {
                let task = |rel: &str| TaskData {
                    train: common::first_rows(&format!("facts-countries/{rel}/train.jsonl"), 4, &out),
                    dev: Some(common::first_rows(&format!("facts-countries/{rel}/dev.jsonl"), 3, &out)),
                    test: None,
                };
                cfg.tasks = vec![task("capital"), task("continent")];
                (cfg.train, cfg.dev, cfg.dev_rows) = (TrainConfig::default().train, None, None);
                (cfg.init, cfg.num_ranks, cfg.batch) = (InitKind::RandomNormal, 2, 8);
            }
            train::train(&cfg, &mut Quiet).unwrap_or_else(|e| panic!("{method:?}: {e:#}"));
            (method, common::losses(&cfg.output))
        })
        .collect();
    for (method, l) in &losses {
        println!("gpt2 {method:?}: loss {:.2} → {:.2}", l[0], l[l.len() - 1]);
    }
    for (method, l) in losses {
        // A random model is confidently wrong (loss ≈ 20 nats): prompt tuning moves it slowly.
        assert_eq!(l.len(), 20);
        assert!(
            l[18] + l[19] < 0.9 * (l[0] + l[1]),
            "{method:?}: loss did not fall: {l:?}"
        );
    }
}
