//! Loading a GPT-2 into [`Gpt2Weights`]: Hugging Face directories (`config.json` with
//! `model_type` `gpt2` + safetensors, names with or without `transformer.`, Conv1D weights
//! stored `[in, out]` and transposed once here) and GGUF files (`general.architecture` `gpt2`,
//! llama.cpp's names, weights already `[out, in]`, `output.weight` optional).
//!
//! Every `config.json` field that changes the numbers is followed or refused by name; GGUF
//! metadata likewise.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::Value;
use std::path::Path;

use super::{model_info, Gpt2Config, Gpt2Layer, Gpt2Weights};
use crate::backbone::bert::{Dense, Norm};
use crate::backbone::weights::WeightSource;
use crate::backbone::Shape;
use crate::gguf::GgufFile;

/// The activations GPT-2's MLP may name: `gelu_new` and its equal `gelu_pytorch_tanh`.
const ACTIVATIONS: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// A file's name of a part of layer `l` (`ln_1.weight`, `attn.c_attn.bias`, ...), or of the model
/// (layer `None`: `wte.weight`, `wpe.weight`, `ln_f.weight`, `lm_head`).
type Namer = Box<dyn Fn(Option<usize>, &str) -> String>;

/// How one file names and lays out a GPT-2's tensors.
struct Layout {
    /// The names of the parts.
    name: Namer,
    /// Whether linear weights are stored `[in, out]` (transformers' Conv1D).
    conv1d: bool,
    /// `tie_word_embeddings`: `Some(true)` the head is `wte`, `Some(false)` it must be stored;
    /// `None`: tied exactly when no head is stored.
    tied: Option<bool>,
}

/// transformers' names (`GPT2LMHeadModel`, or `GPT2Model` without the `transformer.` prefix).
fn hf_layout(prefix: &'static str, tied: Option<bool>) -> Layout {
    Layout {
        name: Box::new(move |layer, part| match (layer, part) {
            (None, "lm_head") => "lm_head.weight".into(),
            (None, p) => format!("{prefix}{p}"),
            (Some(l), p) => format!("{prefix}h.{l}.{p}"),
        }),
        conv1d: true,
        tied,
    }
}

/// llama.cpp's names (`convert_hf_to_gguf.py`, GPT2Model).
fn gguf_layout() -> Layout {
    Layout {
        name: Box::new(|layer, part| {
            let (base, kind) = part.rsplit_once('.').unwrap_or((part, ""));
            let g = match base {
                "wte" => "token_embd",
                "wpe" => "position_embd",
                "ln_f" => "output_norm",
                "lm_head" => return "output.weight".into(),
                "ln_1" => "attn_norm",
                "attn.c_attn" => "attn_qkv",
                "attn.c_proj" => "attn_output",
                "ln_2" => "ffn_norm",
                "mlp.c_fc" => "ffn_up",
                "mlp.c_proj" => "ffn_down",
                other => other,
            };
            match layer {
                Some(l) => format!("blk.{l}.{g}.{kind}"),
                None => format!("{g}.{kind}"),
            }
        }),
        conv1d: false,
        tied: None,
    }
}

impl Gpt2Weights {
    /// Loads a Hugging Face directory (`config.json` with `model_type` `gpt2` + safetensors).
    pub fn from_hf(dir: &Path, config: &Value, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let path = dir.join("config.json");
        let shown = path.display();
        let act = f.opt_str("activation_function")?.unwrap_or_else(|| "gelu_new".into());
        if !ACTIVATIONS.contains(&act.as_str()) {
            bail!("{shown}: field `activation_function` is `{act}`; only `gelu_new` (GELU-tanh) is supported for gpt2");
        }
        for k in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            if f.opt_bool(k)? == Some(true) {
                bail!(
                    "{shown}: field `{k}` is true; it changes the attention scores and is not supported (only false)"
                );
            }
        }
        let heads = f.req_usize("n_head")?;
        let hidden = f.req_usize("n_embd")?;
        let cfg = Gpt2Config {
            shape: Shape {
                layers: f.req_usize("n_layer")?,
                hidden,
                heads,
                kv_heads: heads,
                head_dim: hidden.checked_div(heads).unwrap_or(0),
                // transformers: `n_inner` None means 4·n_embd.
                intermediate: f.opt_usize("n_inner")?.unwrap_or(4 * hidden),
                vocab: f.req_usize("vocab_size")?,
                max_positions: f.opt_usize("n_positions")?.unwrap_or(1024),
            },
            eps: f.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            scale_attn_weights: f.opt_bool("scale_attn_weights")?.unwrap_or(true),
        };
        cfg.validate(&path)?;
        let prefix = if weights.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let tied = Some(f.opt_bool("tie_word_embeddings")?.unwrap_or(true));
        Self::read(cfg, weights, hf_layout(prefix, tied), "gpt2".into(), device)
    }

    /// Loads a GGUF file whose `general.architecture` is `gpt2` (llama.cpp writes no
    /// `feed_forward_length` different from the `ffn_up` rows; it is read from the tensor when
    /// absent).
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Self> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let shown = file.path().display();
        let heads = file.get_usize(&key("attention.head_count"))?;
        let hidden = file.get_usize(&key("embedding_length"))?;
        let rows = |name: &str| -> Result<usize> {
            file.tensors
                .get(name)
                .map(|e| e.shape[0])
                .with_context(|| format!("{shown}: tensor `{name}` is missing"))
        };
        let intermediate = match file.metadata.get(&key("feed_forward_length")) {
            Some(_) => file.get_usize(&key("feed_forward_length"))?,
            None => rows("blk.0.ffn_up.weight")?,
        };
        let kv_heads = match file.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => file.get_usize(&key("attention.head_count_kv"))?,
            None => heads,
        };
        let cfg = Gpt2Config {
            shape: Shape {
                layers: file.get_usize(&key("block_count"))?,
                hidden,
                heads,
                kv_heads,
                head_dim: hidden.checked_div(heads).unwrap_or(0),
                intermediate,
                vocab: rows("token_embd.weight")?,
                max_positions: file.get_usize(&key("context_length"))?,
            },
            eps: file.get_f64(&key("attention.layer_norm_epsilon"))?,
            scale_attn_weights: true,
        };
        Self::read(cfg, file, gguf_layout(), arch, device)
    }

    /// Hugging Face-named weights (`transformer.` prefix, Conv1D `[in, out]`) of shape `cfg`
    /// (tests, random models) as tensors in the type they are held in; the head tied unless
    /// `lm_head.weight` is present.
    pub fn from_source(cfg: Gpt2Config, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::read(cfg, weights, hf_layout("transformer.", None), "gpt2".into(), device)
    }

    fn read(
        cfg: Gpt2Config,
        w: &dyn WeightSource,
        layout: Layout,
        model_type: String,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate(w.location())?;
        let Layout { name, conv1d, tied } = layout;
        let (d, i, v) = (cfg.hidden, cfg.intermediate, cfg.vocab);
        let get =
            |layer: Option<usize>, part: &str, shape: &[usize]| w.tensor_shaped(&name(layer, part), shape, device);
        let norm = |layer: Option<usize>, part: &str| -> Result<Norm> {
            Ok(Norm {
                g: get(layer, &format!("{part}.weight"), &[d])?,
                b: get(layer, &format!("{part}.bias"), &[d])?,
            })
        };
        // A linear layer `[out, in]`: a Conv1D's `[in, out]` transposed once.
        let dense = |l: usize, part: &str, out: usize, inp: usize| -> Result<Dense> {
            let weight = format!("{part}.weight");
            let w = if conv1d {
                get(Some(l), &weight, &[inp, out])?.t()?.contiguous()?
            } else {
                get(Some(l), &weight, &[out, inp])?
            };
            Ok(Dense {
                w,
                b: get(Some(l), &format!("{part}.bias"), &[out])?,
            })
        };
        let layers = (0..cfg.layers)
            .map(|l| {
                Ok(Gpt2Layer {
                    ln_1: norm(Some(l), "ln_1")?,
                    qkv: dense(l, "attn.c_attn", 3 * d, d)?,
                    proj: dense(l, "attn.c_proj", d, d)?,
                    ln_2: norm(Some(l), "ln_2")?,
                    fc: dense(l, "mlp.c_fc", i, d)?,
                    fc_proj: dense(l, "mlp.c_proj", d, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = get(None, "wte.weight", &[v, d])?;
        let head_name = name(None, "lm_head");
        let lm_head = match tied {
            Some(true) => None,
            Some(false) => Some(w.tensor_shaped(&head_name, &[v, d], device).with_context(|| {
                format!(
                    "{}: `tie_word_embeddings` is false, so the vocabulary head `{head_name}` must be stored",
                    w.location().display()
                )
            })?),
            None if w.contains(&head_name) => Some(w.tensor_shaped(&head_name, &[v, d], device)?),
            None => None,
        };
        let tied = lm_head.is_none();
        let per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (i * d + i) + (d * i + d);
        let params = v * d * if tied { 1 } else { 2 } + cfg.max_positions * d + 2 * d + cfg.layers * per_layer;
        Ok(Self {
            info: model_info(&cfg, model_type, tied, params, w),
            wpe: get(None, "wpe.weight", &[cfg.max_positions, d])?,
            ln_f: norm(None, "ln_f")?,
            lm_head: lm_head.unwrap_or_else(|| wte.clone()),
            wte,
            layers,
            cfg,
        })
    }
}
