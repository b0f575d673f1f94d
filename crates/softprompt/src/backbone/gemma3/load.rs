//! Loading a Gemma 3 text model into [`Gemma3Weights`]: Hugging Face directories (`config.json`
//! with `model_type` `gemma3_text` + safetensors; norms stored as `w`, their gain `1 + w`) and
//! GGUF files (`general.architecture` `gemma3`, llama.cpp's names; norms stored as `1 + w`
//! already). The linear weights load as tensors or, as [`WeightStorage`] asks, rows in the
//! file's (or a converted) storage.
//!
//! Every `config.json` field that changes the numbers is either followed or refused by name
//! (`gemma3/config.rs`); GGUF metadata likewise.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::Path;

use super::config::{gguf_layer_kinds, hf_layer_kinds, hf_rotary, refuse_unsupported};
use super::{model_info, AttentionKind, Gemma3Config, Gemma3Layer, Gemma3Weights, Rotary};
use crate::backbone::frozen_weight::{Linear, StoredRows, WeightStorage};
use crate::backbone::llama::RopeScaling;
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
    QNorm,
    KNorm,
    O,
    PostAttnNorm,
    PreFfnNorm,
    Gate,
    Up,
    Down,
    PostFfnNorm,
}

/// llama.cpp's tensor names (`convert_hf_to_gguf.py`, Gemma3Model).
fn gguf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "token_embd.weight".into(),
        P::Norm => return "output_norm.weight".into(),
        P::Head => return "output.weight".into(),
        P::AttnNorm => "attn_norm.weight",
        P::Q => "attn_q.weight",
        P::K => "attn_k.weight",
        P::V => "attn_v.weight",
        P::QNorm => "attn_q_norm.weight",
        P::KNorm => "attn_k_norm.weight",
        P::O => "attn_output.weight",
        P::PostAttnNorm => "post_attention_norm.weight",
        P::PreFfnNorm => "ffn_norm.weight",
        P::Gate => "ffn_gate.weight",
        P::Up => "ffn_up.weight",
        P::Down => "ffn_down.weight",
        P::PostFfnNorm => "post_ffw_norm.weight",
    };
    format!("blk.{l}.{s}")
}

/// transformers' names (`Gemma3ForCausalLM`).
fn hf_name(p: P, l: usize) -> String {
    let s = match p {
        P::Embed => return "model.embed_tokens.weight".into(),
        P::Norm => return "model.norm.weight".into(),
        P::Head => return "lm_head.weight".into(),
        P::AttnNorm => "input_layernorm.weight",
        P::Q => "self_attn.q_proj.weight",
        P::K => "self_attn.k_proj.weight",
        P::V => "self_attn.v_proj.weight",
        P::QNorm => "self_attn.q_norm.weight",
        P::KNorm => "self_attn.k_norm.weight",
        P::O => "self_attn.o_proj.weight",
        P::PostAttnNorm => "post_attention_layernorm.weight",
        P::PreFfnNorm => "pre_feedforward_layernorm.weight",
        P::Gate => "mlp.gate_proj.weight",
        P::Up => "mlp.up_proj.weight",
        P::Down => "mlp.down_proj.weight",
        P::PostFfnNorm => "post_feedforward_layernorm.weight",
    };
    format!("model.layers.{l}.{s}")
}

/// How one file names a Gemma 3's tensors and stores its norms.
struct Layout {
    /// The file's name of a parameter role in a layer.
    name: fn(P, usize) -> String,
    /// Whether norm weights are stored as `w` (Hugging Face: the gain is `1 + w`) rather than
    /// as the gain itself (GGUF: llama.cpp adds the 1 when converting).
    shift_norms: bool,
    /// `tie_word_embeddings`: `Some(true)` the head is the embedding table, `Some(false)` it
    /// must be stored; `None`: tied exactly when no head is stored.
    tied: Option<bool>,
}

impl Gemma3Weights {
    /// Loads a Hugging Face directory (`config.json` with `model_type` `gemma3_text` +
    /// safetensors).
    pub fn from_hf(
        dir: &Path,
        config: &Value,
        weights: &dyn WeightSource,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let path = dir.join("config.json");
        refuse_unsupported(&f, &path)?;
        let heads = f.req_usize("num_attention_heads")?;
        let layers = f.req_usize("num_hidden_layers")?;
        let cfg = Gemma3Config {
            shape: Shape {
                layers,
                hidden: f.req_usize("hidden_size")?,
                heads,
                kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                // transformers' Gemma3TextConfig default.
                head_dim: f.opt_usize("head_dim")?.unwrap_or(256),
                intermediate: f.req_usize("intermediate_size")?,
                vocab: f.req_usize("vocab_size")?,
                max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
            },
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            query_pre_attn_scalar: f.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0),
            sliding_window: match config.get("sliding_window") {
                None => 4096,
                Some(v) if v.is_null() => 0,
                Some(_) => f.req_usize("sliding_window")?,
            },
            layer_kinds: hf_layer_kinds(&f, config, layers, &path)?,
            global_rope: hf_rotary(config, AttentionKind::Global, &path)?,
            local_rope: hf_rotary(config, AttentionKind::Sliding, &path)?,
        };
        if cfg.sliding_window == 0 && cfg.layer_kinds.contains(&AttentionKind::Sliding) {
            bail!(
                "{}: field `sliding_window` is null but `layer_types` has sliding-window layers",
                path.display()
            );
        }
        cfg.validate(&path)?;
        let layout = Layout {
            name: hf_name,
            shift_norms: true,
            tied: Some(f.opt_bool("tie_word_embeddings")?.unwrap_or(true)),
        };
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "gemma3_text".into());
        Self::read(cfg, weights, layout, model_type, device, storage)
    }

    /// Loads a GGUF file whose `general.architecture` is `gemma3`. llama.cpp writes no
    /// `query_pre_attn_scalar`, no local rotary base and no layer pattern for Gemma 3; it uses
    /// `head_dim` (hidden / heads for the 62-layer 27B model), 10 000 and every 6th layer global,
    /// and so does this loader unless the file says otherwise
    /// (`gemma3.attention.scale`, `gemma3.rope.freq_base_swa`,
    /// `gemma3.attention.sliding_window_pattern`).
    pub fn from_gguf(file: &GgufFile, device: &Device, storage: WeightStorage) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let shown = file.path().display();
        for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if file.metadata.contains_key(&key(k)) {
                bail!(
                    "{shown}: metadata `{}` is set; logit soft-capping is not supported",
                    key(k)
                );
            }
        }
        let heads = file.get_usize(&key("attention.head_count"))?;
        let hidden = file.get_usize(&key("embedding_length"))?;
        let layers = file.get_usize(&key("block_count"))?;
        let embed_rows = file
            .tensors
            .get("token_embd.weight")
            .map(|e| e.shape[0])
            .with_context(|| format!("{shown}: tensor `token_embd.weight` is missing"))?;
        let head_dim = match file.get_usize(&key("attention.key_length")) {
            Ok(n) => n,
            Err(_) => hidden.checked_div(heads).unwrap_or(0),
        };
        if let Ok(v) = file.get_usize(&key("attention.value_length")) {
            if v != head_dim {
                bail!(
                    "{shown}: `{}` {v} differs from the key length {head_dim}; keys and values of \
                     different widths are not supported",
                    key("attention.value_length")
                );
            }
        }
        let query_pre_attn_scalar = match file.get_f64(&key("attention.scale")) {
            Ok(s) if s > 0.0 => 1.0 / (s * s),
            Ok(s) => bail!(
                "{shown}: metadata `{}` is {s}; it must be positive",
                key("attention.scale")
            ),
            // llama.cpp: 1/sqrt(hidden / heads) for the 27B model (62 layers), else 1/sqrt(head_dim).
            Err(_) if layers == 62 => hidden as f64 / heads.max(1) as f64,
            Err(_) => head_dim as f64,
        };
        let kind = file.get_str(&key("rope.scaling.type")).ok();
        let factor = file.get_f64(&key("rope.scaling.factor")).ok();
        if file.tensors.contains_key("rope_freqs.weight") {
            bail!("{shown}: tensor `rope_freqs.weight` (per-frequency rotary divisors) is not supported for gemma3");
        }
        let cfg = Gemma3Config {
            shape: Shape {
                layers,
                hidden,
                heads,
                kv_heads: file.get_usize(&key("attention.head_count_kv")).unwrap_or(heads),
                head_dim,
                intermediate: file.get_usize(&key("feed_forward_length"))?,
                vocab: file.get_usize(&key("vocab_size")).unwrap_or(embed_rows),
                max_positions: file.get_usize(&key("context_length"))?,
            },
            eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            query_pre_attn_scalar,
            sliding_window: file.get_usize(&key("attention.sliding_window"))?,
            layer_kinds: gguf_layer_kinds(file, &key("attention.sliding_window_pattern"), layers)?,
            global_rope: Rotary {
                theta: file.get_f64(&key("rope.freq_base")).unwrap_or(1_000_000.0),
                scaling: RopeScaling::from_gguf(kind, factor, None, file.path())?,
            },
            local_rope: Rotary {
                theta: file.get_f64(&key("rope.freq_base_swa")).unwrap_or(10_000.0),
                scaling: RopeScaling::None,
            },
        };
        let layout = Layout {
            name: gguf_name,
            shift_norms: false,
            tied: None,
        };
        Self::read(cfg, file, layout, arch, device, storage)
    }

    /// Hugging Face-named weights of shape `cfg` (tests, random models) as tensors in the type
    /// they are held in; norms stored as transformers stores them (`w`, the gain `1 + w`), the
    /// head tied unless `lm_head.weight` is present.
    pub fn from_source(cfg: Gemma3Config, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        let layout = Layout {
            name: hf_name,
            shift_norms: true,
            tied: None,
        };
        Self::read(cfg, weights, layout, "gemma3_text".into(), device, WeightStorage::F32)
    }

    fn read(
        cfg: Gemma3Config,
        w: &dyn WeightSource,
        layout: Layout,
        model_type: String,
        device: &Device,
        storage: WeightStorage,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let Layout {
            name,
            shift_norms,
            tied,
        } = layout;
        let (d, i, qd, kvd, hd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let get = |p: P, l: usize, shape: &[usize]| w.tensor_shaped(&name(p, l), shape, device);
        // A norm's gain: `1 + w` computed in the weight's type (f32 from model files), as
        // transformers' `1.0 + self.weight.float()`.
        let gain = |p: P, l: usize, n: usize| -> Result<Tensor> {
            let t = get(p, l, &[n])?;
            Ok(if shift_norms { t.affine(1.0, 1.0)? } else { t })
        };
        let linear = |p: P, l: usize, shape: [usize; 2]| -> Result<Linear> {
            let named = || format!("{}: tensor `{}`", w.location().display(), name(p, l));
            if storage == WeightStorage::F32 {
                return Ok(Linear::Tensor(get(p, l, &shape)?));
            }
            if let Some(to) = storage.converted_to() {
                let t = get(p, l, &shape)?.to_dtype(DType::F32)?;
                return Ok(Linear::Stored(vec![StoredRows::convert(&t, to).with_context(named)?]));
            }
            let (dtype, bytes) = w.stored(&name(p, l), &shape)?;
            Ok(Linear::Stored(vec![StoredRows::from_bytes(
                dtype, shape[0], shape[1], &bytes,
            )
            .with_context(named)?]))
        };
        let embed = get(P::Embed, 0, &[cfg.vocab, d])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for (l, &kind) in cfg.layer_kinds.iter().enumerate() {
            layers.push(Gemma3Layer {
                kind,
                attn_norm: gain(P::AttnNorm, l, d)?,
                w_qkv: stack(vec![
                    linear(P::Q, l, [qd, d])?,
                    linear(P::K, l, [kvd, d])?,
                    linear(P::V, l, [kvd, d])?,
                ])?,
                q_norm: gain(P::QNorm, l, hd)?,
                k_norm: gain(P::KNorm, l, hd)?,
                wo: linear(P::O, l, [d, qd])?,
                post_attn_norm: gain(P::PostAttnNorm, l, d)?,
                pre_ffn_norm: gain(P::PreFfnNorm, l, d)?,
                w_gate_up: stack(vec![linear(P::Gate, l, [i, d])?, linear(P::Up, l, [i, d])?])?,
                w_down: linear(P::Down, l, [d, i])?,
                post_ffn_norm: gain(P::PostFfnNorm, l, d)?,
            });
        }
        let norm = gain(P::Norm, 0, d)?;
        let lm_head = match tied {
            Some(true) => None,
            Some(false) => Some(get(P::Head, 0, &[cfg.vocab, d]).with_context(|| {
                format!(
                    "{}: `tie_word_embeddings` is false, so the vocabulary head `{}` must be stored",
                    w.location().display(),
                    name(P::Head, 0)
                )
            })?),
            None if w.contains(&name(P::Head, 0)) => Some(get(P::Head, 0, &[cfg.vocab, d])?),
            None => None,
        };
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed.clone());
        let per_layer = 4 * d + qd * d + 2 * kvd * d + d * qd + 2 * hd + 3 * d * i;
        let params = cfg.vocab * d * if tied { 1 } else { 2 } + d + cfg.layers * per_layer;
        Ok(Self {
            info: model_info(&cfg, model_type, tied, params, w),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

/// Weights stacked by rows (q, k and v; gate and up): tensors concatenated, stored rows kept
/// as parts.
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
        _ => bail!("a stacked weight mixes tensors and stored rows"),
    }
}
