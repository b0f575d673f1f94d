//! The BERT stack on composed candle ops (f64 for the finite-difference tests, other devices
//! and dtypes): forward and input-gradient passes written out layer by layer, the math of
//! `bert.rs`'s module documentation.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::{BertConfig, BertLayer, Dense, Embeddings, Stack};
use crate::backbone::ops::{self, AttentionSaved};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// The embedding tables and the encoder layers as candle tensors.
pub struct ComposedStack {
    cfg: BertConfig,
    emb: Embeddings,
    layers: Vec<BertLayer>,
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

impl Stack for ComposedStack {
    const PATH: KernelPath = KernelPath::Composed;

    fn new(cfg: BertConfig, emb: Embeddings, layers: Vec<BertLayer>) -> Result<Self> {
        Ok(Self { cfg, emb, layers })
    }

    /// The forward pass, after a one-row key/value `prefix` when given (its keys and values
    /// before the input's in every layer, the input's positions starting after it).
    fn forward(&self, input: &BackboneInput, prefix: Option<&KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        let (b, t, d) = input.embeds.dims3()?;
        let dtype = input.embeds.dtype();
        let past = prefix.map_or(0, KvCache::len);
        let types = match input.token_types {
            Some(tt) => self
                .emb
                .token_type
                .index_select(&tt.flatten_all()?, 0)?
                .reshape((b, t, d))?,
            None => self
                .emb
                .token_type
                .get(0)?
                .reshape((1, 1, d))?
                .broadcast_as((b, t, d))?
                .contiguous()?,
        };
        let pos = self.emb.position.narrow(0, past, t)?.unsqueeze(0)?;
        let e = input.embeds.broadcast_add(&pos)?.add(&types)?;
        let mut x = ops::layer_norm(&e, &self.emb.norm.g, &self.emb.norm.b, self.cfg.eps)?;
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
        Ok((x, keep.then(|| Tape::new(BertTape { e, layers: tapes, past }))))
    }

    /// The input gradient and, after a prefix, the prefix's gradient per layer.
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let tape: &BertTape = tape.get("a composed BERT model")?;
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
            ops::layer_norm_backward(&tape.e, &self.emb.norm.g, self.cfg.eps, &dx)?,
            d_past,
        ))
    }
}

impl ComposedStack {
    fn layer_forward(
        &self,
        layer: &BertLayer,
        x: &Tensor,
        bias: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>)> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim());
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?) };
        let (wq, wk, wv) = qkv(layer, d)?;
        let q = heads(wq.forward(x)?)?;
        let k = heads(wk.forward(x)?)?;
        let v = heads(wv.forward(x)?)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let (a, saved) = ops::attention(&q, &k, &v, bias, 1, keep)?;
        let a = a.transpose(1, 2)?.reshape((b, t, d))?;
        let r1 = (x + layer.o.forward(&a)?)?;
        let x1 = ops::layer_norm(&r1, &layer.attn_norm.g, &layer.attn_norm.b, self.cfg.eps)?;
        let z = layer.inner.forward(&x1)?;
        let r2 = (&x1 + layer.out.forward(&z.gelu_erf()?)?)?;
        let out = ops::layer_norm(&r2, &layer.out_norm.g, &layer.out_norm.b, self.cfg.eps)?;
        let tape = saved.map(|attn| LayerTape { r1, z, r2, attn });
        Ok((out, tape))
    }

    /// One layer's input gradient and the gradient of its `past` prefix keys and values,
    /// summed over the rows.
    fn layer_backward(
        &self,
        layer: &BertLayer,
        tape: &LayerTape,
        dy: &Tensor,
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, d) = dy.dims3()?;
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim());
        let dr2 = ops::layer_norm_backward(&tape.r2, &layer.out_norm.g, self.cfg.eps, dy)?;
        let dz = ops::gelu_erf_backward(&tape.z, &layer.out.backward(&dr2)?)?;
        let dx1 = (&dr2 + layer.inner.backward(&dz)?)?;
        let dr1 = ops::layer_norm_backward(&tape.r1, &layer.attn_norm.g, self.cfg.eps, &dx1)?;
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
        let (wq, wk, wv) = qkv(layer, d)?;
        let dx = ((wq.backward(&flat(dq)?)? + wk.backward(&flat(dk)?)?)? + wv.backward(&flat(dv)?)?)?;
        Ok(((dr1 + dx)?, d_past))
    }
}

/// The query, key and value projections of `layer` (stacked in its weights; width `d` each).
fn qkv(layer: &BertLayer, d: usize) -> Result<(Dense, Dense, Dense)> {
    Ok((layer.qkv.rows(0, d)?, layer.qkv.rows(d, d)?, layer.qkv.rows(2 * d, d)?))
}
