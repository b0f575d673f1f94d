//! Loading a Llama-family model into [`LlamaWeights`]: GGUF files (llama.cpp's names and q/k
//! row order) and Hugging Face directories (config.json + safetensors), the linear weights as
//! tensors or, as [`WeightStorage`] asks, rows in the file's (or a converted) storage.
//!
//! Qwen3 (`model_type` / `general.architecture` `qwen3`) adds per-head q/k norms (required) and
//! an explicit head width (`head_dim`, GGUF `qwen3.attention.key_length`). A config field that
//! would change the numbers and that this loader does not implement is refused by name
//! ([`refuse_unsupported`]) rather than ignored.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::Path;

use super::{LlamaConfig, LlamaLayer, LlamaWeights, RopeScaling};
use crate::backbone::frozen_weight::{reorder_rows, Linear, StoredRows, WeightStorage};
use crate::backbone::weights::WeightSource;
use crate::backbone::Shape;
use crate::gguf::GgufFile;
use crate::json_fields::JsonFields;

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
    QNorm,
    KNorm,
    O,
    OBias,
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
        P::QNorm => "attn_q_norm.weight",
        P::KNorm => "attn_k_norm.weight",
        P::O => "attn_output.weight",
        P::OBias => "attn_output.bias",
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
        P::QNorm => "self_attn.q_norm.weight",
        P::KNorm => "self_attn.k_norm.weight",
        P::O => "self_attn.o_proj.weight",
        P::OBias => "self_attn.o_proj.bias",
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

/// Whether a model's layers carry Qwen3's per-head q/k norms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QkNorm {
    /// Every layer has them (Qwen3): a missing one is an error naming the tensor.
    Required,
    /// None is read (the other architectures, which have none).
    Absent,
    /// Read where the file has them (random and test models).
    IfPresent,
}

/// How one file names and lays out a Llama-family model's tensors.
struct Layout {
    /// The file's name of a parameter role in a layer.
    name: fn(P, usize) -> String,
    /// Whether q/k rows are in llama.cpp's interleaved rotary order.
    unpermute: bool,
    /// Whether the layers have q/k norms.
    qk_norm: QkNorm,
    /// `tie_word_embeddings` when the file says: `Some(true)` the head is the embedding table
    /// (a stored `lm_head` is ignored, as transformers does), `Some(false)` the head must be
    /// stored; `None`: tied exactly when no head is stored.
    tied: Option<bool>,
}

impl LlamaWeights {
    /// Loads a GGUF file whose `general.architecture` is llama, mistral, qwen2 or qwen3.
    pub fn from_gguf(file: &GgufFile, device: &Device, storage: WeightStorage) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let heads = file.get_usize(&key("attention.head_count"))?;
        let hidden = file.get_usize(&key("embedding_length"))?;
        let embed_rows = file
            .tensors
            .get("token_embd.weight")
            .map(|e| e.shape[0])
            .with_context(|| format!("{}: tensor `token_embd.weight` is missing", file.path().display()))?;
        // llama.cpp writes the head width as the key length when it is not hidden / heads.
        let head_dim = match file.get_usize(&key("attention.key_length")) {
            Ok(n) => n,
            Err(_) => hidden.checked_div(heads).unwrap_or(0),
        };
        if let Ok(v) = file.get_usize(&key("attention.value_length")) {
            if v != head_dim {
                bail!(
                    "{}: `{}` {v} differs from the key length {head_dim}; keys and values of \
                     different widths are not supported",
                    file.path().display(),
                    key("attention.value_length")
                );
            }
        }
        let cfg = LlamaConfig {
            shape: Shape {
                layers: file.get_usize(&key("block_count"))?,
                hidden,
                heads,
                kv_heads: file.get_usize(&key("attention.head_count_kv")).unwrap_or(heads),
                head_dim,
                intermediate: file.get_usize(&key("feed_forward_length"))?,
                vocab: file.get_usize(&key("vocab_size")).unwrap_or(embed_rows),
                max_positions: file.get_usize(&key("context_length"))?,
            },
            eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling: gguf_rope_scaling(file, &key)?,
        };
        // llama.cpp permutes q/k rows for the llama architecture only (qwen2 and qwen3 keep HF's
        // half-split layout: their rotation is llama.cpp's NEOX type).
        let layout = Layout {
            name: gguf_name,
            unpermute: arch == "llama" || arch == "mistral",
            qk_norm: if arch == "qwen3" {
                QkNorm::Required
            } else {
                QkNorm::Absent
            },
            tied: None,
        };
        Self::read(cfg, file, layout, arch, device, storage)
    }

    /// Loads a Hugging Face directory (`config.json` + safetensors) of a llama, mistral, qwen2
    /// or qwen3 model.
    pub fn from_hf(
        dir: &Path,
        config: &serde_json::Value,
        weights: &dyn WeightSource,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let path = dir.join("config.json");
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "llama".to_string());
        let heads = f.req_usize("num_attention_heads")?;
        let hidden = f.req_usize("hidden_size")?;
        let max_positions = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let window = refuse_unsupported(&f, &model_type, &path)?;
        let cfg = LlamaConfig {
            shape: Shape {
                layers: f.req_usize("num_hidden_layers")?,
                hidden,
                heads,
                kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                // transformers: `getattr(config, "head_dim", hidden_size // num_attention_heads)`.
                head_dim: match f.opt_usize("head_dim")? {
                    Some(n) => n,
                    None => hidden.checked_div(heads).unwrap_or(0),
                },
                intermediate: f.req_usize("intermediate_size")?,
                vocab: f.req_usize("vocab_size")?,
                // A sliding window no shorter than the sequence changes nothing: sequences
                // stop at the window.
                max_positions: window.map_or(max_positions, |w| w.min(max_positions)),
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
            rope_scaling: RopeScaling::from_hf_config(config, &path)?,
        };
        cfg.validate(&path)?;
        let layout = Layout {
            name: hf_name,
            unpermute: false,
            qk_norm: if model_type == "qwen3" {
                QkNorm::Required
            } else {
                QkNorm::Absent
            },
            tied: f.opt_bool("tie_word_embeddings")?,
        };
        Self::read(cfg, weights, layout, model_type, device, storage)
    }

    /// Hugging Face-named weights of shape `cfg` (tests, random models), as tensors in the
    /// type they are held in; q/k norms (`self_attn.q_norm.weight`, Qwen3) are read where the
    /// source has them.
    pub fn from_source(cfg: LlamaConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        let layout = Layout {
            name: hf_name,
            unpermute: false,
            qk_norm: QkNorm::IfPresent,
            tied: None,
        };
        let model_type = if weights.contains(&hf_name(P::QNorm, 0)) {
            "qwen3"
        } else {
            "llama"
        };
        Self::read(cfg, weights, layout, model_type.into(), device, WeightStorage::F32)
    }

    fn read(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        layout: Layout,
        model_type: String,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let Layout {
            name,
            unpermute,
            qk_norm,
            tied,
        } = layout;
        let (d, i, qd, kvd, hd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim());
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
        // A q/k norm gain `[head_dim]`, in the rotary order the rows were brought to.
        let head_norm = |p: P, l: usize| -> Result<Option<Tensor>> {
            let t = match qk_norm {
                QkNorm::Absent => return Ok(None),
                QkNorm::Required => get(p, l, &[hd])?,
                QkNorm::IfPresent => match opt(p, l, &[hd])? {
                    Some(t) => t,
                    None => return Ok(None),
                },
            };
            Ok(Some(if unpermute { unpermute_rows(&t, 1)? } else { t }))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        let mut extra = 0;
        for l in 0..cfg.layers {
            if w.contains(&name(P::OBias, l)) {
                bail!(
                    "{}: tensor `{}`: a bias of the attention's output projection is not supported",
                    w.location().display(),
                    name(P::OBias, l)
                );
            }
            let parts = [
                opt(P::QBias, l, &[qd])?,
                opt(P::KBias, l, &[kvd])?,
                opt(P::VBias, l, &[kvd])?,
            ];
            let b_qkv = if parts.iter().any(Option::is_some) {
                let filled: Vec<Tensor> = parts
                    .into_iter()
                    .zip([qd, kvd, kvd])
                    .map(|(b, n)| b.map_or_else(|| Tensor::zeros(n, embed.dtype(), device), Ok))
                    .collect::<candle_core::Result<_>>()?;
                extra += qd + 2 * kvd;
                Some(Tensor::cat(&filled, 0)?)
            } else {
                None
            };
            let (q_norm, k_norm) = (head_norm(P::QNorm, l)?, head_norm(P::KNorm, l)?);
            if q_norm.is_some() != k_norm.is_some() {
                bail!(
                    "{}: layer {l} has only one of `{}` and `{}`",
                    w.location().display(),
                    name(P::QNorm, l),
                    name(P::KNorm, l)
                );
            }
            extra += if q_norm.is_some() { 2 * hd } else { 0 };
            layers.push(LlamaLayer {
                attn_norm: get(P::AttnNorm, l, &[d])?,
                w_qkv: stack(vec![
                    linear(P::Q, l, [qd, d], Some(cfg.heads))?,
                    linear(P::K, l, [kvd, d], Some(cfg.kv_heads))?,
                    linear(P::V, l, [kvd, d], None)?,
                ])?,
                b_qkv,
                q_norm,
                k_norm,
                wo: linear(P::O, l, [d, qd], None)?,
                ffn_norm: get(P::FfnNorm, l, &[d])?,
                w_gate_up: stack(vec![linear(P::Gate, l, [i, d], None)?, linear(P::Up, l, [i, d], None)?])?,
                w_down: linear(P::Down, l, [d, i], None)?,
            });
        }
        let qk_norm = layers.first().is_some_and(|l| l.q_norm.is_some());
        if layers.iter().any(|l| l.q_norm.is_some() != qk_norm) {
            bail!(
                "{}: some layers have q/k norms (`{}`) and others not",
                w.location().display(),
                name(P::QNorm, 0)
            );
        }
        let norm = get(P::Norm, 0, &[d])?;
        let lm_head = match tied {
            Some(true) => None,
            Some(false) => Some(get(P::Head, 0, &[cfg.vocab, d]).with_context(|| {
                format!(
                    "{}: `tie_word_embeddings` is false, so the vocabulary head `{}` must be stored",
                    w.location().display(),
                    name(P::Head, 0)
                )
            })?),
            None => opt(P::Head, 0, &[cfg.vocab, d])?,
        };
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed.clone());
        let per_layer = 2 * d + qd * d + 2 * kvd * d + d * qd + 3 * d * i;
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer + extra;
        Ok(Self {
            info: cfg.model_info(
                model_type,
                (qk_norm, tied, layers.iter().any(|l| l.b_qkv.is_some())),
                params,
                w,
            ),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

/// Refuses the `config.json` fields of a Llama-family model that would change its numbers and
/// that this implementation does not follow, naming the field (`path` names the file). Returns
/// the sliding window that applies to every layer (Mistral's `sliding_window`), which the
/// caller turns into the context length: within it, a window masks nothing.
fn refuse_unsupported(f: &JsonFields, model_type: &str, path: &Path) -> Result<Option<usize>> {
    let shown = path.display();
    if let Some(act) = f.opt_str("hidden_act")? {
        if act != "silu" {
            bail!("{shown}: field `hidden_act` is `{act}`; only `silu` is supported in this family");
        }
    }
    if f.opt_bool("mlp_bias")? == Some(true) {
        bail!("{shown}: field `mlp_bias` is true; biases of the MLP projections are not supported");
    }
    // Qwen2 has q/k/v biases whatever `attention_bias` says (read from the file); in the other
    // models `attention_bias` adds an output-projection bias too.
    if model_type != "qwen2" && f.opt_bool("attention_bias")? == Some(true) {
        bail!("{shown}: field `attention_bias` is true; the output projection's bias it adds is not supported");
    }
    if let Some(p) = f.opt_f64("partial_rotary_factor")? {
        if p != 1.0 {
            bail!("{shown}: field `partial_rotary_factor` is {p}; only full rotation (1.0) is supported");
        }
    }
    if f.opt_bool("use_sliding_window")? == Some(true) {
        bail!(
            "{shown}: field `use_sliding_window` is true; sliding-window attention (in the layers \
             from `max_window_layers` on) is not supported"
        );
    }
    // Qwen's configs keep `sliding_window` (and `layer_types` naming sliding layers) beside
    // `use_sliding_window: false`, which turns the window off (transformers' Qwen2/Qwen3 configs);
    // Llama ignores both; Mistral applies `sliding_window` to every layer.
    if model_type.starts_with("qwen") {
        return Ok(None);
    }
    f.opt_usize("sliding_window")
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
