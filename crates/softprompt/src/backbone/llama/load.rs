//! Loading a Llama-family model: GGUF files (llama.cpp's names and q/k row order) and Hugging
//! Face directories (config.json + safetensors), into the composed tensors or the fused rows.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::Path;

use super::{rope_tables, Layer, Llama, LlamaConfig};
use crate::backbone::frozen_weight::{reorder_rows, FrozenWeight, StoredRows, WeightStorage};
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

impl Llama {
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
        Self::build(cfg, file, (gguf_name, unpermute), arch, device, storage)
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
        Self::build(cfg, weights, (hf_name, false), model_type, device, storage)
    }

    /// Builds a model from Hugging Face-named weights and an explicit configuration.
    pub fn from_weights(cfg: LlamaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::build(
            cfg,
            weights,
            (hf_name, false),
            "llama".into(),
            device,
            WeightStorage::F32,
        )
    }

    fn build(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        (name, unpermute): (fn(P, usize) -> String, bool),
        model_type: String,
        device: &Device,
        storage: WeightStorage,
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
        let keep_stored = storage != WeightStorage::F32;
        let fused_path = crate::backbone::fused::applies(device, embed.dtype());
        if keep_stored && !fused_path {
            bail!(
                "weights = \"{}\" keeps the weights in less memory for the fused CPU kernels; \
                 it needs device cpu (and SOFTPROMPT_COMPOSED unset)",
                storage.name()
            );
        }
        // A linear weight as the file stores it or converted as asked, rows reordered where
        // llama.cpp permuted them.
        let stored = |p: P, l: usize, shape: [usize; 2], heads: Option<usize>| -> Result<StoredRows> {
            if let Some(to) = storage.converted_to() {
                let mut t = get(p, l, &shape)?;
                if let (Some(h), true) = (heads, unpermute) {
                    t = unpermute_rows(&t, h)?;
                }
                return StoredRows::convert(&t.to_dtype(candle_core::DType::F32)?, to)
                    .with_context(|| format!("{}: tensor `{}`", w.location().display(), name(p, l)));
            }
            let (dtype, bytes) = w.stored(&name(p, l), &shape)?;
            let bytes = match heads {
                Some(h) if unpermute => Cow::Owned(reorder_rows(&bytes, &unpermuted_order(shape[0], h))),
                _ => bytes,
            };
            StoredRows::from_bytes(dtype, shape[0], shape[1], &bytes)
                .with_context(|| format!("{}: tensor `{}`", w.location().display(), name(p, l)))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        let mut stored_layers = Vec::with_capacity(cfg.layers);
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
            if keep_stored {
                use crate::backbone::fused::to_vec;
                stored_layers.push(FusedLayer {
                    attn_norm: to_vec(&get(P::AttnNorm, l, &[d])?)?,
                    w_qkv: FrozenWeight::Stored(vec![
                        stored(P::Q, l, [d, d], Some(cfg.heads))?,
                        stored(P::K, l, [kvd, d], Some(cfg.kv_heads))?,
                        stored(P::V, l, [kvd, d], None)?,
                    ]),
                    b_qkv: b_qkv.as_ref().map(to_vec).transpose()?,
                    wo: FrozenWeight::Stored(vec![stored(P::O, l, [d, d], None)?]),
                    ffn_norm: to_vec(&get(P::FfnNorm, l, &[d])?)?,
                    w_gate_up: FrozenWeight::Stored(vec![
                        stored(P::Gate, l, [i, d], None)?,
                        stored(P::Up, l, [i, d], None)?,
                    ]),
                    w_down: FrozenWeight::Stored(vec![stored(P::Down, l, [d, i], None)?]),
                });
                continue;
            }
            let mut wq = get(P::Q, l, &[d, d])?;
            let mut wk = get(P::K, l, &[kvd, d])?;
            if unpermute {
                wq = unpermute_rows(&wq, cfg.heads)?;
                wk = unpermute_rows(&wk, cfg.kv_heads)?;
            }
            let wv = get(P::V, l, &[kvd, d])?;
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
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer + biases;
        let (cos, sin) = rope_tables(&cfg, embed.dtype(), device)?;
        let fused = match (keep_stored, fused_path) {
            (true, _) => Some(Self::fused_stack(&cfg, stored_layers, &norm, &cos, &sin)?),
            (false, true) => {
                let layers = std::mem::take(&mut layers)
                    .into_iter()
                    .map(Self::fuse_layer)
                    .collect::<Result<_>>()?;
                Some(Self::fused_stack(&cfg, layers, &norm, &cos, &sin)?)
            }
            (false, false) => None,
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

    /// Moves a layer's weights into the f32 layouts the fused CPU kernels read (the linear
    /// weights packed into panels).
    fn fuse_layer(l: Layer) -> Result<FusedLayer> {
        use crate::backbone::fused::to_vec;
        Ok(FusedLayer {
            attn_norm: to_vec(&l.attn_norm)?,
            w_qkv: FrozenWeight::f32(&l.w_qkv)?,
            b_qkv: l.b_qkv.as_ref().map(to_vec).transpose()?,
            wo: FrozenWeight::f32(&l.wo)?,
            ffn_norm: to_vec(&l.ffn_norm)?,
            w_gate_up: FrozenWeight::f32(&l.w_gate_up)?,
            w_down: FrozenWeight::f32(&l.w_down)?,
        })
    }

    /// The fused stack of `layers`, the final norm and the RoPE tables.
    fn fused_stack(
        cfg: &LlamaConfig,
        layers: Vec<FusedLayer>,
        norm: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<FusedLlama> {
        use crate::backbone::fused::to_vec;
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
