//! BERT-family encoder (BERT, MiniLM): word + position + token-type embeddings, post-LayerNorm
//! blocks with exact GELU, and the tanh pooler over position 0. Forward and input-gradient passes
//! are written out layer by layer.
//!
//! ```text
//! x0 = LN(e + pos + type)
//! per layer: a = softmax(q·kᵀ/√d + mask)·v;  x1 = LN(x + a·Woᵀ + bo);  out = LN(x1 + gelu(x1·W1ᵀ + b1)·W2ᵀ + b2)
//! pooler: tanh(Wp·h[:, 0] + bp)
//! ```
//!
//! A key/value prefix (p-tuning v2, Liu et al. 2022) puts its `V` keys and values before the
//! input's in every layer, every real position attends to them, and the input's positions start
//! at `V`, as Hugging Face BERT does with `past_key_values` (`V + T ≤ max_position_embeddings`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::bert_fused::{
    check_positions, check_prefix, FusedBert, FusedBertLayer, FusedBertTape, FusedDense, FusedNorm,
};
use super::fused::to_vec;
use super::ops::{self, AttentionSaved};
use super::weights::WeightSource;
use super::{Arch, Backbone, BackboneInput, KvCache, ModelInfo, Tape};

struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.w, Some(&self.b))?)
    }
    fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_backward(dy, &self.w)?)
    }
}

struct Norm {
    g: Tensor,
    b: Tensor,
}

struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    attn_norm: Norm,
    inner: Dense,
    out: Dense,
    out_norm: Norm,
}

/// A frozen BERT-family encoder.
pub struct Bert {
    info: ModelInfo,
    eps: f64,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    /// The layers as candle tensors (composed path); empty when `fused` holds them.
    layers: Vec<Layer>,
    /// The encoder as plain f32 rows for the fused CPU kernels (f32 on the CPU).
    fused: Option<FusedBert>,
    pooler: Option<Dense>,
}

struct LayerTape {
    r1: Tensor,
    z: Tensor,
    r2: Tensor,
    attn: AttentionSaved,
}

struct BertTape {
    e: Tensor,
    layers: Vec<LayerTape>,
    /// Key/value prefix positions before the input.
    past: usize,
}

impl Bert {
    /// Loads a Hugging Face BERT directory (`config.json` + safetensors, with or without the
    /// `bert.` prefix, `LayerNorm.weight` or the older `LayerNorm.gamma` names).
    pub fn from_hf(dir: &Path, config: &serde_json::Value, w: &dyn WeightSource, device: &Device) -> Result<Self> {
        let f = super::config_fields(dir, config)?;
        let d = f.req_usize("hidden_size")?;
        let heads = f.req_usize("num_attention_heads")?;
        let n_layers = f.req_usize("num_hidden_layers")?;
        let inter = f.req_usize("intermediate_size")?;
        let vocab = f.req_usize("vocab_size")?;
        let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(512);
        let types = f.opt_usize("type_vocab_size")?.unwrap_or(2);
        let eps = f.opt_f64("layer_norm_eps")?.unwrap_or(1e-12);
        let act = f.opt_str("hidden_act")?.unwrap_or_else(|| "gelu".to_string());
        if act != "gelu" {
            bail!(
                "{}: hidden_act `{act}` is not supported (supported: gelu)",
                dir.join("config.json").display()
            );
        }
        if heads == 0 || d % heads != 0 {
            bail!(
                "{}: hidden_size {d} is not divisible by num_attention_heads {heads}",
                dir.join("config.json").display()
            );
        }
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
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: dense(&format!("{p}.attention.self.query"), d, d)?,
                k: dense(&format!("{p}.attention.self.key"), d, d)?,
                v: dense(&format!("{p}.attention.self.value"), d, d)?,
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
        let params = (vocab + max_pos + types) * d
            + 2 * d
            + n_layers * (4 * (d * d + d) + 4 * d + 2 * inter * d + inter + d)
            + pooler.as_ref().map_or(0, |_| d * d + d);
        let info = ModelInfo {
            arch: Arch::Bert,
            model_type: "bert".into(),
            source: w.location().to_path_buf(),
            layers: n_layers,
            hidden: d,
            heads,
            kv_heads: heads,
            intermediate: inter,
            vocab,
            max_positions: max_pos,
            params,
            dtypes_on_disk: w.dtype_counts(),
        };
        let mut bert = Self {
            info,
            eps,
            word: get("embeddings.word_embeddings.weight", &[vocab, d])?,
            position: get("embeddings.position_embeddings.weight", &[max_pos, d])?,
            token_type: get("embeddings.token_type_embeddings.weight", &[types, d])?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            fused: None,
            pooler,
        };
        if super::fused::applies(device, bert.word.dtype()) {
            bert.fused = Some(bert.fuse()?);
        }
        Ok(bert)
    }

    /// Moves the encoder's weights into the plain rows the fused CPU kernels read.
    fn fuse(&mut self) -> Result<FusedBert> {
        let dense = |parts: &[&Dense]| -> Result<FusedDense> {
            let w: Vec<&Tensor> = parts.iter().map(|p| &p.w).collect();
            let b: Vec<&Tensor> = parts.iter().map(|p| &p.b).collect();
            Ok(FusedDense {
                w: to_vec(&Tensor::cat(&w, 0)?)?,
                b: to_vec(&Tensor::cat(&b, 0)?)?,
            })
        };
        let norm = |n: &Norm| -> Result<FusedNorm> {
            Ok(FusedNorm {
                g: to_vec(&n.g)?,
                b: to_vec(&n.b)?,
            })
        };
        let layers = std::mem::take(&mut self.layers)
            .iter()
            .map(|l| {
                Ok(FusedBertLayer {
                    qkv: dense(&[&l.q, &l.k, &l.v])?,
                    o: dense(&[&l.o])?,
                    attn_norm: norm(&l.attn_norm)?,
                    inner: dense(&[&l.inner])?,
                    out: dense(&[&l.out])?,
                    out_norm: norm(&l.out_norm)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(FusedBert {
            layers,
            position: to_vec(&self.position)?,
            token_type: to_vec(&self.token_type)?,
            emb_norm: norm(&self.emb_norm)?,
            hidden: self.info.hidden,
            heads: self.info.heads,
            intermediate: self.info.intermediate,
            eps: self.eps as f32,
        })
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        bias: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>)> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.info.heads, self.info.head_dim());
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(layer.q.forward(x)?)?;
        let k = heads(layer.k.forward(x)?)?;
        let v = heads(layer.v.forward(x)?)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let (a, saved) = ops::attention(&q, &k, &v, bias, 1, keep)?;
        let a = a.transpose(1, 2)?.reshape((b, t, d))?;
        let r1 = (x + layer.o.forward(&a)?)?;
        let x1 = ops::layer_norm(&r1, &layer.attn_norm.g, &layer.attn_norm.b, self.eps)?;
        let z = layer.inner.forward(&x1)?;
        let r2 = (&x1 + layer.out.forward(&z.gelu_erf()?)?)?;
        let out = ops::layer_norm(&r2, &layer.out_norm.g, &layer.out_norm.b, self.eps)?;
        let tape = saved.map(|attn| LayerTape { r1, z, r2, attn });
        Ok((out, tape))
    }

    /// One layer's input gradient and the gradient of its `past` prefix keys and values,
    /// summed over the rows.
    fn layer_backward(
        &self,
        layer: &Layer,
        tape: &LayerTape,
        dy: &Tensor,
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, d) = dy.dims3()?;
        let (h, hd) = (self.info.heads, self.info.head_dim());
        let dr2 = ops::layer_norm_backward(&tape.r2, &layer.out_norm.g, self.eps, dy)?;
        let dz = ops::gelu_erf_backward(&tape.z, &layer.out.backward(&dr2)?)?;
        let dx1 = (&dr2 + layer.inner.backward(&dz)?)?;
        let dr1 = ops::layer_norm_backward(&tape.r1, &layer.attn_norm.g, self.eps, &dx1)?;
        let da = layer
            .o
            .backward(&dr1)?
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (dq, dk_all, dv_all) = ops::attention_backward(&tape.attn, &da)?;
        let d_past = (
            dk_all.narrow(2, 0, past)?.sum_keepdim(0)?,
            dv_all.narrow(2, 0, past)?.sum_keepdim(0)?,
        );
        let (dk, dv) = (dk_all.narrow(2, past, t)?, dv_all.narrow(2, past, t)?);
        let flat = |y: Tensor| -> Result<Tensor> { Ok(y.transpose(1, 2)?.reshape((b, t, d))?) };
        let dx = ((layer.q.backward(&flat(dq)?)? + layer.k.backward(&flat(dk)?)?)? + layer.v.backward(&flat(dv)?)?)?;
        Ok(((dr1 + dx)?, d_past))
    }

    fn check_width(&self, input: &BackboneInput) -> Result<()> {
        let d = input.embeds.dim(2)?;
        if d != self.info.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.info.hidden
            );
        }
        Ok(())
    }

    /// The forward pass, after a one-row key/value `prefix` when given (its keys and values
    /// before the input's in every layer, the input's positions starting after it).
    fn run(&self, input: &BackboneInput, keep: bool, prefix: Option<&KvCache>) -> Result<(Tensor, Option<BertTape>)> {
        self.check_width(input)?;
        let (b, t, d) = input.embeds.dims3()?;
        let dtype = input.embeds.dtype();
        let past = match prefix {
            Some(p) => {
                check_prefix(p, self.info.layers, self.info.heads, self.info.head_dim())?;
                p.len()
            }
            None => 0,
        };
        check_positions(past, t, self.info.max_positions)?;
        let types = match input.token_types {
            Some(tt) => self
                .token_type
                .index_select(&tt.flatten_all()?, 0)?
                .reshape((b, t, d))?,
            None => self
                .token_type
                .get(0)?
                .reshape((1, 1, d))?
                .broadcast_as((b, t, d))?
                .contiguous()?,
        };
        let pos = self.position.narrow(0, past, t)?.unsqueeze(0)?;
        let e = input.embeds.broadcast_add(&pos)?.add(&types)?;
        let mut x = ops::layer_norm(&e, &self.emb_norm.g, &self.emb_norm.b, self.eps)?;
        let mask = input.mask.to_dtype(DType::F32)?;
        // Every row sees the prefix: its K/V and key mask repeated for each row.
        let (key_mask, past_kv) = match prefix {
            Some(p) => {
                let rows = p.repeat(b)?;
                let layers = rows
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?)))
                    .collect::<Result<Vec<_>>>()?;
                let prefix_mask = rows.mask.as_ref().context("a non-empty cache has a mask")?;
                (Tensor::cat(&[&prefix_mask.to_dtype(DType::F32)?, &mask], 1)?, layers)
            }
            None => (mask, Vec::new()),
        };
        let bias = ops::attention_bias(&key_mask, t, false, dtype)?;
        let mut tapes = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (y, tape) = self.layer_forward(layer, &x, &bias, past_kv.get(l), keep)?;
            tapes.extend(tape);
            x = y;
        }
        Ok((x, keep.then_some(BertTape { e, layers: tapes, past })))
    }

    /// The training forward, after a key/value prefix when given.
    fn train_forward(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        self.check_width(input)?;
        let (h, tape) = match &self.fused {
            Some(f) => {
                let (h, tape) = f.forward(input.embeds, input.mask, input.token_types, prefix, true)?;
                (h, Tape(Box::new(tape.expect("keep=true yields a tape"))))
            }
            None => {
                let (h, tape) = self.run(input, true, prefix)?;
                (h, Tape(Box::new(tape.expect("keep=true yields a tape"))))
            }
        };
        Ok((h, tape))
    }

    /// The inference forward, after a key/value prefix when given.
    fn infer_forward(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<Tensor> {
        self.check_width(input)?;
        match &self.fused {
            Some(f) => Ok(f.forward(input.embeds, input.mask, input.token_types, prefix, false)?.0),
            None => Ok(self.run(input, false, prefix)?.0),
        }
    }

    /// The input gradient and, after a prefix, the prefix's gradient per layer.
    fn train_backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        if let (Some(f), Some(t)) = (&self.fused, tape.0.downcast_ref::<FusedBertTape>()) {
            return f.backward(t, d_hidden);
        }
        let tape = tape
            .0
            .downcast_ref::<BertTape>()
            .context("tape was not made by a BERT model")?;
        let mut dx = d_hidden.clone();
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
            let (d, dkv) = self.layer_backward(layer, lt, &dx, tape.past)?;
            dx = d;
            if tape.past > 0 {
                d_past.push(dkv);
            }
        }
        d_past.reverse();
        Ok((
            ops::layer_norm_backward(&tape.e, &self.emb_norm.g, self.eps, &dx)?,
            d_past,
        ))
    }

    fn pooler(&self) -> Result<&Dense> {
        self.pooler.as_ref().with_context(|| {
            format!(
                "{}: this BERT checkpoint has no pooler weights",
                self.info.source.display()
            )
        })
    }
}

impl Backbone for Bert {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.word
    }
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        self.infer_forward(input, None)
    }
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)> {
        self.train_forward(input, None)
    }
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        Ok(self.train_backward(tape, d_hidden)?.0)
    }
    fn forward_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<Tensor> {
        self.infer_forward(input, Some(prefix))
    }
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)> {
        self.train_forward(input, Some(prefix))
    }
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.train_backward(tape, d_hidden)
    }
}

impl super::Encoder for Bert {
    fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.pooler()?.forward(&first)?.tanh()?)
    }
    fn pool_backward(&self, hidden: &Tensor, d_pooled: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let pooled = self.pool(hidden)?;
        let dz = (d_pooled * pooled.sqr()?.affine(-1.0, 1.0)?)?;
        let d_first = self.pooler()?.backward(&dz)?.unsqueeze(1)?;
        if t == 1 {
            return Ok(d_first);
        }
        let rest = Tensor::zeros((b, t - 1, d), hidden.dtype(), hidden.device())?;
        Ok(Tensor::cat(&[&d_first, &rest], 1)?)
    }
}
