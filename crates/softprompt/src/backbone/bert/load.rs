//! Loading a Hugging Face BERT directory (`config.json` + safetensors, with or without the
//! `bert.` prefix, `LayerNorm.weight` or the older `LayerNorm.gamma` names) into [`BertWeights`].

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

use super::{BertConfig, BertLayer, BertWeights, Dense, Embeddings, Norm};
use crate::backbone::weights::WeightSource;
use crate::backbone::Shape;

impl BertConfig {
    /// The shape a model directory's `config.json` declares; only `hidden_act = gelu` runs.
    pub fn from_hf(dir: &Path, config: &serde_json::Value) -> Result<Self> {
        let f = crate::backbone::config_fields(dir, config)?;
        let heads = f.req_usize("num_attention_heads")?;
        let hidden = f.req_usize("hidden_size")?;
        let cfg = BertConfig {
            shape: Shape {
                hidden,
                heads,
                kv_heads: heads,
                // Checked below: `heads` divides `hidden`.
                head_dim: hidden.checked_div(heads).unwrap_or(0),
                layers: f.req_usize("num_hidden_layers")?,
                intermediate: f.req_usize("intermediate_size")?,
                vocab: f.req_usize("vocab_size")?,
                max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(512),
            },
            types: f.opt_usize("type_vocab_size")?.unwrap_or(2),
            eps: f.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
        };
        let act = f.opt_str("hidden_act")?.unwrap_or_else(|| "gelu".to_string());
        if act != "gelu" {
            bail!(
                "{}: hidden_act `{act}` is not supported (supported: gelu)",
                dir.join("config.json").display()
            );
        }
        let (d, heads) = (cfg.hidden, cfg.heads);
        if heads == 0 || d % heads != 0 {
            bail!(
                "{}: hidden_size {d} is not divisible by num_attention_heads {heads}",
                dir.join("config.json").display()
            );
        }
        Ok(cfg)
    }
}

impl BertWeights {
    /// Loads a Hugging Face BERT directory's weights as tensors on `device`.
    pub fn from_hf(dir: &Path, config: &serde_json::Value, w: &dyn WeightSource, device: &Device) -> Result<Self> {
        let cfg = BertConfig::from_hf(dir, config)?;
        let (d, inter) = (cfg.hidden, cfg.intermediate);
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let full = format!("{prefix}{name}");
            if !w.contains(&full) {
                // Older checkpoints name LayerNorm parameters gamma/beta.
                let old = full
                    .replace("LayerNorm.weight", "LayerNorm.gamma")
                    .replace("LayerNorm.bias", "LayerNorm.beta");
                if w.contains(&old) {
                    return w.tensor_shaped(&old, shape, device);
                }
            }
            w.tensor_shaped(&full, shape, device)
        };
        let dense = |name: &str, o: usize, i: usize| -> Result<Dense> {
            Ok(Dense {
                w: get(&format!("{name}.weight"), &[o, i])?,
                b: get(&format!("{name}.bias"), &[o])?,
            })
        };
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                g: get(&format!("{name}.weight"), &[d])?,
                b: get(&format!("{name}.bias"), &[d])?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("encoder.layer.{l}");
            let (q, k, v) = (
                dense(&format!("{p}.attention.self.query"), d, d)?,
                dense(&format!("{p}.attention.self.key"), d, d)?,
                dense(&format!("{p}.attention.self.value"), d, d)?,
            );
            layers.push(BertLayer {
                qkv: Dense {
                    w: Tensor::cat(&[&q.w, &k.w, &v.w], 0)?,
                    b: Tensor::cat(&[&q.b, &k.b, &v.b], 0)?,
                },
                o: dense(&format!("{p}.attention.output.dense"), d, d)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inner: dense(&format!("{p}.intermediate.dense"), inter, d)?,
                out: dense(&format!("{p}.output.dense"), d, inter)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let pooler = if w.contains(&format!("{prefix}pooler.dense.weight")) {
            Some(dense("pooler.dense", d, d)?)
        } else {
            None
        };
        let params = (cfg.vocab + cfg.max_positions + cfg.types) * d
            + 2 * d
            + cfg.layers * (4 * (d * d + d) + 4 * d + 2 * inter * d + inter + d)
            + pooler.as_ref().map_or(0, |_| d * d + d);
        Ok(Self {
            info: cfg.model_info(params, w),
            word: get("embeddings.word_embeddings.weight", &[cfg.vocab, d])?,
            embeddings: Embeddings {
                position: get("embeddings.position_embeddings.weight", &[cfg.max_positions, d])?,
                token_type: get("embeddings.token_type_embeddings.weight", &[cfg.types, d])?,
                norm: norm("embeddings.LayerNorm")?,
            },
            layers,
            pooler,
            cfg,
        })
    }
}
