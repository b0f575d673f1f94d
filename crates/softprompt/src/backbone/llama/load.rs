//! Loading a Llama-family model into [`LlamaWeights`]: GGUF files (llama.cpp's names and q/k
//! row order) and Hugging Face directories (config.json + safetensors), the linear weights as
//! tensors or, as [`WeightStorage`] asks, rows in the file's (or a converted) storage.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::Path;

use super::{LlamaConfig, LlamaLayer, LlamaWeights, RopeScaling};
use crate::backbone::frozen_weight::{reorder_rows, Linear, StoredRows, WeightStorage};
use crate::backbone::weights::WeightSource;
use crate::backbone::Shape;
use crate::gguf::GgufFile;

/// Parameter roles, mapped to file-specific tensor names.
#[derive(Clone, Copy)]
enum P {
    Embed,
    Norm,
    Head,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

fn gguf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "token_embd.weight".into(),
        P::Norm => return "output_norm.weight".into(),
        P::Head => return "output.weight".into(),
        P::AttnNorm => "attn_norm.weight",
        P::Q => "attn_q.weight",
        P::K => "attn_k.weight",
        P::V => "attn_v.weight",
        P::QBias => "attn_q.bias",
        P::KBias => "attn_k.bias",
        P::VBias => "attn_v.bias",
        P::O => "attn_output.weight",
        P::FfnNorm => "ffn_norm.weight",
        P::Gate => "ffn_gate.weight",
        P::Up => "ffn_up.weight",
        P::Down => "ffn_down.weight",
    };
    format!("blk.{l}.{s}")
}

fn hf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "model.embed_tokens.weight".into(),
        P::Norm => return "model.norm.weight".into(),
        P::Head => return "lm_head.weight".into(),
        P::AttnNorm => "input_layernorm.weight",
        P::Q => "self_attn.q_proj.weight",
        P::K => "self_attn.k_proj.weight",
        P::V => "self_attn.v_proj.weight",
        P::QBias => "self_attn.q_proj.bias",
        P::KBias => "self_attn.k_proj.bias",
        P::VBias => "self_attn.v_proj.bias",
        P::O => "self_attn.o_proj.weight",
        P::FfnNorm => "post_attention_layernorm.weight",
        P::Gate => "mlp.gate_proj.weight",
        P::Up => "mlp.up_proj.weight",
        P::Down => "mlp.down_proj.weight",
    };
    format!("model.layers.{l}.{s}")
}

/// Undoes llama.cpp's permutation of q/k rows (interleaved → half-split rotary layout):
/// rows `[h, d/2, 2]` → `[h, 2, d/2]`.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let order: Vec<u32> = unpermuted_order(w.dim(0)?, heads)
        .into_iter()
        .map(|r| r as u32)
        .collect();
    Ok(w.index_select(&Tensor::new(order.as_slice(), w.device())?, 0)?)
}

/// The row order that undoes llama.cpp's q/k permutation: row `r` of the result is row
/// `order[r]` of the file's. Within each head, the file interleaves the two rotary halves
/// (rows 0, 2, 4, … are the first half); HF keeps each half contiguous.
fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    (0..rows)
        .map(|r| {
            let (h, j) = (r / hd, r % hd);
            let (half, i) = (j / (hd / 2), j % (hd / 2));
            h * hd + 2 * i + half
        })
        .collect()
}

/// The rotary scaling a GGUF file declares: `{arch}.rope.scaling.type` / `.factor`, and the
/// per-frequency divisors llama.cpp writes as `rope_freqs.weight` for Llama 3 models.
fn gguf_rope_scaling(file: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<RopeScaling> {
    let kind = file.get_str(&key("rope.scaling.type")).ok();
    let factor = file.get_f64(&key("rope.scaling.factor")).ok();
    let divisors = if file.tensors.contains_key("rope_freqs.weight") {
        let t = file.tensor_f32("rope_freqs.weight", &Device::Cpu)?;
        Some(t.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    RopeScaling::from_gguf(kind, factor, divisors, file.path())
}

impl LlamaWeights {
    /// Loads a GGUF file whose `general.architecture` is llama, mistral or qwen2.
    pub fn from_gguf(file: &GgufFile, device: &Device, storage: WeightStorage) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let heads = file.get_usize(&key("attention.head_count"))?;
        let embed_rows = file
            .tensors
            .get("token_embd.weight")
            .map(|e| e.shape[0])
            .with_context(|| format!("{}: tensor `token_embd.weight` is missing", file.path().display()))?;
        let cfg = LlamaConfig {
            shape: Shape {
                layers: file.get_usize(&key("block_count"))?,
                hidden: file.get_usize(&key("embedding_length"))?,
                heads,
                kv_heads: file.get_usize(&key("attention.head_count_kv")).unwrap_or(heads),
                intermediate: file.get_usize(&key("feed_forward_length"))?,
                vocab: file.get_usize(&key("vocab_size")).unwrap_or(embed_rows),
                max_positions: file.get_usize(&key("context_length"))?,
            },
            eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling: gguf_rope_scaling(file, &key)?,
        };
        // llama.cpp permutes q/k rows for the llama architecture only (qwen2 keeps HF's layout).
        let unpermute = arch == "llama" || arch == "mistral";
        Self::read(cfg, file, (gguf_name, unpermute), arch, device, storage)
    }

    /// Loads a Hugging Face directory (`config.json` + safetensors).
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        weights: &dyn WeightSource,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let heads = f.req_usize("num_attention_heads")?;
        let cfg = LlamaConfig {
            shape: Shape {
                layers: f.req_usize("num_hidden_layers")?,
                hidden: f.req_usize("hidden_size")?,
                heads,
                kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                intermediate: f.req_usize("intermediate_size")?,
                vocab: f.req_usize("vocab_size")?,
                max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            },
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: match f.opt_f64("rope_theta")? {
                Some(theta) => theta,
                // transformers 5 keeps it beside the scaling.
                None => config
                    .pointer("/rope_parameters/rope_theta")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(10_000.0),
            },
            rope_scaling: RopeScaling::from_hf_config(config, &dir.join("config.json"))?,
        };
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "llama".to_string());
        Self::read(cfg, weights, (hf_name, false), model_type, device, storage)
    }

    /// Hugging Face-named weights of shape `cfg` (tests, random models), as tensors in the
    /// type they are held in.
    pub fn from_source(cfg: LlamaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::read(
            cfg,
            weights,
            (hf_name, false),
            "llama".into(),
            device,
            WeightStorage::F32,
        )
    }

    fn read(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        (name, unpermute): (fn(P, usize) -> String, bool),
        model_type: String,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let (d, i, kvd) = (cfg.hidden, cfg.intermediate, cfg.kv_dim());
        let get = |p: P, l: usize, shape: &[usize]| w.tensor_shaped(&name(p, l), shape, device);
        let opt = |p: P, l: usize, shape: &[usize]| -> Result<Option<Tensor>> {
            if w.contains(&name(p, l)) {
                get(p, l, shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let embed = get(P::Embed, 0, &[cfg.vocab, d])?;
        // A linear weight, rows reordered where llama.cpp permuted them: a tensor, or (any
        // storage but f32) rows as the file stores them or converted as asked.
        let linear = |p: P, l: usize, shape: [usize; 2], heads: Option<usize>| -> Result<Linear> {
            let rows = |dtype, bytes: &[u8]| {
                StoredRows::from_bytes(dtype, shape[0], shape[1], bytes)
                    .with_context(|| format!("{}: tensor `{}`", w.location().display(), name(p, l)))
            };
            if storage == WeightStorage::F32 || storage.converted_to().is_some() {
                let mut t = get(p, l, &shape)?;
                if let (Some(h), true) = (heads, unpermute) {
                    t = unpermute_rows(&t, h)?;
                }
                return match storage.converted_to() {
                    None => Ok(Linear::Tensor(t)),
                    Some(to) => Ok(Linear::Stored(vec![StoredRows::convert(
                        &t.to_dtype(candle_core::DType::F32)?,
                        to,
                    )
                    .with_context(|| format!("{}: tensor `{}`", w.location().display(), name(p, l)))?])),
                };
            }
            let (dtype, bytes) = w.stored(&name(p, l), &shape)?;
            let bytes = match heads {
                Some(h) if unpermute => Cow::Owned(reorder_rows(&bytes, &unpermuted_order(shape[0], h))),
                _ => bytes,
            };
            Ok(Linear::Stored(vec![rows(dtype, &bytes)?]))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        let mut biases = 0;
        for l in 0..cfg.layers {
            let parts = [
                opt(P::QBias, l, &[d])?,
                opt(P::KBias, l, &[kvd])?,
                opt(P::VBias, l, &[kvd])?,
            ];
            let b_qkv = if parts.iter().any(Option::is_some) {
                let filled: Vec<Tensor> = parts
                    .into_iter()
                    .zip([d, kvd, kvd])
                    .map(|(b, n)| b.map_or_else(|| Tensor::zeros(n, embed.dtype(), device), Ok))
                    .collect::<candle_core::Result<_>>()?;
                biases += d + 2 * kvd;
                Some(Tensor::cat(&filled, 0)?)
            } else {
                None
            };
            layers.push(LlamaLayer {
                attn_norm: get(P::AttnNorm, l, &[d])?,
                w_qkv: stack(vec![
                    linear(P::Q, l, [d, d], Some(cfg.heads))?,
                    linear(P::K, l, [kvd, d], Some(cfg.kv_heads))?,
                    linear(P::V, l, [kvd, d], None)?,
                ])?,
                b_qkv,
                wo: linear(P::O, l, [d, d], None)?,
                ffn_norm: get(P::FfnNorm, l, &[d])?,
                w_gate_up: stack(vec![linear(P::Gate, l, [i, d], None)?, linear(P::Up, l, [i, d], None)?])?,
                w_down: linear(P::Down, l, [d, i], None)?,
            });
        }
        let norm = get(P::Norm, 0, &[d])?;
        let lm_head = opt(P::Head, 0, &[cfg.vocab, d])?;
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed.clone());
        let per_layer = 2 * d + 2 * d * d + 2 * kvd * d + 3 * d * i;
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer + biases;
        Ok(Self {
            info: cfg.model_info(model_type, params, w),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

/// Weights stacked by rows (q, k and v; gate and up): tensors concatenated, stored rows kept
/// as parts (each in the type its file gives it).
fn stack(parts: Vec<Linear>) -> Result<Linear> {
    let mut tensors = Vec::new();
    let mut stored = Vec::new();
    for part in parts {
        match part {
            Linear::Tensor(t) => tensors.push(t),
            Linear::Stored(rows) => stored.extend(rows),
        }
    }
    match (tensors.is_empty(), stored.is_empty()) {
        (false, true) => Ok(Linear::Tensor(Tensor::cat(&tensors, 0)?)),
        (true, false) => Ok(Linear::Stored(stored)),
        _ => anyhow::bail!("a stacked weight mixes tensors and stored rows"),
    }
}
