//! Qwen3 through the `Backbone` trait: a tiny random Qwen3 (per-head q/k norms with random
//! gains, head_dim 6 with hidden 16 and 4 heads, so queries are 24 wide and keys/values 12,
//! grouped-query attention, padding). In f64 the input gradient (through the q/k norms) and a
//! key/value prefix's gradient equal central finite differences; the fused f32 kernels give the
//! composed path's hidden states, input gradients, cached forwards, shared-prefix gradients,
//! K/V-prefix gradients and `hidden_at`. The loader refuses by name the config fields that would
//! change the numbers and that it does not implement.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::llama::{self, ComposedLlama, FusedLlama, LlamaConfig, LlamaWeights};
use softprompt::backbone::random::{random_llama, random_qwen3};
use softprompt::backbone::weights::MemoryWeights;
use softprompt::backbone::{Backbone, BackboneInput, CausalLm, KernelPath, KvCache, Shape};
use softprompt::model_source::ModelLocation;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const D: usize = 16;
const HEAD_DIM: usize = 6;
const KV_HEADS: usize = 2;

/// Uniform numbers in ±`scale` (f64) from a seeded LCG.
fn rand(shape: &[usize], scale: f64, seed: &mut u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn shape() -> Shape {
    Shape {
        layers: 2,
        hidden: D,
        heads: 4,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        intermediate: 20,
        vocab: 20,
        max_positions: 32,
    }
}

fn config() -> LlamaConfig {
    LlamaConfig {
        shape: shape(),
        eps: 1e-6,
        rope_theta: 1_000.0,
        rope_scaling: Default::default(),
    }
}

/// The tiny Qwen3's weights in `dtype` (Hugging Face names, random gains everywhere).
fn tiny_qwen3_weights(dtype: DType) -> LlamaWeights {
    let (qd, kvd, i) = (4 * HEAD_DIM, KV_HEADS * HEAD_DIM, 20);
    let mut s = 17u64;
    let mut t = HashMap::new();
    let gain = |n: usize, s: &mut u64| rand(&[n], 0.5, s).affine(1.0, 1.0).unwrap();
    t.insert("model.embed_tokens.weight".to_string(), rand(&[20, D], 1.0, &mut s));
    t.insert("model.norm.weight".to_string(), gain(D, &mut s));
    t.insert("lm_head.weight".to_string(), rand(&[20, D], 0.5, &mut s));
    for l in 0..2 {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        t.insert(p("input_layernorm.weight"), gain(D, &mut s));
        t.insert(p("post_attention_layernorm.weight"), gain(D, &mut s));
        t.insert(p("self_attn.q_proj.weight"), rand(&[qd, D], 0.5, &mut s));
        t.insert(p("self_attn.k_proj.weight"), rand(&[kvd, D], 0.5, &mut s));
        t.insert(p("self_attn.v_proj.weight"), rand(&[kvd, D], 0.5, &mut s));
        t.insert(p("self_attn.q_norm.weight"), gain(HEAD_DIM, &mut s));
        t.insert(p("self_attn.k_norm.weight"), gain(HEAD_DIM, &mut s));
        t.insert(p("self_attn.o_proj.weight"), rand(&[D, qd], 0.5, &mut s));
        t.insert(p("mlp.gate_proj.weight"), rand(&[i, D], 0.5, &mut s));
        t.insert(p("mlp.up_proj.weight"), rand(&[i, D], 0.5, &mut s));
        t.insert(p("mlp.down_proj.weight"), rand(&[D, i], 0.5, &mut s));
    }
    let t = t.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("tiny-qwen3"),
    };
    let w = LlamaWeights::from_source(config(), &w, &Device::Cpu).unwrap();
    assert!(w.info.qk_norm, "the q/k norms were read");
    assert_eq!(w.info.model_type, "qwen3");
    w
}

/// The tiny Qwen3: f32 on the fused kernels, f64 on the composed candle path.
fn tiny_qwen3(dtype: DType) -> Box<dyn CausalLm> {
    let path = if dtype == DType::F32 {
        KernelPath::Fused
    } else {
        KernelPath::Composed
    };
    llama::build(tiny_qwen3_weights(dtype), path).unwrap()
}

/// A random one-row key/value prefix of `v` positions (2 layers, 2 heads of width 6).
fn prefix(v: usize, seed: u64, dtype: DType) -> KvCache {
    let mut s = seed;
    let layers = (0..2)
        .map(|_| {
            let k = rand(&[1, KV_HEADS, v, HEAD_DIM], 1.0, &mut s).to_dtype(dtype).unwrap();
            let val = rand(&[1, KV_HEADS, v, HEAD_DIM], 1.0, &mut s).to_dtype(dtype).unwrap();
            (k, val)
        })
        .collect();
    KvCache {
        layers,
        mask: Some(Tensor::ones((1, v), DType::F32, &Device::Cpu).unwrap()),
        next_pos: None,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Largest relative error, over every input embedding and (with a prefix) every prefix key and
/// value, of the backward pass against central finite differences of `Σ r ⊙ forward`.
fn finite_difference_error(
    model: &dyn Backbone,
    pre: Option<&KvCache>,
    embeds: &Tensor,
    mask: &Tensor,
    r: &Tensor,
) -> f64 {
    let loss = |pre: Option<&KvCache>, embeds: &Tensor| -> f64 {
        let input = BackboneInput::new(embeds, mask);
        let h = match pre {
            Some(p) => model.forward_prefixed(&input, p).unwrap(),
            None => model.forward(&input).unwrap(),
        };
        (h * r).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let input = BackboneInput::new(embeds, mask);
    let (d_embeds, d_prefix) = match pre {
        Some(p) => {
            let (_, tape) = model.forward_train_prefixed(&input, p).unwrap();
            model.backward_prefixed(&tape, r).unwrap()
        }
        None => {
            let (_, tape) = model.forward_train(&input).unwrap();
            (model.backward(&tape, r).unwrap(), Vec::new())
        }
    };
    let eps = 1e-5;
    let mut worst = 0f64;
    let base: Vec<f64> = embeds.flatten_all().unwrap().to_vec1().unwrap();
    let grad: Vec<f64> = d_embeds.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..base.len() {
        let bump = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            loss(pre, &Tensor::from_vec(v, embeds.shape(), &Device::Cpu).unwrap())
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        worst = worst.max((fd - grad[i]).abs() / (1.0 + fd.abs()));
    }
    if let Some(p) = pre {
        assert_eq!(d_prefix.len(), p.layers.len());
        for (l, (dk, dv)) in d_prefix.iter().enumerate() {
            for (which, g) in [dk, dv].into_iter().enumerate() {
                let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
                for (i, &gi) in g.iter().enumerate() {
                    let bump = |delta: f64| {
                        let mut q = p.clone();
                        let t = if which == 0 { &q.layers[l].0 } else { &q.layers[l].1 };
                        let mut vals: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                        vals[i] += delta;
                        let bumped = Tensor::from_vec(vals, t.shape(), &Device::Cpu).unwrap();
                        if which == 0 {
                            q.layers[l].0 = bumped;
                        } else {
                            q.layers[l].1 = bumped;
                        }
                        loss(Some(&q), embeds)
                    };
                    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    worst = worst.max((fd - gi).abs() / (1.0 + fd.abs()));
                }
            }
        }
    }
    worst
}

/// The input gradient through every layer, the q/k norms included, equals finite differences
/// (f64, composed path), with a padded row.
#[test]
fn qwen3_input_gradient_matches_finite_differences() {
    let model = tiny_qwen3(DType::F64);
    let mut s = 3u64;
    let embeds = rand(&[2, 5, D], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let r = rand(&[2, 5, D], 1.0, &mut s);
    let worst = finite_difference_error(model.as_ref(), None, &embeds, &mask, &r);
    println!("qwen3 input gradient: max relative error vs finite differences {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
}

/// A key/value prefix (prefix tuning: `[1, kv_heads, V, head_dim]` per layer, keys used as
/// given, after the norms and the rotation) and the input get the gradients finite differences
/// give.
#[test]
fn qwen3_prefix_gradient_matches_finite_differences() {
    let model = tiny_qwen3(DType::F64);
    let mut s = 5u64;
    let embeds = rand(&[2, 4, D], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu).unwrap();
    let r = rand(&[2, 4, D], 1.0, &mut s);
    let pre = prefix(3, 7, DType::F64);
    let worst = finite_difference_error(model.as_ref(), Some(&pre), &embeds, &mask, &r);
    println!("qwen3 K/V prefix and input gradients: max relative error vs finite differences {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
}

/// The fused kernels compute what the composed path computes, for every entry point of the
/// trait: hidden states, input gradients (left and right padding), cached forwards in two
/// chunks, a shared prefix's summed gradient, a K/V prefix's forward and gradients, and
/// `hidden_at`.
#[test]
fn fused_qwen3_equals_composed() {
    let (composed, fused) = (tiny_qwen3(DType::F64), tiny_qwen3(DType::F32));
    let mut s = 9u64;
    let (b, t, shared) = (3, 6, 2);
    // Every row starts with the same two embeddings (a prepended prompt), then differs.
    let head = rand(&[1, shared, D], 1.0, &mut s).repeat((b, 1, 1)).unwrap();
    let embeds = Tensor::cat(&[head, rand(&[b, t - shared, D], 1.0, &mut s)], 1).unwrap();
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let left = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let r = rand(&[b, t, D], 1.0, &mut s);
    let pre = prefix(3, 11, DType::F64);
    let at = [(0, 5), (1, 2), (2, 0), (2, 2)];
    let run = |m: &dyn CausalLm, dtype: DType| {
        let e = embeds.to_dtype(dtype).unwrap();
        let r = r.to_dtype(dtype).unwrap();
        let mut out = Vec::new();
        for mask in [&mask, &left] {
            let input = BackboneInput::new(&e, mask);
            let (h, tape) = m.forward_train(&input).unwrap();
            let g = m.backward(&tape, &r).unwrap();
            out.push(h);
            out.push(g.narrow(1, 0, shared).unwrap().sum_keepdim(0).unwrap());
            out.push(g.narrow(1, shared, t - shared).unwrap());
            out.push(m.forward(&input).unwrap());
        }
        let input = BackboneInput::new(&e, &mask);
        // cached: columns 0..4, then 4..6 (real positions compared)
        let mut cache = KvCache::default();
        let mut parts = Vec::new();
        for (c0, n) in [(0, 4), (4, 2)] {
            let (ep, mp) = (e.narrow(1, c0, n).unwrap(), mask.narrow(1, c0, n).unwrap());
            parts.push(m.forward_cached(&BackboneInput::new(&ep, &mp), &mut cache).unwrap());
        }
        let keep = mask.to_dtype(dtype).unwrap().unsqueeze(2).unwrap();
        out.push(Tensor::cat(&parts, 1).unwrap().broadcast_mul(&keep).unwrap());
        // a K/V prefix
        let p = KvCache {
            layers: pre
                .layers
                .iter()
                .map(|(k, v)| (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap()))
                .collect(),
            ..pre.clone()
        };
        let (h, tape) = m.forward_train_prefixed(&input, &p).unwrap();
        let (g, d_prefix) = m.backward_prefixed(&tape, &r).unwrap();
        out.push(h);
        out.push(g);
        for (dk, dv) in d_prefix {
            out.push(dk);
            out.push(dv);
        }
        out.push(m.hidden_at(&input, None, &at).unwrap());
        out.push(m.hidden_at(&input, Some(&p), &at).unwrap());
        out
    };
    let (c, f) = (run(composed.as_ref(), DType::F64), run(fused.as_ref(), DType::F32));
    assert_eq!(c.len(), f.len());
    let errs: Vec<f64> = c.iter().zip(&f).map(|(a, b)| max_diff(a, b)).collect();
    let shown: Vec<String> = errs.iter().map(|e| format!("{e:.1e}")).collect();
    println!(
        "qwen3 fused vs composed (hidden, shared-prefix gradient, other gradients, inference; \
         again left-padded; cached; prefixed hidden, gradient, dK/dV per layer; hidden_at): {}",
        shown.join(" ")
    );
    for (i, e) in errs.iter().enumerate() {
        assert!(*e < 1e-4, "output {i}: fused and composed differ by {e}");
    }
}

/// `random_qwen3` makes Qwen3-shaped models for benchmarks: they run on both paths alike, and
/// differ from the same weights without q/k norms.
#[test]
fn random_qwen3_runs_on_both_paths() {
    let cfg = LlamaConfig {
        shape: Shape {
            layers: 2,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            intermediate: 48,
            vocab: 50,
            max_positions: 64,
        },
        ..config()
    };
    let dev = Device::Cpu;
    let fused = FusedLlama::new(random_qwen3(cfg.clone(), 3, &dev).unwrap()).unwrap();
    let composed = ComposedLlama::new(random_qwen3(cfg.clone(), 3, &dev).unwrap()).unwrap();
    let plain = FusedLlama::new(random_llama(cfg, 3, &dev).unwrap()).unwrap();
    assert!(fused.info().qk_norm && !plain.info().qk_norm);
    let embeds = Tensor::arange(0f32, (2 * 10 * 32) as f32, &dev)
        .unwrap()
        .reshape((2, 10, 32))
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap();
    let mask = Tensor::ones((2, 10), DType::U32, &dev).unwrap();
    let input = BackboneInput::new(&embeds, &mask);
    let (f, c, p) = (
        fused.forward(&input).unwrap(),
        composed.forward(&input).unwrap(),
        plain.forward(&input).unwrap(),
    );
    assert!(max_diff(&f, &c) < 1e-4, "{}", max_diff(&f, &c));
    assert!(max_diff(&f, &p) > 1e-3, "the q/k norms change the model");
}

/// A change to a model file's tensors.
type TensorEdit<'a> = &'a dyn Fn(&mut HashMap<String, Tensor>);

/// A copy of the Qwen3 fixture whose `config.json` is edited by `edit` (and its tensors by
/// `tensors`); the loader's error, empty when it loads.
fn load_error(edit: impl FnOnce(&mut serde_json::Value), tensors: Option<TensorEdit>) -> String {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/transformers/qwen3");
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
    match load(dir.path()) {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

fn load(dir: &Path) -> anyhow::Result<softprompt::backbone::LoadedModel> {
    softprompt::backbone::load_with(
        &ModelLocation::HfDir(dir.to_path_buf()),
        &Device::Cpu,
        KernelPath::Fused,
    )
}

#[test]
fn fields_that_change_the_numbers_are_refused_by_name() {
    let cases = [
        ("use_sliding_window", true.into(), "`use_sliding_window`"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
            "`yarn`",
        ),
        ("attention_bias", true.into(), "`attention_bias`"),
        ("hidden_act", "gelu".into(), "`hidden_act`"),
        ("partial_rotary_factor", 0.5.into(), "`partial_rotary_factor`"),
        ("head_dim", 31.into(), "head_dim 31"),
    ];
    for (key, value, named) in cases {
        let e = load_error(|c| c[key] = value, None);
        assert!(
            e.contains(named) && e.contains("config.json"),
            "expected {named} named: {e}"
        );
    }
    // The shipped config loads (sliding_window null, use_sliding_window false, layer_types all full).
    assert_eq!(load_error(|_| {}, None), "");
    // A qwen3 file without a layer's k_norm names the tensor.
    let e = load_error(
        |_| {},
        Some(&|t: &mut HashMap<String, Tensor>| {
            t.remove("model.layers.1.self_attn.k_norm.weight");
        }),
    );
    assert!(e.contains("model.layers.1.self_attn.k_norm.weight"), "{e}");
    // tie_word_embeddings false without a stored head names the field and the tensor.
    let e = load_error(
        |_| {},
        Some(&|t: &mut HashMap<String, Tensor>| {
            t.remove("lm_head.weight");
        }),
    );
    assert!(e.contains("tie_word_embeddings") && e.contains("lm_head.weight"), "{e}");
}

/// Mistral's `sliding_window` masks nothing within the window: the context is capped there, so a
/// longer sequence is refused instead of computed without the window.
#[test]
fn mistral_sliding_window_caps_the_context() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/transformers/qwen2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["model_type"] = "mistral".into();
    config["sliding_window"] = 16.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let model = load(dir.path()).unwrap();
    assert_eq!(model.backbone.info().max_positions, 16);
}
