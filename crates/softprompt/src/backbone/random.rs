//! Random-weight models of any size, for benchmarks (how cost grows with width) and tests.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

use super::llama::{LlamaConfig, LlamaWeights};
use super::weights::MemoryWeights;

/// The weights of a Llama of shape `cfg`, uniform random in ±`0.02·√3` (std 0.02, as Llama's
/// initialiser) with unit norm gains, from a fixed seed (f32); [`super::llama::build`] runs them.
pub fn random_llama(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<LlamaWeights> {
    random_weights(cfg, false, seed, device)
}

/// [`random_llama`] with Qwen3's per-head q/k norms (unit gains) in every layer; `cfg.head_dim`
/// may differ from `hidden / heads`.
pub fn random_qwen3(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<LlamaWeights> {
    random_weights(cfg, true, seed, device)
}

fn random_weights(cfg: LlamaConfig, qk_norm: bool, seed: u64, device: &Device) -> Result<LlamaWeights> {
    let mut state = seed;
    let mut rand = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.0346
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    };
    let (d, i, qd, kvd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim());
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), rand(&[cfg.vocab, d])?);
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(d, candle_core::DType::F32, device)?,
    );
    for l in 0..cfg.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            t.insert(p(n), Tensor::ones(d, candle_core::DType::F32, device)?);
        }
        t.insert(p("self_attn.q_proj.weight"), rand(&[qd, d])?);
        t.insert(p("self_attn.k_proj.weight"), rand(&[kvd, d])?);
        t.insert(p("self_attn.v_proj.weight"), rand(&[kvd, d])?);
        t.insert(p("self_attn.o_proj.weight"), rand(&[d, qd])?);
        if qk_norm {
            for n in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                t.insert(p(n), Tensor::ones(cfg.head_dim, candle_core::DType::F32, device)?);
            }
        }
        t.insert(p("mlp.gate_proj.weight"), rand(&[i, d])?);
        t.insert(p("mlp.up_proj.weight"), rand(&[i, d])?);
        t.insert(p("mlp.down_proj.weight"), rand(&[d, i])?);
    }
    let w = MemoryWeights {
        tensors: t,
        origin: PathBuf::from("random-llama"),
    };
    LlamaWeights::from_source(cfg, &w, device)
}
