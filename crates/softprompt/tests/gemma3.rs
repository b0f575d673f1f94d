//! Gemma 3 through the `Backbone` trait on a tiny random model: 3 layers (sliding, global,
//! sliding) with a window of 3 that bites on every input here, head_dim 6 with hidden 16 and 4
//! heads over 2 key/value heads, `query_pre_attn_scalar` 10 (not head_dim), random `(1 + w)`
//! gains everywhere, an untied head. In f64 the input gradient and a key/value prefix's gradient
//! equal central finite differences; the fused f32 kernels give the composed path's hidden
//! states, input gradients, cached forwards, shared-prefix gradients, K/V-prefix gradients and
//! `hidden_at`, and a stacked (mixed-length) decode step gives each row's own result.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::gemma3::{self, AttentionKind, Gemma3Config, Gemma3Weights, Rotary};
use softprompt::backbone::llama::RopeScaling;
use softprompt::backbone::weights::MemoryWeights;
use softprompt::backbone::{Backbone, BackboneInput, CausalLm, KernelPath, KvCache, Shape};
use std::collections::HashMap;
use std::path::PathBuf;

const D: usize = 16;
const HEAD_DIM: usize = 6;
const KV_HEADS: usize = 2;
const LAYERS: usize = 3;
const WINDOW: usize = 3;

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

fn config() -> Gemma3Config {
    Gemma3Config {
        shape: Shape {
            layers: LAYERS,
            hidden: D,
            heads: 4,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            intermediate: 20,
            vocab: 20,
            max_positions: 32,
        },
        eps: 1e-6,
        query_pre_attn_scalar: 10.0,
        sliding_window: WINDOW,
        layer_kinds: vec![AttentionKind::Sliding, AttentionKind::Global, AttentionKind::Sliding],
        global_rope: Rotary {
            theta: 1_000.0,
            scaling: RopeScaling::Linear { factor: 2.0 },
        },
        local_rope: Rotary {
            theta: 50.0,
            scaling: RopeScaling::None,
        },
    }
}

/// The tiny Gemma 3's weights in `dtype` (Hugging Face names; norm weights `w` around 0, gains
/// `1 + w`).
fn tiny_weights(dtype: DType) -> Gemma3Weights {
    let (qd, kvd, i) = (4 * HEAD_DIM, KV_HEADS * HEAD_DIM, 20);
    let mut s = 17u64;
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), rand(&[20, D], 1.0, &mut s));
    t.insert("model.norm.weight".to_string(), rand(&[D], 0.5, &mut s));
    t.insert("lm_head.weight".to_string(), rand(&[20, D], 0.5, &mut s));
    for l in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            t.insert(p(&format!("{n}.weight")), rand(&[D], 0.5, &mut s));
        }
        t.insert(p("self_attn.q_proj.weight"), rand(&[qd, D], 0.5, &mut s));
        t.insert(p("self_attn.k_proj.weight"), rand(&[kvd, D], 0.5, &mut s));
        t.insert(p("self_attn.v_proj.weight"), rand(&[kvd, D], 0.5, &mut s));
        t.insert(p("self_attn.q_norm.weight"), rand(&[HEAD_DIM], 0.5, &mut s));
        t.insert(p("self_attn.k_norm.weight"), rand(&[HEAD_DIM], 0.5, &mut s));
        t.insert(p("self_attn.o_proj.weight"), rand(&[D, qd], 0.5, &mut s));
        t.insert(p("mlp.gate_proj.weight"), rand(&[i, D], 0.5, &mut s));
        t.insert(p("mlp.up_proj.weight"), rand(&[i, D], 0.5, &mut s));
        t.insert(p("mlp.down_proj.weight"), rand(&[D, i], 0.5, &mut s));
    }
    let t = t.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("tiny-gemma3"),
    };
    Gemma3Weights::from_source(config(), &w, &Device::Cpu).unwrap()
}

/// The tiny Gemma 3: f32 on the fused kernels, f64 on the composed candle path.
fn tiny(dtype: DType) -> Box<dyn CausalLm> {
    let path = if dtype == DType::F32 {
        KernelPath::Fused
    } else {
        KernelPath::Composed
    };
    gemma3::build(tiny_weights(dtype), path).unwrap()
}

/// A random one-row key/value prefix of `v` positions.
fn prefix(v: usize, seed: u64, dtype: DType) -> KvCache {
    let mut s = seed;
    let layers = (0..LAYERS)
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

/// The input gradient through every layer kind (sliding window biting at 5 positions, global),
/// the four norms, the q/k norms and the gated GELU, equals finite differences (f64, composed
/// path), with a padded row.
#[test]
fn gemma3_input_gradient_matches_finite_differences() {
    let model = tiny(DType::F64);
    let mut s = 3u64;
    let embeds = rand(&[2, 5, D], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &Device::Cpu).unwrap();
    let r = rand(&[2, 5, D], 1.0, &mut s);
    let worst = finite_difference_error(model.as_ref(), None, &embeds, &mask, &r);
    println!("gemma3 input gradient: max relative error vs finite differences {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
}

/// A key/value prefix of 3 positions before 4 input positions: on the sliding layers (window 3)
/// the input's later queries no longer see the prefix; the prefix's and the input's gradients
/// equal finite differences.
#[test]
fn gemma3_prefix_gradient_matches_finite_differences() {
    let model = tiny(DType::F64);
    let mut s = 5u64;
    let embeds = rand(&[2, 4, D], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu).unwrap();
    let r = rand(&[2, 4, D], 1.0, &mut s);
    let pre = prefix(3, 7, DType::F64);
    let worst = finite_difference_error(model.as_ref(), Some(&pre), &embeds, &mask, &r);
    println!("gemma3 K/V prefix and input gradients: max relative error vs finite differences {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
}

/// A sliding layer forgets: the hidden state of the last of 8 positions does not change when
/// the first embedding changes in a model whose every layer is a sliding layer of window 3
/// (information travels at most 2 positions per layer: 6 in 3 layers), and does change with a
/// global layer in the stack.
#[test]
fn the_window_limits_what_a_position_sees() {
    let mut s = 21u64;
    let embeds = rand(&[1, 8, D], 1.0, &mut s);
    let mut bumped: Vec<f64> = embeds.flatten_all().unwrap().to_vec1().unwrap();
    bumped[0] += 0.5;
    let bumped = Tensor::from_vec(bumped, (1, 8, D), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 8), DType::U32, &Device::Cpu).unwrap();
    for (kinds, changes) in [
        (vec![AttentionKind::Sliding; LAYERS], false),
        (config().layer_kinds, true),
    ] {
        let mut w = tiny_weights(DType::F64);
        for (layer, kind) in w.layers.iter_mut().zip(&kinds) {
            layer.kind = *kind;
        }
        w.cfg.layer_kinds = kinds;
        let model = gemma3::build(w, KernelPath::Composed).unwrap();
        let last = |e: &Tensor| {
            model
                .forward(&BackboneInput::new(e, &mask))
                .unwrap()
                .narrow(1, 7, 1)
                .unwrap()
        };
        let d = max_diff(&last(&embeds), &last(&bumped));
        assert_eq!(d > 1e-9, changes, "difference {d}");
    }
}

/// The fused kernels compute what the composed path computes, for every entry point of the
/// trait, with the window biting: hidden states, input gradients (right and left padding),
/// cached forwards in two chunks and one position at a time, a shared prefix's summed gradient,
/// a K/V prefix's forward and gradients, and `hidden_at`.
#[test]
fn fused_gemma3_equals_composed() {
    let (composed, fused) = (tiny(DType::F64), tiny(DType::F32));
    let mut s = 9u64;
    let (b, t, shared) = (3, 7, 2);
    // Every row starts with the same two embeddings (a prepended prompt), then differs.
    let head = rand(&[1, shared, D], 1.0, &mut s).repeat((b, 1, 1)).unwrap();
    let embeds = Tensor::cat(&[head, rand(&[b, t - shared, D], 1.0, &mut s)], 1).unwrap();
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let left = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let r = rand(&[b, t, D], 1.0, &mut s);
    let pre = prefix(3, 11, DType::F64);
    let at = [(0, 6), (1, 2), (1, 4), (2, 0), (2, 2)];
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
        let keep = mask.to_dtype(dtype).unwrap().unsqueeze(2).unwrap();
        // cached: columns 0..4, then 4..7; and one column at a time (real positions compared)
        for chunks in [vec![(0, 4), (4, 3)], (0..t).map(|c| (c, 1)).collect()] {
            let mut cache = KvCache::default();
            let mut parts = Vec::new();
            for (c0, n) in chunks {
                let (ep, mp) = (e.narrow(1, c0, n).unwrap(), mask.narrow(1, c0, n).unwrap());
                parts.push(m.forward_cached(&BackboneInput::new(&ep, &mp), &mut cache).unwrap());
            }
            out.push(Tensor::cat(&parts, 1).unwrap().broadcast_mul(&keep).unwrap());
        }
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
        "gemma3 fused vs composed (hidden, shared-prefix gradient, other gradients, inference; \
         again left-padded; cached 4+3, cached 1 by 1; prefixed hidden, gradient, dK/dV per layer; \
         hidden_at, prefixed hidden_at): {}",
        shown.join(" ")
    );
    for (i, e) in errs.iter().enumerate() {
        assert!(*e < 1e-4, "output {i}: fused and composed differ by {e}");
    }
}

/// Mixed-length decoding on the fused path: two sequences (7 and 4 positions) prefilled alone,
/// their caches stacked (the shorter padded at its end, each row keeping its own position), one
/// step for both: each row's hidden state is the one it gets decoding alone, although the slots
/// of the padded row are not its positions (the window counts positions).
#[test]
fn a_stacked_decode_step_windows_each_row_by_its_own_positions() {
    let model = tiny(DType::F32);
    let mut s = 31u64;
    let seqs = [
        rand(&[1, 8, D], 1.0, &mut s).to_dtype(DType::F32).unwrap(),
        rand(&[1, 5, D], 1.0, &mut s).to_dtype(DType::F32).unwrap(),
    ];
    let ones = |n: usize| Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    for e in &seqs {
        let n = e.dim(1).unwrap();
        let mut cache = KvCache::default();
        let prompt = e.narrow(1, 0, n - 1).unwrap();
        model
            .forward_cached(&BackboneInput::new(&prompt, &ones(n - 1)), &mut cache)
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
    for (row, want) in alone.iter().enumerate() {
        let d = max_diff(&both.narrow(0, row, 1).unwrap(), want);
        assert!(d < 1e-5, "row {row}: {d}");
    }
}
