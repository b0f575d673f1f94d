//! GPT-2 on composed candle ops: the forward and input-gradient passes written out block by
//! block over the packed real positions, the math of `gpt2.rs`'s module documentation.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::{Gpt2, Gpt2Layer};
use crate::backbone::ops::{self, gelu_tanh, gelu_tanh_backward, AttentionSaved, Packing};
use crate::backbone::{BackboneInput, KvCache, Tape};

/// What the training forward keeps per block.
struct LayerTape {
    /// The block's input `[N, D]`.
    x: Tensor,
    /// The residual stream after attention `[N, D]`.
    x2: Tensor,
    /// The MLP's pre-activation `[N, I]`.
    z: Tensor,
    attn: AttentionSaved,
}

struct Gpt2Tape {
    /// Cached (prefix) positions before the input.
    past: usize,
    layers: Vec<LayerTape>,
    packing: Packing,
    /// The last block's output, before `ln_f` `[N, D]`.
    last: Tensor,
}

impl Gpt2 {
    /// The position of every input column `[B, T]` (u32): each row continues from its cached
    /// position; refused past the position table.
    fn positions(&self, cache: Option<&KvCache>, b: usize, t: usize) -> Result<Tensor> {
        let starts = match cache {
            Some(c) if !c.is_empty() => c.positions(),
            _ => vec![0; b],
        };
        if starts.len() != b {
            bail!("the key/value cache has {} rows but the input has {b}", starts.len());
        }
        let n = self.w.cfg.max_positions;
        let end = starts.iter().max().copied().unwrap_or(0) + t;
        if end > n {
            let past = end - t;
            if past > 0 {
                bail!(
                    "positions {past}..{end} (the input's {t} after {past} cached or prefix positions) run past \
                     GPT-2's {n} learned positions (n_positions); shorten the input, the prompt or the prefix"
                );
            }
            bail!("sequence of {t} positions exceeds GPT-2's {n} learned positions (n_positions)");
        }
        let ids: Vec<u32> = starts.iter().flat_map(|&s| (s..s + t).map(|p| p as u32)).collect();
        Ok(Tensor::from_vec(ids, (b, t), self.w.wpe.device())?)
    }

    /// Final-normed hidden states `[B, T, D]` of `input` after the positions in `cache`, whose
    /// keys and values are then replaced by the extended ones; with `keep`, the tape.
    pub(super) fn forward_stack(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
    ) -> Result<(Tensor, Option<Tape>)> {
        let (embeds, mask) = (input.embeds, input.mask);
        let (b, t, d) = embeds.dims3()?;
        let dtype = embeds.dtype();
        let pos = self.positions(cache.as_deref(), b, t)?;
        let pos_embeds = self.w.wpe.index_select(&pos.flatten_all()?, 0)?.reshape((b, t, d))?;
        let h0 = (embeds + pos_embeds.to_dtype(dtype)?)?;
        let new_mask = mask.to_dtype(DType::F32)?;
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[&m.to_dtype(DType::F32)?, &new_mask], 1)?,
            None => new_mask,
        };
        let bias = ops::attention_bias(&key_mask, t, true, dtype)?;
        let packing = Packing::new(mask)?;
        let mut x = packing.pack(&h0)?;
        let mut tapes = Vec::new();
        let mut new_kv = Vec::with_capacity(self.w.layers.len());
        for (l, layer) in self.w.layers.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers.get(l));
            let (y, tape, kv) = self.layer_forward(layer, &x, &packing, &bias, past, keep)?;
            tapes.extend(tape);
            new_kv.push(kv);
            x = y;
        }
        let ln_f = &self.w.ln_f;
        let hidden = packing.unpack(&ops::layer_norm(&x, &ln_f.g, &ln_f.b, self.w.cfg.eps)?)?;
        if let Some(c) = cache {
            c.next_pos = c.next_pos.take().map(|p| p.into_iter().map(|s| s + t).collect());
            c.layers = new_kv;
            c.mask = Some(key_mask);
        }
        let tape = keep.then(|| {
            Tape::new(Gpt2Tape {
                past: past_len,
                layers: tapes,
                packing,
                last: x,
            })
        });
        Ok((hidden, tape))
    }

    /// d(loss)/d(input embeddings) and, after cached positions, their `(dK, dV)` per layer
    /// summed over the rows.
    pub(super) fn backward_stack(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let tape: &Gpt2Tape = tape.get("a GPT-2 model")?;
        let d_packed = tape.packing.pack(d_hidden)?;
        let mut dx = ops::layer_norm_backward(&tape.last, &self.w.ln_f.g, self.w.cfg.eps, &d_packed)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.w.layers.iter().zip(&tape.layers).rev() {
            let (d, dkv) = self.layer_backward(layer, lt, &dx, &tape.packing, tape.past)?;
            dx = d;
            if tape.past > 0 {
                d_past.push(dkv);
            }
        }
        d_past.reverse();
        // h0 = embeds + positions: the input embeddings' gradient is h0's.
        Ok((tape.packing.unpack(&dx)?, d_past))
    }

    /// One block on the packed real positions `x` `[N, D]` after `past` keys and values.
    fn layer_forward(
        &self,
        layer: &Gpt2Layer,
        x: &Tensor,
        packing: &Packing,
        bias: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>, (Tensor, Tensor))> {
        let cfg = &self.w.cfg;
        let (h, hd, d) = (cfg.heads, cfg.head_dim, cfg.hidden);
        let heads = |y: Tensor| -> Result<Tensor> {
            let y = packing.unpack(&y)?;
            let (b, t, _) = y.dims3()?;
            Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        // attention: q, k, v = LN1(x)·Wqkvᵀ + bqkv
        let n1 = ops::layer_norm(x, &layer.ln_1.g, &layer.ln_1.b, cfg.eps)?;
        let qkv = layer.qkv.forward(&n1)?;
        let mut q = heads(qkv.narrow(1, 0, d)?)?;
        if let Some(c) = cfg.query_scale() {
            q = (q * c)?;
        }
        let k = heads(qkv.narrow(1, d, d)?)?;
        let v = heads(qkv.narrow(1, 2 * d, d)?)?;
        let (b, _, t, _) = q.dims4()?;
        let (k, v) = match past {
            Some((pk, pv)) => {
                let dt = k.dtype();
                (
                    Tensor::cat(&[&pk.to_dtype(dt)?, &k], 2)?,
                    Tensor::cat(&[&pv.to_dtype(dt)?, &v], 2)?,
                )
            }
            None => (k, v),
        };
        let (a, saved) = ops::attention(&q, &k, &v, bias, 1, keep)?;
        let a = packing.pack(&a.transpose(1, 2)?.reshape((b, t, d))?)?;
        let x2 = (x + layer.proj.forward(&a)?)?;
        // MLP: out = x2 + gelu_tanh(LN2(x2)·Wfcᵀ + bfc)·Wprojᵀ + bproj
        let n2 = ops::layer_norm(&x2, &layer.ln_2.g, &layer.ln_2.b, cfg.eps)?;
        let z = layer.fc.forward(&n2)?;
        let out = (&x2 + layer.fc_proj.forward(&gelu_tanh(&z)?)?)?;
        let tape = saved.map(|attn| LayerTape {
            x: x.clone(),
            x2,
            z,
            attn,
        });
        Ok((out, tape, (k, v)))
    }

    /// One block's input gradient and the gradient of its `past` cached keys and values,
    /// summed over the rows.
    fn layer_backward(
        &self,
        layer: &Gpt2Layer,
        tape: &LayerTape,
        dy: &Tensor,
        packing: &Packing,
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let cfg = &self.w.cfg;
        let (h, hd, d, eps) = (cfg.heads, cfg.head_dim, cfg.hidden, cfg.eps);
        // MLP block
        let dz = gelu_tanh_backward(&tape.z, &layer.fc_proj.backward(dy)?)?;
        let dx2 = (dy + ops::layer_norm_backward(&tape.x2, &layer.ln_2.g, eps, &layer.fc.backward(&dz)?)?)?;
        // attention block
        let da = packing.unpack(&layer.proj.backward(&dx2)?)?;
        let (b, t, _) = da.dims3()?;
        let da = da.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let (dq, dk_all, dv_all) = ops::attention_backward(&tape.attn, &da)?;
        let d_past = (
            dk_all.narrow(2, 0, past)?.sum_keepdim(0)?,
            dv_all.narrow(2, 0, past)?.sum_keepdim(0)?,
        );
        let (dk, dv) = (dk_all.narrow(2, past, t)?, dv_all.narrow(2, past, t)?);
        let dq = match cfg.query_scale() {
            Some(c) => (dq * c)?,
            None => dq,
        };
        let flat = |y: Tensor| -> Result<Tensor> { Ok(packing.pack(&y.transpose(1, 2)?.reshape((b, t, d))?)?) };
        let d_qkv = Tensor::cat(&[flat(dq)?, flat(dk)?, flat(dv)?], 1)?;
        let dn1 = layer.qkv.backward(&d_qkv)?;
        Ok((
            (dx2 + ops::layer_norm_backward(&tape.x, &layer.ln_1.g, eps, &dn1)?)?,
            d_past,
        ))
    }
}
