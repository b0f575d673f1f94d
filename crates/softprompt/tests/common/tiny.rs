//! A tiny random Llama (2 layers, hidden 16, GQA 4/2 heads, q/k/v biases, vocab 20) for the
//! finite-difference tests, and the seeded uniform numbers it is built from.

use candle_core::{DType, Device, Tensor};
use softprompt::backbone::llama::{self, ComposedLlama, LlamaConfig, LlamaWeights};
use softprompt::backbone::weights::MemoryWeights;
use softprompt::backbone::{CausalLm, KernelPath};
use std::collections::HashMap;
use std::path::PathBuf;

/// Uniform numbers in ±`scale` (f64) from a seeded LCG.
pub fn rand(shape: &[usize], scale: f64, seed: &mut u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The tiny Llama in f64 (the composed candle path).
pub fn tiny_llama() -> ComposedLlama {
    ComposedLlama::new(tiny_llama_weights(DType::F64)).unwrap()
}

/// The tiny Llama with its weights in `dtype`: f32 on the fused CPU kernels, f64 on the composed
/// candle path.
pub fn tiny_llama_in(dtype: DType) -> Box<dyn CausalLm> {
    let path = if dtype == DType::F32 {
        KernelPath::Fused
    } else {
        KernelPath::Composed
    };
    llama::build(tiny_llama_weights(dtype), path).unwrap()
}

/// The tiny Llama's weights in `dtype`.
pub fn tiny_llama_weights(dtype: DType) -> LlamaWeights {
    let cfg = LlamaConfig {
        shape: softprompt::backbone::Shape {
            layers: 2,
            hidden: 16,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            intermediate: 24,
            vocab: 20,
            max_positions: 32,
        },
        eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
    };
    let mut s = 7u64;
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[20, 16], 1.0, &mut s));
    t.insert(
        "model.norm.weight".into(),
        rand(&[16], 0.5, &mut s).affine(1.0, 1.0).unwrap(),
    );
    for l in 0..2 {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        t.insert(
            p("input_layernorm.weight"),
            rand(&[16], 0.5, &mut s).affine(1.0, 1.0).unwrap(),
        );
        t.insert(
            p("post_attention_layernorm.weight"),
            rand(&[16], 0.5, &mut s).affine(1.0, 1.0).unwrap(),
        );
        t.insert(p("self_attn.q_proj.weight"), rand(&[16, 16], 0.5, &mut s));
        t.insert(p("self_attn.k_proj.weight"), rand(&[8, 16], 0.5, &mut s));
        t.insert(p("self_attn.v_proj.weight"), rand(&[8, 16], 0.5, &mut s));
        t.insert(p("self_attn.q_proj.bias"), rand(&[16], 0.2, &mut s));
        t.insert(p("self_attn.k_proj.bias"), rand(&[8], 0.2, &mut s));
        t.insert(p("self_attn.v_proj.bias"), rand(&[8], 0.2, &mut s));
        t.insert(p("self_attn.o_proj.weight"), rand(&[16, 16], 0.5, &mut s));
        t.insert(p("mlp.gate_proj.weight"), rand(&[24, 16], 0.5, &mut s));
        t.insert(p("mlp.up_proj.weight"), rand(&[24, 16], 0.5, &mut s));
        t.insert(p("mlp.down_proj.weight"), rand(&[16, 24], 0.5, &mut s));
    }
    let t = t.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("tiny-llama"),
    };
    LlamaWeights::from_source(cfg, &w, &Device::Cpu).unwrap()
}
