//! Loading a Llama-family model: GGUF files (llama.cpp's names and q/k row order) and Hugging
//! Face directories (config.json + safetensors), into the composed tensors or the fused rows.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

use super::{rope_tables, Layer, Llama, LlamaConfig};
use crate::backbone::llama_fused::{FusedLayer, FusedLlama};
use crate::backbone::weights::WeightSource;
use crate::backbone::{Arch, ModelInfo};
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
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl Llama {
    /// Loads a GGUF file whose `general.architecture` is llama, mistral or qwen2.
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let heads = file.get_usize(&key("attention.head_count"))?;
        let embed_rows = file
            .tensors
            .get("token_embd.weight")
            .map(|e| e.shape[0])
            .with_context(|| format!("{}: tensor `token_embd.weight` is missing", file.path().display()))?;
        let cfg = LlamaConfig {
            layers: file.get_usize(&key("block_count"))?,
            hidden: file.get_usize(&key("embedding_length"))?,
            heads,
            kv_heads: file.get_usize(&key("attention.head_count_kv")).unwrap_or(heads),
            intermediate: file.get_usize(&key("feed_forward_length"))?,
            vocab: file.get_usize(&key("vocab_size")).unwrap_or(embed_rows),
            eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            max_positions: file.get_usize(&key("context_length"))?,
        };
        // llama.cpp permutes q/k rows for the llama architecture only (qwen2 keeps HF's layout).
        let unpermute = arch == "llama" || arch == "mistral";
        Self::build(cfg, file, gguf_name, unpermute, arch, device)
    }

    /// Loads a Hugging Face directory (`config.json` + safetensors).
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let heads = f.req_usize("num_attention_heads")?;
        let cfg = LlamaConfig {
            layers: f.req_usize("num_hidden_layers")?,
            hidden: f.req_usize("hidden_size")?,
            heads,
            kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            intermediate: f.req_usize("intermediate_size")?,
            vocab: f.req_usize("vocab_size")?,
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        };
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "llama".to_string());
        Self::build(cfg, weights, hf_name, false, model_type, device)
    }

    /// Builds a model from Hugging Face-named weights and an explicit configuration.
    pub fn from_weights(cfg: LlamaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::build(cfg, weights, hf_name, false, "llama".into(), device)
    }

    fn build(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        name: fn(P, usize) -> String,
        unpermute: bool,
        model_type: String,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let (d, hd, i) = (cfg.hidden, cfg.head_dim(), cfg.intermediate);
        let kvd = cfg.kv_heads * hd;
        let get = |p: P, l: usize, shape: &[usize]| w.tensor_shaped(&name(p, l), shape, device);
        let opt = |p: P, l: usize, shape: &[usize]| -> Result<Option<Tensor>> {
            if w.contains(&name(p, l)) {
                get(p, l, shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let embed = get(P::Embed, 0, &[cfg.vocab, d])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut wq = get(P::Q, l, &[d, d])?;
            let mut wk = get(P::K, l, &[kvd, d])?;
            if unpermute {
                wq = unpermute_rows(&wq, cfg.heads)?;
                wk = unpermute_rows(&wk, cfg.kv_heads)?;
            }
            let wv = get(P::V, l, &[kvd, d])?;
            let biases = [
                opt(P::QBias, l, &[d])?,
                opt(P::KBias, l, &[kvd])?,
                opt(P::VBias, l, &[kvd])?,
            ];
            let b_qkv = if biases.iter().any(Option::is_some) {
                let filled: Vec<Tensor> = biases
                    .into_iter()
                    .zip([d, kvd, kvd])
                    .map(|(b, n)| b.map_or_else(|| Tensor::zeros(n, embed.dtype(), device), Ok))
                    .collect::<candle_core::Result<_>>()?;
                Some(Tensor::cat(&filled, 0)?)
            } else {
                None
            };
            let gate = get(P::Gate, l, &[i, d])?;
            let up = get(P::Up, l, &[i, d])?;
            layers.push(Layer {
                attn_norm: get(P::AttnNorm, l, &[d])?,
                w_qkv: Tensor::cat(&[&wq, &wk, &wv], 0)?,
                b_qkv,
                wo: get(P::O, l, &[d, d])?,
                ffn_norm: get(P::FfnNorm, l, &[d])?,
                w_gate_up: Tensor::cat(&[&gate, &up], 0)?,
                w_down: get(P::Down, l, &[d, i])?,
            });
        }
        let norm = get(P::Norm, 0, &[d])?;
        let lm_head = opt(P::Head, 0, &[cfg.vocab, d])?;
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed.clone());
        let per_layer = 2 * d + 2 * d * d + 2 * kvd * d + 3 * d * i;
        let biases: usize = layers
            .iter()
            .filter_map(|l| l.b_qkv.as_ref())
            .map(Tensor::elem_count)
            .sum();
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer + biases;
        let (cos, sin) = rope_tables(&cfg, embed.dtype(), device)?;
        let fused = if crate::backbone::fused::applies(device, embed.dtype()) {
            Some(Self::fuse(&cfg, std::mem::take(&mut layers), &norm, &cos, &sin)?)
        } else {
            None
        };
        let info = ModelInfo {
            arch: Arch::Llama,
            model_type,
            source: w.location().to_path_buf(),
            layers: cfg.layers,
            hidden: d,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            intermediate: i,
            vocab: cfg.vocab,
            max_positions: cfg.max_positions,
            params,
            dtypes_on_disk: w.dtype_counts(),
        };
        Ok(Self {
            info,
            cfg,
            embed,
            layers,
            fused,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// Moves the layers' weights into the plain rows the fused CPU kernels read.
    fn fuse(cfg: &LlamaConfig, layers: Vec<Layer>, norm: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<FusedLlama> {
        use crate::backbone::fused::to_vec;
        let layers = layers
            .into_iter()
            .map(|l| {
                Ok(FusedLayer {
                    attn_norm: to_vec(&l.attn_norm)?,
                    w_qkv: to_vec(&l.w_qkv)?,
                    b_qkv: l.b_qkv.as_ref().map(to_vec).transpose()?,
                    wo: to_vec(&l.wo)?,
                    ffn_norm: to_vec(&l.ffn_norm)?,
                    w_gate_up: to_vec(&l.w_gate_up)?,
                    w_down: to_vec(&l.w_down)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(FusedLlama {
            layers,
            norm: to_vec(norm)?,
            cos: to_vec(cos)?,
            sin: to_vec(sin)?,
            hidden: cfg.hidden,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            intermediate: cfg.intermediate,
            eps: cfg.eps as f32,
        })
    }
}
