//! The input-gradient path: d(loss)/d(input embeddings) from `Backbone::backward` equals central
//! finite differences through every layer type (tiny random Llama with GQA, q/k/v bias and
//! padding; tiny random BERT with padding and the pooler), in f64. On the real SmolLM2 the
//! gradient is finite and non-zero wherever it can reach the loss, and exactly zero where the
//! causal mask says it cannot.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::tiny::{rand, tiny_llama, tiny_llama_in};
use softprompt::backbone::bert::{self, BertWeights, ComposedBert};
use softprompt::backbone::weights::MemoryWeights;
use softprompt::backbone::{lm_logits, Backbone, BackboneInput, CausalLm, Encoder, KernelPath, KvCache};
use std::collections::HashMap;
use std::path::PathBuf;

fn tiny_bert() -> ComposedBert {
    ComposedBert::new(tiny_bert_weights(DType::F64)).unwrap()
}

/// The tiny BERT with its weights in `dtype`: f32 on the fused CPU kernels, f64 on the composed
/// candle path.
fn tiny_bert_in(dtype: DType) -> Box<dyn Encoder> {
    let path = if dtype == DType::F32 {
        KernelPath::Fused
    } else {
        KernelPath::Composed
    };
    bert::build(tiny_bert_weights(dtype), path).unwrap()
}

/// The tiny BERT's weights in `dtype`.
fn tiny_bert_weights(dtype: DType) -> BertWeights {
    let config = serde_json::json!({
        "model_type": "bert", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 24, "vocab_size": 20, "max_position_embeddings": 16, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    });
    let t = tiny_bert_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("tiny-bert"),
    };
    BertWeights::from_hf(&PathBuf::from("tiny-bert"), &config, &w, &Device::Cpu).unwrap()
}

/// The tiny BERT's weights (f64): 2 layers, hidden 16, 2 heads, 16 positions.
fn tiny_bert_tensors() -> HashMap<String, Tensor> {
    let mut s = 11u64;
    let mut t = HashMap::new();
    let mut ins = |n: &str, shape: &[usize], scale: f64, shift: f64, s: &mut u64| {
        t.insert(n.to_string(), rand(shape, scale, s).affine(1.0, shift).unwrap());
    };
    ins("embeddings.word_embeddings.weight", &[20, 16], 1.0, 0.0, &mut s);
    ins("embeddings.position_embeddings.weight", &[16, 16], 0.5, 0.0, &mut s);
    ins("embeddings.token_type_embeddings.weight", &[2, 16], 0.5, 0.0, &mut s);
    ins("embeddings.LayerNorm.weight", &[16], 0.3, 1.0, &mut s);
    ins("embeddings.LayerNorm.bias", &[16], 0.3, 0.0, &mut s);
    for l in 0..2 {
        let p = |n: &str| format!("encoder.layer.{l}.{n}");
        for n in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            ins(&p(&format!("{n}.weight")), &[16, 16], 0.5, 0.0, &mut s);
            ins(&p(&format!("{n}.bias")), &[16], 0.2, 0.0, &mut s);
        }
        ins(&p("intermediate.dense.weight"), &[24, 16], 0.5, 0.0, &mut s);
        ins(&p("intermediate.dense.bias"), &[24], 0.2, 0.0, &mut s);
        ins(&p("output.dense.weight"), &[16, 24], 0.5, 0.0, &mut s);
        ins(&p("output.dense.bias"), &[16], 0.2, 0.0, &mut s);
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            ins(&p(&format!("{n}.weight")), &[16], 0.3, 1.0, &mut s);
            ins(&p(&format!("{n}.bias")), &[16], 0.3, 0.0, &mut s);
        }
    }
    ins("pooler.dense.weight", &[16, 16], 0.5, 0.0, &mut s);
    ins("pooler.dense.bias", &[16], 0.2, 0.0, &mut s);
    t
}

/// Scalar loss `Σ R ⊙ f(embeds)` where f is the backbone (and `pooler` when given).
fn loss(model: &dyn Backbone, embeds: &Tensor, mask: &Tensor, r: &Tensor, pooler: Option<&dyn Encoder>) -> f64 {
    let h = model
        .forward(&BackboneInput {
            embeds,
            mask,
            token_types: None,
        })
        .unwrap();
    let out = match pooler {
        Some(p) => p.pool(&h).unwrap(),
        None => h,
    };
    (out * r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
}

fn check_against_finite_differences(model: &dyn Backbone, pooler: Option<&dyn Encoder>) {
    let pooled = pooler.is_some();
    let (b, t, d) = (2, 5, 16);
    let mut s = 3u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    // Row 1 is padded after 3 tokens.
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let r = if pooled {
        rand(&[b, d], 1.0, &mut s)
    } else {
        rand(&[b, t, d], 1.0, &mut s)
    };
    let (h, tape) = model
        .forward_train(&BackboneInput {
            embeds: &embeds,
            mask: &mask,
            token_types: None,
        })
        .unwrap();
    let d_hidden = match pooler {
        Some(p) => p.pool_backward(&h, &r).unwrap(),
        None => r.clone(),
    };
    let grad = model.backward(&tape, &d_hidden).unwrap();
    let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f64> = embeds.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-5;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let f = |v: Vec<f64>| {
            loss(
                model,
                &Tensor::from_vec(v, (b, t, d), &Device::Cpu).unwrap(),
                &mask,
                &r,
                pooler,
            )
        };
        let fd = (f(plus) - f(minus)) / (2.0 * eps);
        let err = (fd - grad[i]).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
    }
    println!("max relative error vs finite differences: {worst:.2e}");
    assert!(worst < 1e-6, "backward disagrees with finite differences: {worst}");
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The fused f32 CPU kernels compute what the composed path computes (itself checked against
/// finite differences above): hidden states, input gradients, and cached forwards, with
/// right padding, left padding and grouped-query attention with q/k/v bias.
#[test]
fn fused_llama_equals_composed_forward_backward_and_cache() {
    let (composed, fused) = (tiny_llama_in(DType::F64), tiny_llama_in(DType::F32));
    let (b, t, d) = (3, 6, 16);
    let mut s = 5u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let r = rand(&[b, t, d], 1.0, &mut s);
    let run = |m: &dyn CausalLm, dtype: DType| {
        let e = embeds.to_dtype(dtype).unwrap();
        let input = BackboneInput {
            embeds: &e,
            mask: &mask,
            token_types: None,
        };
        let (h, tape) = m.forward_train(&input).unwrap();
        let g = m.backward(&tape, &r.to_dtype(dtype).unwrap()).unwrap();
        let plain = m.forward(&input).unwrap();
        // the same rows in two cached chunks: columns 0..4, then 4..6
        let mut cache = KvCache::default();
        let part = |c0: usize, n: usize| (e.narrow(1, c0, n).unwrap(), mask.narrow(1, c0, n).unwrap());
        let (e1, m1) = part(0, 4);
        let (e2, m2) = part(4, 2);
        let h1 = m
            .forward_cached(
                &BackboneInput {
                    embeds: &e1,
                    mask: &m1,
                    token_types: None,
                },
                &mut cache,
            )
            .unwrap();
        let h2 = m
            .forward_cached(
                &BackboneInput {
                    embeds: &e2,
                    mask: &m2,
                    token_types: None,
                },
                &mut cache,
            )
            .unwrap();
        (h, g, plain, Tensor::cat(&[h1, h2], 1).unwrap())
    };
    let (h64, g64, p64, c64) = run(&*composed, DType::F64);
    let (h32, g32, p32, c32) = run(&*fused, DType::F32);
    let keep = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let real = |x: &Tensor| x.to_dtype(DType::F64).unwrap().broadcast_mul(&keep).unwrap();
    let errs = [
        max_diff(&h64, &h32),
        max_diff(&g64, &g32),
        max_diff(&p64, &p32),
        max_diff(&real(&c64), &real(&c32)),
        max_diff(&real(&c32), &real(&h32)),
    ];
    println!(
        "fused vs composed: hidden {:.1e}, gradient {:.1e}, inference {:.1e}, cached {:.1e}; cached vs full {:.1e}",
        errs[0], errs[1], errs[2], errs[3], errs[4]
    );
    for e in errs {
        assert!(e < 1e-4, "fused and composed paths differ by {e}");
    }
}

/// Rows that start with the same embeddings (a prepended prompt) have that prefix computed once by
/// the fused path: the hidden states are unchanged, and the prefix's gradient, summed over rows
/// (what a prompt's gradient is), equals the composed path's.
#[test]
fn fused_llama_shares_a_common_prefix_exactly() {
    let (composed, fused) = (tiny_llama_in(DType::F64), tiny_llama_in(DType::F32));
    let (b, t, d, shared) = (3, 6, 16, 3);
    let mut s = 9u64;
    let prefix = rand(&[1, shared, d], 1.0, &mut s).repeat((b, 1, 1)).unwrap();
    let rest = rand(&[b, t - shared, d], 1.0, &mut s);
    let embeds = Tensor::cat(&[prefix, rest], 1).unwrap();
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let r = rand(&[b, t, d], 1.0, &mut s);
    let run = |m: &dyn CausalLm, dtype: DType| {
        let e = embeds.to_dtype(dtype).unwrap();
        let input = BackboneInput {
            embeds: &e,
            mask: &mask,
            token_types: None,
        };
        let (h, tape) = m.forward_train(&input).unwrap();
        let g = m.backward(&tape, &r.to_dtype(dtype).unwrap()).unwrap();
        let g_prefix = g.narrow(1, 0, shared).unwrap().sum_keepdim(0).unwrap();
        (h, g_prefix, g.narrow(1, shared, t - shared).unwrap())
    };
    let (h64, p64, r64) = run(&*composed, DType::F64);
    let (h32, p32, r32) = run(&*fused, DType::F32);
    let errs = [max_diff(&h64, &h32), max_diff(&p64, &p32), max_diff(&r64, &r32)];
    println!("shared prefix, fused vs composed: hidden {:.1e}, prefix gradient (sum over rows) {:.1e}, other gradients {:.1e}", errs[0], errs[1], errs[2]);
    for e in errs {
        assert!(e < 1e-4, "fused (shared prefix) and composed paths differ by {e}");
    }
}

/// The fused BERT equals the composed one at every real position (padded positions, which no
/// real position attends to, are zero in the fused path), with and without token types.
#[test]
fn fused_bert_equals_composed() {
    let (composed, fused) = (tiny_bert_in(DType::F64), tiny_bert_in(DType::F32));
    let (b, t, d) = (2, 5, 16);
    let mut s = 13u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let types = Tensor::new(&[[0u32, 0, 1, 1, 1], [0, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let keep = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let real = |x: &Tensor| x.to_dtype(DType::F64).unwrap().broadcast_mul(&keep).unwrap();
    let r = real(&rand(&[b, t, d], 1.0, &mut s));
    for token_types in [None, Some(&types)] {
        let run = |m: &dyn Encoder, dtype: DType| {
            let e = embeds.to_dtype(dtype).unwrap();
            let input = BackboneInput {
                embeds: &e,
                mask: &mask,
                token_types,
            };
            let (h, tape) = m.forward_train(&input).unwrap();
            let g = m.backward(&tape, &r.to_dtype(dtype).unwrap()).unwrap();
            let pooled = m.pool(&h).unwrap();
            (real(&h), g, pooled)
        };
        let (h64, g64, p64) = run(&*composed, DType::F64);
        let (h32, g32, p32) = run(&*fused, DType::F32);
        let errs = [max_diff(&h64, &h32), max_diff(&g64, &g32), max_diff(&p64, &p32)];
        println!(
            "fused vs composed BERT: hidden {:.1e}, gradient {:.1e}, pooled {:.1e}",
            errs[0], errs[1], errs[2]
        );
        for e in errs {
            assert!(e < 1e-4, "fused and composed BERT differ by {e}");
        }
    }
}

/// A random one-row key/value prefix of `v` positions for the tiny Llama (2 layers, 2 key/value
/// heads of width 4), in `dtype`.
fn tiny_prefix(v: usize, seed: u64, dtype: DType) -> KvCache {
    tiny_prefix_of(v, 4, seed, dtype)
}

/// A random one-row key/value prefix of `v` positions for 2 layers of 2 key/value heads of width
/// `hd` (4: the tiny Llama, 8: the tiny BERT), in `dtype`.
fn tiny_prefix_of(v: usize, hd: usize, seed: u64, dtype: DType) -> KvCache {
    let mut s = seed;
    let layers = (0..2)
        .map(|_| {
            let k = rand(&[1, 2, v, hd], 1.0, &mut s).to_dtype(dtype).unwrap();
            let val = rand(&[1, 2, v, hd], 1.0, &mut s).to_dtype(dtype).unwrap();
            (k, val)
        })
        .collect();
    KvCache {
        layers,
        mask: Some(Tensor::ones((1, v), DType::F32, &Device::Cpu).unwrap()),
        next_pos: None,
    }
}

/// Largest relative error of `backward_prefixed` against central finite differences (f64) of
/// `loss = Σ r ⊙ f(prefix, embeds)`, where f is `forward_prefixed` (then the pooler, when given):
/// every prefix key/value of every layer, and every 7th input embedding.
fn prefix_gradient_error(
    model: &dyn Backbone,
    pooler: Option<&dyn Encoder>,
    prefix: &KvCache,
    embeds: &Tensor,
    mask: &Tensor,
    r: &Tensor,
) -> f64 {
    let loss = |prefix: &KvCache, embeds: &Tensor| -> f64 {
        let h = model
            .forward_prefixed(&BackboneInput::new(embeds, mask), prefix)
            .unwrap();
        let out = match pooler {
            Some(p) => p.pool(&h).unwrap(),
            None => h,
        };
        (out * r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let (h, tape) = model
        .forward_train_prefixed(&BackboneInput::new(embeds, mask), prefix)
        .unwrap();
    let d_hidden = match pooler {
        Some(p) => p.pool_backward(&h, r).unwrap(),
        None => r.clone(),
    };
    let (d_embeds, d_prefix) = model.backward_prefixed(&tape, &d_hidden).unwrap();
    assert_eq!(d_prefix.len(), prefix.layers.len());
    let eps = 1e-5;
    let mut worst = 0f64;
    for (l, (dk, dv)) in d_prefix.iter().enumerate() {
        for (which, grad) in [dk, dv].into_iter().enumerate() {
            let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            for (i, &g) in grad.iter().enumerate() {
                let bump = |delta: f64| {
                    let mut p = prefix.clone();
                    let t = if which == 0 { &p.layers[l].0 } else { &p.layers[l].1 };
                    let mut vals: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                    vals[i] += delta;
                    let bumped = Tensor::from_vec(vals, t.shape(), &Device::Cpu).unwrap();
                    if which == 0 {
                        p.layers[l].0 = bumped;
                    } else {
                        p.layers[l].1 = bumped;
                    }
                    loss(&p, embeds)
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                worst = worst.max((fd - g).abs() / (1.0 + fd.abs()));
            }
        }
    }
    let base: Vec<f64> = embeds.flatten_all().unwrap().to_vec1().unwrap();
    let grad: Vec<f64> = d_embeds.flatten_all().unwrap().to_vec1().unwrap();
    for i in (0..base.len()).step_by(7) {
        let bump = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            loss(prefix, &Tensor::from_vec(v, embeds.shape(), &Device::Cpu).unwrap())
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        worst = worst.max((fd - grad[i]).abs() / (1.0 + fd.abs()));
    }
    worst
}

/// Prefix tuning's gradient path: d(loss)/d(prefix K/V) of every layer, summed over the rows,
/// equals central finite differences (f64, composed path), and so does the input gradient.
#[test]
fn llama_prefix_gradient_matches_finite_differences() {
    let model = tiny_llama();
    let (b, t, d, v) = (2, 4, 16, 3);
    let mut s = 21u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu).unwrap();
    let r = rand(&[b, t, d], 1.0, &mut s);
    let prefix = tiny_prefix(v, 5, DType::F64);
    let worst = prefix_gradient_error(&model, None, &prefix, &embeds, &mask, &r);
    println!("prefix and input gradients vs finite differences: max relative error {worst:.2e}");
    assert!(
        worst < 1e-6,
        "prefix gradient disagrees with finite differences: {worst}"
    );
}

/// P-tuning v2's gradient path on the tiny BERT with padding: the prefix keys/values of every
/// layer (summed over rows) and the input embeddings, through the pooler and through the hidden
/// states of the real positions, equal central finite differences (f64, composed path).
#[test]
fn bert_prefix_gradient_matches_finite_differences() {
    let model = tiny_bert();
    let (b, t, d, v) = (2, 5, 16, 3);
    let mut s = 23u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let prefix = tiny_prefix_of(v, 8, 7, DType::F64);
    let pooled = rand(&[b, d], 1.0, &mut s);
    let keep = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let hidden = rand(&[b, t, d], 1.0, &mut s).broadcast_mul(&keep).unwrap();
    let through_pooler = prefix_gradient_error(&model, Some(&model), &prefix, &embeds, &mask, &pooled);
    let through_hidden = prefix_gradient_error(&model, None, &prefix, &embeds, &mask, &hidden);
    println!(
        "BERT prefix and input gradients vs finite differences: pooler {through_pooler:.2e}, hidden {through_hidden:.2e}"
    );
    for worst in [through_pooler, through_hidden] {
        assert!(
            worst < 1e-6,
            "BERT prefix gradient disagrees with finite differences: {worst}"
        );
    }
}

/// A BERT prefix moves the input's positions by its length (Hugging Face BERT with
/// `past_key_values`): behind a fully masked prefix, the input gives what the plain forward
/// gives with the position table shifted by the prefix length. A prefix that pushes the input
/// past `max_position_embeddings` is refused with an error naming both lengths.
#[test]
fn bert_prefix_offsets_positions_and_respects_max_positions() {
    let (v, t) = (10, 6);
    let positions = tiny_bert_tensors()["embeddings.position_embeddings.weight"].clone();
    let shift = (positions.narrow(0, v, t).unwrap() - positions.narrow(0, 0, t).unwrap()).unwrap();
    for dtype in [DType::F64, DType::F32] {
        let model = tiny_bert_in(dtype);
        let mut s = 41u64;
        let embeds = rand(&[1, t, 16], 1.0, &mut s);
        let shifted = embeds.broadcast_add(&shift).unwrap().to_dtype(dtype).unwrap();
        let embeds = embeds.to_dtype(dtype).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        // 10 prefix positions + 6 input positions = the tiny model's 16: allowed.
        let mut hidden_prefix = tiny_prefix_of(v, 8, 3, dtype);
        hidden_prefix.mask = Some(Tensor::zeros((1, v), DType::F32, &Device::Cpu).unwrap());
        let input = BackboneInput::new(&embeds, &mask);
        let behind = model.forward_prefixed(&input, &hidden_prefix).unwrap();
        let plain_shifted = model.forward(&BackboneInput::new(&shifted, &mask)).unwrap();
        let err = max_diff(&behind, &plain_shifted);
        assert!(
            err < 1e-5,
            "{dtype:?}: masked prefix vs shifted positions differ by {err}"
        );
        let prefix = tiny_prefix_of(v, 8, 3, dtype);
        let h = model.forward_prefixed(&input, &prefix).unwrap();
        let (h_train, _) = model.forward_train_prefixed(&input, &prefix).unwrap();
        assert!(max_diff(&h, &h_train) < 1e-6);
        assert!(
            max_diff(&h, &behind) > 1e-3,
            "the prefix's keys and values changed nothing"
        );
        let e = model
            .forward_prefixed(&input, &tiny_prefix_of(11, 8, 3, dtype))
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("prefix's 11 positions and the input's 6 positions exceed the model's 16"),
            "{e}"
        );
        let e = model
            .forward_train_prefixed(&input, &tiny_prefix_of(11, 8, 3, dtype))
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{e:#}").contains("max_position_embeddings"), "{e:#}");
        // A prefix for another geometry (head width 4) is refused, not a panic.
        let e = model
            .forward_prefixed(&input, &tiny_prefix_of(2, 4, 3, dtype))
            .unwrap_err();
        assert!(format!("{e:#}").contains("expected [1, 2, 2, 8]"), "{e:#}");
    }
}

/// The fused f32 path gives the composed path's prefix and input gradients.
#[test]
fn fused_llama_prefix_gradient_equals_composed() {
    let (composed, fused) = (tiny_llama_in(DType::F64), tiny_llama_in(DType::F32));
    let (b, t, d, v) = (3, 5, 16, 4);
    let mut s = 31u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], &Device::Cpu).unwrap();
    let r = rand(&[b, t, d], 1.0, &mut s);
    let run = |m: &dyn CausalLm, dtype: DType| {
        let e = embeds.to_dtype(dtype).unwrap();
        let prefix = tiny_prefix(v, 9, dtype);
        let (h, tape) = m
            .forward_train_prefixed(&BackboneInput::new(&e, &mask), &prefix)
            .unwrap();
        let (g, dp) = m.backward_prefixed(&tape, &r.to_dtype(dtype).unwrap()).unwrap();
        let dp: Vec<Tensor> = dp.into_iter().flat_map(|(k, v)| [k, v]).collect();
        (h, g, Tensor::cat(&dp, 0).unwrap())
    };
    let (h64, g64, p64) = run(&*composed, DType::F64);
    let (h32, g32, p32) = run(&*fused, DType::F32);
    let keep = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let real = |x: &Tensor| x.to_dtype(DType::F64).unwrap().broadcast_mul(&keep).unwrap();
    let errs = [
        max_diff(&real(&h64), &real(&h32)),
        max_diff(&g64, &g32),
        max_diff(&p64, &p32),
    ];
    println!(
        "prefix, fused vs composed: hidden {:.1e}, input gradient {:.1e}, prefix gradient {:.1e}",
        errs[0], errs[1], errs[2]
    );
    for e in errs {
        assert!(e < 1e-4, "fused and composed prefix paths differ by {e}");
    }
}

/// The fused f32 BERT gives the composed path's hidden states (real positions), input
/// gradients and per-layer prefix gradients after a key/value prefix, with padding.
#[test]
fn fused_bert_prefix_gradient_equals_composed() {
    let (composed, fused) = (tiny_bert_in(DType::F64), tiny_bert_in(DType::F32));
    let (b, t, d, v) = (3, 5, 16, 4);
    let mut s = 37u64;
    let embeds = rand(&[b, t, d], 1.0, &mut s);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], &Device::Cpu).unwrap();
    let keep = mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let real = |x: &Tensor| x.to_dtype(DType::F64).unwrap().broadcast_mul(&keep).unwrap();
    let r = real(&rand(&[b, t, d], 1.0, &mut s));
    let run = |m: &dyn Encoder, dtype: DType| {
        let e = embeds.to_dtype(dtype).unwrap();
        let prefix = tiny_prefix_of(v, 8, 9, dtype);
        let (h, tape) = m
            .forward_train_prefixed(&BackboneInput::new(&e, &mask), &prefix)
            .unwrap();
        let (g, dp) = m.backward_prefixed(&tape, &r.to_dtype(dtype).unwrap()).unwrap();
        let dp: Vec<Tensor> = dp.into_iter().flat_map(|(k, v)| [k, v]).collect();
        let plain = m.forward_prefixed(&BackboneInput::new(&e, &mask), &prefix).unwrap();
        (
            real(&h),
            g,
            Tensor::cat(&dp, 0).unwrap(),
            real(&plain),
            m.pool(&h).unwrap(),
        )
    };
    let (h64, g64, p64, i64_, c64) = run(&*composed, DType::F64);
    let (h32, g32, p32, i32_, c32) = run(&*fused, DType::F32);
    let errs = [
        max_diff(&h64, &h32),
        max_diff(&g64, &g32),
        max_diff(&p64, &p32),
        max_diff(&i64_, &i32_),
        max_diff(&c64, &c32),
    ];
    println!(
        "BERT prefix, fused vs composed: hidden {:.1e}, input gradient {:.1e}, prefix gradient {:.1e}, inference {:.1e}, pooled {:.1e}",
        errs[0], errs[1], errs[2], errs[3], errs[4]
    );
    for e in errs {
        assert!(e < 1e-4, "fused and composed BERT prefix paths differ by {e}");
    }
}

#[test]
fn llama_input_gradient_matches_finite_differences() {
    check_against_finite_differences(&tiny_llama(), None);
}

#[test]
fn bert_input_gradient_matches_finite_differences() {
    check_against_finite_differences(&tiny_bert(), None);
}

#[test]
fn bert_pooler_gradient_matches_finite_differences() {
    let bert = tiny_bert();
    check_against_finite_differences(&bert, Some(&bert));
}

#[test]
fn smollm2_gradient_reaches_every_position_that_influences_the_loss() {
    let model = common::load_model("smollm2-135m");
    let bb = model.backbone.causal().unwrap();
    let ids = Tensor::new(
        &[[504u32, 3575, 282, 4649, 314, 2], [38634, 314, 260, 3575, 282, 2]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let embeds = bb.embed(&ids).unwrap();
    let (h, tape) = bb
        .forward_train(&BackboneInput {
            embeds: &embeds,
            mask: &mask,
            token_types: None,
        })
        .unwrap();
    // Loss: −log p(target) at position 2 of row 0 and position 5 of row 1.
    let targets = [(0usize, 2usize, 3575u32), (1, 5, 1234)];
    let mut d_hidden = vec![0f32; h.elem_count()];
    let (_, t, dm) = h.dims3().unwrap();
    for &(b, pos, target) in &targets {
        let row = h.i((b, pos)).unwrap().unsqueeze(0).unwrap();
        let logits = lm_logits(bb, &row).unwrap();
        let p: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut dlogits = p;
        dlogits[target as usize] -= 1.0;
        let dl = Tensor::new(dlogits.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let drow: Vec<f32> = dl.matmul(bb.lm_head()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        d_hidden[(b * t + pos) * dm..(b * t + pos + 1) * dm].copy_from_slice(&drow);
    }
    let d_hidden = Tensor::from_vec(d_hidden, h.shape(), &Device::Cpu).unwrap();
    let grad = bb.backward(&tape, &d_hidden).unwrap();
    assert_eq!(grad.dtype(), DType::F32);
    let norms: Vec<Vec<f32>> = grad.sqr().unwrap().sum(2).unwrap().sqrt().unwrap().to_vec2().unwrap();
    for (b, row) in norms.iter().enumerate() {
        let last = targets[b].1;
        for (pos, &n) in row.iter().enumerate() {
            assert!(n.is_finite(), "row {b} position {pos}: gradient is not finite");
            if pos <= last {
                assert!(
                    n > 0.0,
                    "row {b} position {pos} influences the loss but got a zero gradient"
                );
            } else {
                assert_eq!(
                    n, 0.0,
                    "row {b} position {pos} is after the loss position (causal) but got gradient {n}"
                );
            }
        }
    }
}

/// Rows whose caches differ in length, stacked into one batch (padded key slots, each row with
/// its own rotary position), give on the fused path what each row gives alone on the composed
/// path; the composed path refuses such a batch.
#[test]
fn fused_llama_runs_rows_with_their_own_positions() {
    use softprompt::backbone::KvCache;
    let (composed, fused) = (tiny_llama_in(DType::F64), tiny_llama_in(DType::F32));
    let d = 16;
    let mut s = 21u64;
    let lens = [3usize, 5, 2];
    let prompts: Vec<Tensor> = lens.iter().map(|&t| rand(&[1, t, d], 1.0, &mut s)).collect();
    let next = rand(&[3, 1, d], 1.0, &mut s);
    let prefill = |m: &dyn CausalLm, dtype: DType| -> Vec<KvCache> {
        prompts
            .iter()
            .map(|p| {
                let mut c = KvCache::default();
                let e = p.to_dtype(dtype).unwrap();
                let ones = Tensor::ones((1, p.dim(1).unwrap()), DType::U32, &Device::Cpu).unwrap();
                m.forward_cached(&BackboneInput::new(&e, &ones), &mut c).unwrap();
                c
            })
            .collect()
    };
    let one = Tensor::ones((1, 1), DType::U32, &Device::Cpu).unwrap();
    let ones = Tensor::ones((3, 1), DType::U32, &Device::Cpu).unwrap();
    // reference: each row alone on the composed path
    let alone: Vec<Tensor> = prefill(&*composed, DType::F64)
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            let e = next.narrow(0, r, 1).unwrap().to_dtype(DType::F64).unwrap();
            composed.forward_cached(&BackboneInput::new(&e, &one), &mut c).unwrap()
        })
        .collect();
    let caches = prefill(&*fused, DType::F32);
    let mut batch = KvCache::stack(&caches.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(batch.positions(), lens);
    let e = next.to_dtype(DType::F32).unwrap();
    let h = fused
        .forward_cached(&BackboneInput::new(&e, &ones), &mut batch)
        .unwrap();
    assert_eq!(batch.positions(), [4, 6, 3]);
    for (r, a) in alone.iter().enumerate() {
        let err = max_diff(a, &h.narrow(0, r, 1).unwrap());
        assert!(err < 1e-4, "row {r}: fused batch vs composed alone differ by {err}");
    }
    let rows = batch.unstack().unwrap();
    assert_eq!(rows.iter().map(KvCache::len).collect::<Vec<_>>(), [4, 6, 3]);
    // the composed path refuses rows whose positions differ from their key slots
    let caches64 = prefill(&*composed, DType::F64);
    let mut batch64 = KvCache::stack(&caches64.iter().collect::<Vec<_>>()).unwrap();
    let e = next.to_dtype(DType::F64).unwrap();
    let err = composed
        .forward_cached(&BackboneInput::new(&e, &ones), &mut batch64)
        .expect_err("the composed path must refuse per-row positions")
        .to_string();
    assert!(err.contains("fused f32 CPU path"), "{err}");
}
