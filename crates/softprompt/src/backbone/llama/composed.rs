//! The Llama stack on composed candle ops (f64 for the finite-difference tests, other devices
//! and dtypes): forward and input-gradient passes written out layer by layer over the packed
//! real positions, the math of `llama.rs`'s module documentation.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::ops::Range;

use super::{rope_tables, LlamaConfig, LlamaLayer, Stack};
use crate::backbone::frozen_weight::Linear;
use crate::backbone::ops::{self, AttentionSaved};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// A layer's weights as candle tensors.
type Layer = LlamaLayer<Tensor>;

/// The decoder layers, the final norm and the RoPE tables as candle tensors.
pub struct ComposedStack {
    cfg: LlamaConfig,
    layers: Vec<Layer>,
    norm: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// What the training forward keeps per layer.
struct LayerTape {
    x: Tensor,
    /// Queries and keys `[N, H·hd]`, `[N, Hkv·hd]` before their per-head norms (Qwen3).
    qk_pre: Option<(Tensor, Tensor)>,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    attn: AttentionSaved,
}

struct LlamaTape {
    /// The first layer the forward ran (the backward stops there).
    first: usize,
    /// Cached (prefix) positions before the input.
    past: usize,
    layers: Vec<LayerTape>,
    packing: ops::Packing,
    last: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Stack for ComposedStack {
    const PATH: KernelPath = KernelPath::Composed;

    fn new(cfg: LlamaConfig, layers: Vec<LlamaLayer>, norm: Tensor) -> Result<Self> {
        let layers = layers
            .into_iter()
            .map(|l| l.convert(Linear::into_tensor, Ok))
            .collect::<Result<_>>()?;
        let (cos, sin) = rope_tables(&cfg, norm.dtype(), norm.device())?;
        Ok(Self {
            cfg,
            layers,
            norm,
            cos,
            sin,
        })
    }

    fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn forward_layers(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
        range: Range<usize>,
    ) -> Result<(Tensor, Option<Tape>)> {
        let last = range.end == self.layers.len();
        if range.start > range.end || range.end > self.layers.len() || (keep && !last) {
            bail!(
                "layers {range:?} of a model of {} layers (a kept tape needs the range to end at the last)",
                self.layers.len()
            );
        }
        let (embeds, mask) = (input.embeds, input.mask);
        let t = embeds.dim(1)?;
        let new_mask = mask.to_dtype(candle_core::DType::F32)?;
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref() {
            if c.positions().iter().any(|&p| p != past_len) {
                bail!(
                    "rows with their own positions after a padded key/value cache (mixed-request \
                     batches) run only on the fused f32 CPU path, not on {:?} {:?}",
                    self.norm.device(),
                    self.norm.dtype()
                );
            }
        }
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[m, &new_mask], 1)?,
            None => new_mask,
        };
        let bias = ops::attention_bias(&key_mask, t, true, embeds.dtype())?;
        let (cos, sin) = self.rope_slice(past_len, t)?;
        let packing = ops::Packing::new(mask)?;
        let mut x = packing.pack(embeds)?;
        let mut tapes = Vec::new();
        let mut new_kv = Vec::new();
        for (l, layer) in self.layers[range.clone()].iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers.get(l));
            let (y, tape, kv) = self.layer_forward(layer, &x, &packing, &bias, &cos, &sin, past, keep)?;
            tapes.extend(tape);
            new_kv.push(kv);
            x = y;
        }
        let hidden = match last {
            true => packing.unpack(&ops::rms_norm(&x, &self.norm, self.cfg.eps)?)?,
            false => packing.unpack(&x)?,
        };
        if let Some(c) = cache {
            c.layers = new_kv;
            c.mask = Some(key_mask);
            c.next_pos = None;
        }
        let tape = keep.then_some(LlamaTape {
            first: range.start,
            past: past_len,
            layers: tapes,
            last: x,
            cos,
            sin,
            packing,
        });
        Ok((hidden, tape.map(Tape::new)))
    }

    /// The input gradient and the prefix's gradient (empty without a prefix).
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let tape: &LlamaTape = tape.get("a composed Llama model")?;
        let d_packed = tape.packing.pack(d_hidden)?;
        let mut dx = ops::rms_norm_backward(&tape.last, &self.norm, self.cfg.eps, &d_packed)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers[tape.first..].iter().zip(&tape.layers).rev() {
            let (d, dkv) = self.layer_backward(layer, lt, &dx, &tape.packing, &tape.cos, &tape.sin, tape.past)?;
            dx = d;
            if tape.past > 0 {
                d_past.push(dkv);
            }
        }
        d_past.reverse();
        Ok((tape.packing.unpack(&dx)?, d_past))
    }
}

impl ComposedStack {
    fn rope_slice(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        if start + len > self.cfg.max_positions {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                start + len,
                self.cfg.max_positions
            );
        }
        Ok((self.cos.narrow(0, start, len)?, self.sin.narrow(0, start, len)?))
    }

    /// Each of the `n` heads of the rows `x` (`[N, n·hd]`) RMS-normed with the gain `g` `[hd]`.
    fn head_norm(&self, x: &Tensor, g: &Tensor, n: usize) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let per_head = x.reshape((rows * n, width / n))?;
        Ok(ops::rms_norm(&per_head, g, self.cfg.eps)?.reshape((rows, width))?)
    }

    /// Input gradient of [`ComposedStack::head_norm`] at `x` for the output gradient `dy`.
    fn head_norm_backward(&self, x: &Tensor, g: &Tensor, n: usize, dy: &Tensor) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let shape = (rows * n, width / n);
        let dx = ops::rms_norm_backward(&x.reshape(shape)?, g, self.cfg.eps, &dy.reshape(shape)?)?;
        Ok(dx.reshape((rows, width))?)
    }

    /// One decoder layer on the packed real positions `x` `[N, D]`. `past` holds earlier
    /// keys/values (already rotated).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        packing: &ops::Packing,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim());
        let n1 = ops::rms_norm(x, &layer.attn_norm, self.cfg.eps)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            let y = packing.unpack(&y)?;
            let (b, t, _) = y.dims3()?;
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let qkv = ops::linear(&n1, &layer.w_qkv, layer.b_qkv.as_ref())?;
        let (qd, kvd) = (h * hd, hkv * hd);
        let (q_pre, k_pre) = (
            qkv.narrow(1, 0, qd)?.contiguous()?,
            qkv.narrow(1, qd, kvd)?.contiguous()?,
        );
        // Qwen3: every head's query and key RMS-normed (gain [hd]) before the rotation.
        let (q, k, qk_pre) = match (&layer.q_norm, &layer.k_norm) {
            (Some(gq), Some(gk)) => (
                self.head_norm(&q_pre, gq, h)?,
                self.head_norm(&k_pre, gk, hkv)?,
                Some((q_pre, k_pre)),
            ),
            _ => (q_pre, k_pre, None),
        };
        let q = heads(q, h)?;
        let k = heads(k, hkv)?;
        let v = heads(qkv.narrow(1, qd + kvd, kvd)?, hkv)?;
        let (b, _, t, _) = q.dims4()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let qg = q.reshape((b, hkv, (h / hkv) * t, hd))?;
        let (a, saved) = ops::attention(&qg, &k, &v, bias, h / hkv, keep)?;
        let a = packing.pack(&a.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))?)?;
        let x2 = (x + ops::linear(&a, &layer.wo, None)?)?;
        let n2 = ops::rms_norm(&x2, &layer.ffn_norm, self.cfg.eps)?;
        let gate_up = ops::linear(&n2, &layer.w_gate_up, None)?;
        let inter = self.cfg.intermediate;
        let gate = gate_up.narrow(1, 0, inter)?.contiguous()?;
        let up = gate_up.narrow(1, inter, inter)?.contiguous()?;
        let m = (gate.silu()? * &up)?;
        let out = (&x2 + ops::linear(&m, &layer.w_down, None)?)?;
        let tape = saved.map(|attn| LayerTape {
            x: x.clone(),
            qk_pre,
            x2,
            gate,
            up,
            attn,
        });
        Ok((out, tape, (k, v)))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        layer: &Layer,
        tape: &LayerTape,
        dy: &Tensor,
        packing: &ops::Packing,
        cos: &Tensor,
        sin: &Tensor,
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim());
        let eps = self.cfg.eps;
        // MLP
        let dm = ops::linear_backward(dy, &layer.w_down)?;
        let du = (&dm * tape.gate.silu()?)?;
        let dg = ops::silu_backward(&tape.gate, &(&dm * &tape.up)?)?;
        let dn2 = ops::linear_backward(&Tensor::cat(&[&dg, &du], 1)?, &layer.w_gate_up)?;
        let dx2 = (dy + ops::rms_norm_backward(&tape.x2, &layer.ffn_norm, eps, &dn2)?)?;
        // attention
        let da = packing.unpack(&ops::linear_backward(&dx2, &layer.wo)?)?;
        let (b, t, _) = da.dims3()?;
        let da = da
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, hkv, (h / hkv) * t, hd))?;
        let (dq, dk_all, dv_all) = ops::attention_backward(&tape.attn, &da)?;
        // the cached (prefix) slots' gradient, summed over rows; the rest flows into this input
        let d_past = (
            dk_all.narrow(2, 0, past)?.sum_keepdim(0)?,
            dv_all.narrow(2, 0, past)?.sum_keepdim(0)?,
        );
        let (dk, dv) = (dk_all.narrow(2, past, t)?, dv_all.narrow(2, past, t)?);
        let neg_sin = sin.neg()?;
        let dq = candle_nn::rotary_emb::rope(&dq.reshape((b, h, t, hd))?.contiguous()?, cos, &neg_sin)?;
        let dk = candle_nn::rotary_emb::rope(&dk.contiguous()?, cos, &neg_sin)?;
        let flat =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(packing.pack(&y.transpose(1, 2)?.reshape((b, t, n * hd))?)?) };
        let (mut dq, mut dk) = (flat(dq, h)?, flat(dk, hkv)?);
        if let (Some(gq), Some(gk), Some((q_pre, k_pre))) = (&layer.q_norm, &layer.k_norm, &tape.qk_pre) {
            dq = self.head_norm_backward(q_pre, gq, h, &dq)?;
            dk = self.head_norm_backward(k_pre, gk, hkv, &dk)?;
        }
        let d_qkv = Tensor::cat(&[dq, dk, flat(dv, hkv)?], 1)?;
        let dn1 = ops::linear_backward(&d_qkv, &layer.w_qkv)?;
        Ok((
            (dx2 + ops::rms_norm_backward(&tape.x, &layer.attn_norm, eps, &dn1)?)?,
            d_past,
        ))
    }
}
