//! The Gemma 3 stack on composed candle ops (f64 for the finite-difference tests, other devices):
//! forward and input-gradient passes written out layer by layer over the packed real positions,
//! the math of `gemma3.rs`'s module documentation. Norms run in f32 (f64 for f64 weights) and
//! their output is cast back, as transformers' `Gemma3RMSNorm` does.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::{rope_tables, AttentionKind, Gemma3Config, Gemma3Layer, Gemma3Stack};
use crate::backbone::frozen_weight::Linear;
use crate::backbone::ops::{self, gelu_tanh, gelu_tanh_backward, AttentionSaved};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// A layer's weights as candle tensors (gains in the norms' dtype).
type Layer = Gemma3Layer<Tensor>;

/// The decoder layers, the final norm and each layer kind's RoPE tables as candle tensors.
pub struct ComposedStack {
    cfg: Gemma3Config,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `(cos, sin)` `[max_positions, head_dim/2]` of the global layers, then the sliding ones.
    tables: [(Tensor, Tensor); 2],
}

/// What the training forward keeps per layer.
struct LayerTape {
    x: Tensor,
    /// Queries and keys `[N, H·hd]`, `[N, Hkv·hd]` before their per-head norms.
    q_pre: Tensor,
    k_pre: Tensor,
    /// The attention's output after the output projection, before its norm `[N, D]`.
    o: Tensor,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    /// The MLP's output before its norm `[N, D]`.
    y: Tensor,
    attn: AttentionSaved,
}

struct Gemma3Tape {
    /// Cached (prefix) positions before the input.
    past: usize,
    layers: Vec<LayerTape>,
    packing: ops::Packing,
    last: Tensor,
    /// `(cos, sin)` of the input's positions, per kind (global, sliding).
    rope: [(Tensor, Tensor); 2],
}

fn kind_index(kind: AttentionKind) -> usize {
    match kind {
        AttentionKind::Global => 0,
        AttentionKind::Sliding => 1,
    }
}

/// The dtype the norms compute in for activations of `dtype`: f64 stays, anything else f32.
fn norm_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl Gemma3Stack for ComposedStack {
    const PATH: KernelPath = KernelPath::Composed;

    fn new(cfg: Gemma3Config, layers: Vec<Gemma3Layer>, norm: Tensor) -> Result<Self> {
        let nd = norm_dtype(norm.dtype());
        let gain = |g: Tensor| Ok(g.to_dtype(nd)?);
        let layers = layers
            .into_iter()
            .map(|l| l.convert(Linear::into_tensor, gain))
            .collect::<Result<_>>()?;
        let (dtype, device) = (norm.dtype(), norm.device().clone());
        let tables = [
            rope_tables(&cfg, &cfg.global_rope, dtype, &device)?,
            rope_tables(&cfg, &cfg.local_rope, dtype, &device)?,
        ];
        Ok(Self {
            norm: norm.to_dtype(nd)?,
            cfg,
            layers,
            tables,
        })
    }

    fn forward(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
    ) -> Result<(Tensor, Option<Tape>)> {
        let (embeds, mask) = (input.embeds, input.mask);
        let t = embeds.dim(1)?;
        let new_mask = mask.to_dtype(DType::F32)?;
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref() {
            if c.positions().iter().any(|&p| p != past_len) {
                bail!(
                    "rows with their own positions after a padded key/value cache (mixed-request \
                     batches) run only on the fused f32 CPU path, not on {:?} {:?}",
                    self.norm.device(),
                    embeds.dtype()
                );
            }
        }
        if past_len + t > self.cfg.max_positions {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                past_len + t,
                self.cfg.max_positions
            );
        }
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[m, &new_mask], 1)?,
            None => new_mask,
        };
        let causal = ops::attention_bias(&key_mask, t, true, embeds.dtype())?;
        let biases = [
            causal.clone(),
            causal.broadcast_add(&window_bias(past_len, t, self.cfg.sliding_window, &causal)?)?,
        ];
        let rope = [self.rope_slice(0, past_len, t)?, self.rope_slice(1, past_len, t)?];
        let packing = ops::Packing::new(mask)?;
        let mut x = packing.pack(embeds)?;
        let mut tapes = Vec::new();
        let mut new_kv = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers.get(l));
            let k = kind_index(layer.kind);
            let (y, tape, kv) = self.layer_forward(layer, &x, &packing, &biases[k], &rope[k], past, keep)?;
            tapes.extend(tape);
            new_kv.push(kv);
            x = y;
        }
        let hidden = packing.unpack(&self.norm(&x, &self.norm)?)?;
        if let Some(c) = cache {
            c.layers = new_kv;
            c.mask = Some(key_mask);
            c.next_pos = None;
        }
        let tape = keep.then_some(Gemma3Tape {
            past: past_len,
            layers: tapes,
            last: x,
            rope,
            packing,
        });
        Ok((hidden, tape.map(Tape::new)))
    }

    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let tape: &Gemma3Tape = tape.get("a composed Gemma 3 model")?;
        let d_packed = tape.packing.pack(d_hidden)?;
        let mut dx = self.norm_backward(&tape.last, &self.norm, &d_packed)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
            let rope = &tape.rope[kind_index(layer.kind)];
            let (d, dkv) = self.layer_backward(layer, lt, &dx, &tape.packing, rope, tape.past)?;
            dx = d;
            if tape.past > 0 {
                d_past.push(dkv);
            }
        }
        d_past.reverse();
        Ok((tape.packing.unpack(&dx)?, d_past))
    }
}

/// `[1, 1, 1, T, S]`: [`ops::MASKED`] where a sliding layer's query `t` (at key position
/// `past + t`) may not see key `j` because `j ≤ past + t − window`, else 0 (`like`: the dtype
/// and device).
fn window_bias(past: usize, t: usize, window: usize, like: &Tensor) -> Result<Tensor> {
    let s = past + t;
    let mut bias = vec![0f32; t * s];
    for q in 0..t {
        for j in 0..s {
            if j + window <= past + q {
                bias[q * s + j] = ops::MASKED;
            }
        }
    }
    Ok(Tensor::from_vec(bias, (1, 1, 1, t, s), like.device())?.to_dtype(like.dtype())?)
}

impl ComposedStack {
    /// `(cos, sin)` of positions `start..start + len` for the layers of kind index `kind`.
    fn rope_slice(&self, kind: usize, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = &self.tables[kind];
        Ok((cos.narrow(0, start, len)?, sin.narrow(0, start, len)?))
    }

    /// `rms(x)·g` over the last axis, computed in the norms' dtype and cast back.
    fn norm(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let y = ops::rms_norm(&x.to_dtype(g.dtype())?, g, self.cfg.eps)?;
        Ok(y.to_dtype(x.dtype())?)
    }

    /// Input gradient of [`ComposedStack::norm`] at `x` for the output gradient `dy`.
    fn norm_backward(&self, x: &Tensor, g: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let nd = g.dtype();
        let dx = ops::rms_norm_backward(&x.to_dtype(nd)?, g, self.cfg.eps, &dy.to_dtype(nd)?)?;
        Ok(dx.to_dtype(x.dtype())?)
    }

    /// Each of the `n` heads of the rows `x` (`[N, n·hd]`) normed with the gain `g` `[hd]`.
    fn head_norm(&self, x: &Tensor, g: &Tensor, n: usize) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let per_head = x.reshape((rows * n, width / n))?;
        Ok(self.norm(&per_head, g)?.reshape((rows, width))?)
    }

    /// Input gradient of [`ComposedStack::head_norm`].
    fn head_norm_backward(&self, x: &Tensor, g: &Tensor, n: usize, dy: &Tensor) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let shape = (rows * n, width / n);
        let dx = self.norm_backward(&x.reshape(shape)?, g, &dy.reshape(shape)?)?;
        Ok(dx.reshape((rows, width))?)
    }

    /// One decoder layer on the packed real positions `x` `[N, D]`. `past` holds earlier
    /// keys/values (already normed and rotated).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        packing: &ops::Packing,
        bias: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        past: Option<&(Tensor, Tensor)>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerTape>, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let (qd, kvd, inter) = (h * hd, hkv * hd, self.cfg.intermediate);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            let y = packing.unpack(&y)?;
            let (b, t, _) = y.dims3()?;
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        // attention: n1 = rms(x)·g_in; q, k per-head normed; rotated; scaled
        let n1 = self.norm(x, &layer.attn_norm)?;
        let qkv = ops::linear(&n1, &layer.w_qkv, None)?;
        let q_pre = qkv.narrow(1, 0, qd)?.contiguous()?;
        let k_pre = qkv.narrow(1, qd, kvd)?.contiguous()?;
        let q = heads(self.head_norm(&q_pre, &layer.q_norm, h)?, h)?;
        let k = heads(self.head_norm(&k_pre, &layer.k_norm, hkv)?, hkv)?;
        let v = heads(qkv.narrow(1, qd + kvd, kvd)?, hkv)?;
        let (b, _, t, _) = q.dims4()?;
        let mut q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        if let Some(c) = self.cfg.query_scale() {
            q = (q * c)?;
        }
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let qg = q.reshape((b, hkv, (h / hkv) * t, hd))?;
        let (a, saved) = ops::attention(&qg, &k, &v, bias, h / hkv, keep)?;
        let a = packing.pack(&a.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, qd))?)?;
        let o = ops::linear(&a, &layer.wo, None)?;
        let x2 = (x + self.norm(&o, &layer.post_attn_norm)?)?;
        // MLP: y = (gelu_tanh(n2·Wgᵀ) ⊙ n2·Wuᵀ)·Wdᵀ between its two norms
        let n2 = self.norm(&x2, &layer.pre_ffn_norm)?;
        let gate_up = ops::linear(&n2, &layer.w_gate_up, None)?;
        let gate = gate_up.narrow(1, 0, inter)?.contiguous()?;
        let up = gate_up.narrow(1, inter, inter)?.contiguous()?;
        let y = ops::linear(&(gelu_tanh(&gate)? * &up)?, &layer.w_down, None)?;
        let out = (&x2 + self.norm(&y, &layer.post_ffn_norm)?)?;
        let tape = saved.map(|attn| LayerTape {
            x: x.clone(),
            q_pre,
            k_pre,
            o,
            x2,
            gate,
            up,
            y,
            attn,
        });
        Ok((out, tape, (k, v)))
    }

    fn layer_backward(
        &self,
        layer: &Layer,
        tape: &LayerTape,
        dy: &Tensor,
        packing: &ops::Packing,
        (cos, sin): &(Tensor, Tensor),
        past: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (h, hkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        // MLP block: out = x2 + rms(y)·g_post_ffn
        let d_y = self.norm_backward(&tape.y, &layer.post_ffn_norm, dy)?;
        let dm = ops::linear_backward(&d_y, &layer.w_down)?;
        let du = (&dm * gelu_tanh(&tape.gate)?)?;
        let dg = gelu_tanh_backward(&tape.gate, &(&dm * &tape.up)?)?;
        let dn2 = ops::linear_backward(&Tensor::cat(&[&dg, &du], 1)?, &layer.w_gate_up)?;
        let dx2 = (dy + self.norm_backward(&tape.x2, &layer.pre_ffn_norm, &dn2)?)?;
        // attention block: x2 = x + rms(o)·g_post_attn
        let d_o = self.norm_backward(&tape.o, &layer.post_attn_norm, &dx2)?;
        let da = packing.unpack(&ops::linear_backward(&d_o, &layer.wo)?)?;
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
        let mut dq = dq.reshape((b, h, t, hd))?;
        if let Some(c) = self.cfg.query_scale() {
            dq = (dq * c)?;
        }
        let neg_sin = sin.neg()?;
        let dq = candle_nn::rotary_emb::rope(&dq.contiguous()?, cos, &neg_sin)?;
        let dk = candle_nn::rotary_emb::rope(&dk.contiguous()?, cos, &neg_sin)?;
        let flat =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(packing.pack(&y.transpose(1, 2)?.reshape((b, t, n * hd))?)?) };
        let dq = self.head_norm_backward(&tape.q_pre, &layer.q_norm, h, &flat(dq, h)?)?;
        let dk = self.head_norm_backward(&tape.k_pre, &layer.k_norm, hkv, &flat(dk, hkv)?)?;
        let d_qkv = Tensor::cat(&[dq, dk, flat(dv, hkv)?], 1)?;
        let dn1 = ops::linear_backward(&d_qkv, &layer.w_qkv)?;
        Ok(((dx2 + self.norm_backward(&tape.x, &layer.attn_norm, &dn1)?)?, d_past))
    }
}
