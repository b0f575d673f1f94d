//! Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2): RMSNorm, rotary position
//! encoding (`rope_theta`), grouped-query attention with optional q/k/v bias, SwiGLU MLP, tied or
//! untied vocabulary head. Forward and input-gradient passes are written out layer by layer.
//!
//! Per layer, with `x` the residual stream:
//! ```text
//! n1 = rms(x)·g1;  q,k,v = n1·Wq,k,vᵀ (+b);  q,k = rope(q,k);  a = softmax(q·kᵀ/√d + mask)·v
//! x2 = x + a·Woᵀ;  n2 = rms(x2)·g2;  y = (silu(n2·Wgᵀ) ⊙ n2·Wuᵀ)·Wdᵀ;  out = x2 + y
//! ```

mod load;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::llama_fused::{FusedLlama, FusedTape};
use super::ops::{self, AttentionSaved};
use super::{Backbone, BackboneInput, KvCache, ModelInfo, Tape};

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// Vocabulary rows.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest supported sequence.
    pub max_positions: usize,
}

impl LlamaConfig {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    fn validate(&self, source: &Path) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            bail!(
                "{}: inconsistent attention shape (hidden {}, heads {}, kv heads {})",
                source.display(),
                self.hidden,
                self.heads,
                self.kv_heads
            );
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v projections stacked: `[d + 2·kv_dim, d]` (one matrix multiply for all three).
    w_qkv: Tensor,
    /// Their biases (Qwen2), stacked likewise.
    b_qkv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2·intermediate, d]`.
    w_gate_up: Tensor,
    w_down: Tensor,
}

/// A frozen Llama-family model.
pub struct Llama {
    info: ModelInfo,
    cfg: LlamaConfig,
    embed: Tensor,
    /// The layers as candle tensors (composed path); empty when `fused` holds them.
    layers: Vec<Layer>,
    /// The layers as plain f32 rows for the fused CPU kernels (f32 on the CPU).
    fused: Option<FusedLlama>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// What the training forward keeps per layer.
struct LayerTape {
    x: Tensor,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    attn: AttentionSaved,
}

struct LlamaTape {
    /// Cached (prefix) positions before the input.
    past: usize,
    layers: Vec<LayerTape>,
    packing: ops::Packing,
    last: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    fn check_width(&self, input: &BackboneInput) -> Result<()> {
        let d = input.embeds.dim(2)?;
        if d != self.cfg.hidden {
            bail!(
                "input embeddings have width {d}, the model's hidden size is {}",
                self.cfg.hidden
            );
        }
        Ok(())
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

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
        let kvd = hkv * hd;
        let q = heads(qkv.narrow(1, 0, h * hd)?, h)?;
        let k = heads(qkv.narrow(1, h * hd, kvd)?, hkv)?;
        let v = heads(qkv.narrow(1, h * hd + kvd, kvd)?, hkv)?;
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
        let d_qkv = Tensor::cat(&[flat(dq, h)?, flat(dk, hkv)?, flat(dv, hkv)?], 1)?;
        let dn1 = ops::linear_backward(&d_qkv, &layer.w_qkv)?;
        Ok((
            (dx2 + ops::rms_norm_backward(&tape.x, &layer.attn_norm, eps, &dn1)?)?,
            d_past,
        ))
    }

    fn run(
        &self,
        input: &BackboneInput,
        keep: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Option<LlamaTape>)> {
        self.check_width(input)?;
        let t = input.embeds.dim(1)?;
        let mask = input.mask.to_dtype(candle_core::DType::F32)?;
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_ref() {
            if c.positions().iter().any(|&p| p != past_len) {
                bail!(
                    "rows with their own positions after a padded key/value cache (mixed-request \
                     batches) run only on the fused f32 CPU path, not on {:?} {:?}",
                    self.embed.device(),
                    self.embed.dtype()
                );
            }
        }
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[m, &mask], 1)?,
            None => mask.clone(),
        };
        let bias = ops::attention_bias(&key_mask, t, true, input.embeds.dtype())?;
        let (cos, sin) = self.rope_slice(past_len, t)?;
        let packing = ops::Packing::new(input.mask)?;
        let mut x = packing.pack(input.embeds)?;
        let mut tapes = Vec::new();
        let mut new_kv = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers.get(l));
            let (y, tape, kv) = self.layer_forward(layer, &x, &packing, &bias, &cos, &sin, past, keep)?;
            tapes.extend(tape);
            new_kv.push(kv);
            x = y;
        }
        let hidden = packing.unpack(&ops::rms_norm(&x, &self.norm, self.cfg.eps)?)?;
        if let Some(c) = cache {
            c.layers = new_kv;
            c.mask = Some(key_mask);
            c.next_pos = None;
        }
        let tape = keep.then_some(LlamaTape {
            past: past_len,
            layers: tapes,
            last: x,
            cos,
            sin,
            packing,
        });
        Ok((hidden, tape))
    }
}

/// RoPE tables `cos`, `sin` of shape `[max_positions, head_dim/2]`.
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let n = cfg.max_positions;
    let mut angles = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        angles.extend(inv.iter().map(|f| p as f32 * f));
    }
    let a = Tensor::from_vec(angles, (n, hd / 2), device)?.to_dtype(dtype)?;
    Ok((a.cos()?, a.sin()?))
}

impl Backbone for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embedding_table(&self) -> &Tensor {
        &self.embed
    }
    fn forward(&self, input: &BackboneInput) -> Result<Tensor> {
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            return Ok(f.forward(input.embeds, input.mask, None, false)?.0);
        }
        Ok(self.run(input, false, None)?.0)
    }
    fn forward_train(&self, input: &BackboneInput) -> Result<(Tensor, Tape)> {
        self.train_forward(input, None)
    }
    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        Ok(self.train_backward(tape, d_hidden)?.0)
    }
    fn forward_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<Tensor> {
        let mut cache = prefix.repeat(input.embeds.dim(0)?)?;
        super::CausalLm::forward_cached(self, input, &mut cache)
    }
    fn forward_train_prefixed(&self, input: &BackboneInput, prefix: &KvCache) -> Result<(Tensor, Tape)> {
        self.train_forward(input, Some(prefix))
    }
    fn backward_prefixed(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.train_backward(tape, d_hidden)
    }
}

impl Llama {
    /// The training forward, after a key/value prefix (one row) when given.
    fn train_forward(&self, input: &BackboneInput, prefix: Option<&KvCache>) -> Result<(Tensor, Tape)> {
        let mut cache = match prefix {
            Some(p) => Some(p.repeat(input.embeds.dim(0)?)?),
            None => None,
        };
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            let (h, tape) = f.forward(input.embeds, input.mask, cache.as_mut(), true)?;
            return Ok((h, Tape(Box::new(tape.expect("keep=true yields a tape")))));
        }
        let (h, tape) = self.run(input, true, cache.as_mut())?;
        Ok((h, Tape(Box::new(tape.expect("keep=true yields a tape")))))
    }

    /// The input gradient and the prefix's gradient (empty without a prefix).
    fn train_backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        if let (Some(f), Some(t)) = (&self.fused, tape.0.downcast_ref::<FusedTape>()) {
            return f.backward(t, d_hidden);
        }
        let tape = tape
            .0
            .downcast_ref::<LlamaTape>()
            .context("tape was not made by a Llama model")?;
        let d_packed = tape.packing.pack(d_hidden)?;
        let mut dx = ops::rms_norm_backward(&tape.last, &self.norm, self.cfg.eps, &d_packed)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
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

impl super::CausalLm for Llama {
    fn forward_cached(&self, input: &BackboneInput, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(f) = &self.fused {
            self.check_width(input)?;
            return Ok(f.forward(input.embeds, input.mask, Some(cache), false)?.0);
        }
        Ok(self.run(input, false, Some(cache))?.0)
    }
    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        match &self.fused {
            Some(f) => {
                self.check_width(input)?;
                f.hidden_at(input.embeds, input.mask, prefix, at)
            }
            None => super::hidden_at_by_forward(self, input, prefix, at),
        }
    }
}
