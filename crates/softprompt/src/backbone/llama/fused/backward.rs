//! The fused Llama stack's input-gradient pass: what the forward keeps on its tape, and the
//! layers run backwards from d(loss)/d(hidden) to d(loss)/d(input embeddings) (and a key/value
//! prefix's gradient), each layer's products by the frozen weights' transposes.
//!
//! Per layer, the forward's steps in reverse (`dy` the gradient of the layer's output):
//! ```text
//! dm = dy·W_down;  dgu = silu_mul'(gu, dm);  dn2 = dgu·W_gu;   dx2 = dy + rms'(x2, dn2)
//! da = dx2·W_o;    dq, dK, dV = attention'(q, K, V, da);     dq, dk = rope⁻¹(dq, dk)
//! dq_h, dk_h = rms'(q_h, dq_h), rms'(k_h, dk_h)   (per head, Qwen3's q/k norms)
//! dn1 = [dq, dk, dv]·W_qkv;  dx = dx2 + rms'(x, dn1)
//! ```

use anyhow::Result;
use candle_core::Tensor;
use softprompt_kernels::{activation, attention, norm, rope};

use super::{FusedStack, Layer};
use crate::backbone::fused::{sum_past_slots, Geometry, Packed};
use crate::backbone::profile::{span, Direction};

/// What the per-head q/k norms (Qwen3) keep for the backward pass: their inputs and
/// reciprocal RMS per (position, head).
pub(super) struct HeadNorms {
    /// Queries `[N, q_dim]` before their norm.
    pub(super) q_pre: Vec<f32>,
    /// New keys `[N, kv_dim]` before their norm.
    pub(super) k_pre: Vec<f32>,
    /// `[N·heads]`.
    pub(super) rstd_q: Vec<f32>,
    /// `[N·kv_heads]`.
    pub(super) rstd_k: Vec<f32>,
}

/// What one layer keeps for the backward pass.
pub(super) struct LayerTape {
    pub(super) x: Vec<f32>,
    pub(super) rstd1: Vec<f32>,
    /// The q/k norms' inputs (Qwen3), `None` for the other models.
    pub(super) head_norms: Option<HeadNorms>,
    pub(super) q: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) x2: Vec<f32>,
    pub(super) rstd2: Vec<f32>,
    pub(super) gate_up: Vec<f32>,
}

/// The tape of a fused forward pass.
pub(super) struct FusedTape {
    /// The first layer the forward ran (the backward stops there).
    pub(super) first: usize,
    /// Cached (prefix) positions before the input.
    pub(super) past: usize,
    pub(super) packed: Packed,
    pub(super) geometry: Geometry,
    pub(super) layers: Vec<LayerTape>,
    pub(super) last: Vec<f32>,
    pub(super) last_rstd: Vec<f32>,
}

impl FusedStack {
    /// d(loss)/d(input embeddings) `[B, T, D]` (of the residual stream entering the first layer
    /// the forward ran) from d(loss)/d(hidden) `[B, T, D]`, and, when
    /// the forward ran after cached positions (a key/value prefix), their gradient per layer:
    /// `(dK, dV)`, each `[1, Hkv, past, hd]`, summed over the rows.
    pub(super) fn run_backward(&self, tape: &FusedTape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let device = d_hidden.device();
        let dh = tape.packed.pack_sum(d_hidden)?;
        let mut dx = vec![0f32; dh.len()];
        norm::rms_norm_backward(&tape.last, &self.norm, &tape.last_rstd, &dh, &mut dx);
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers[tape.first..].iter().zip(&tape.layers).rev() {
            let (d, (dk, dv)) = self.layer_backward(layer, lt, &tape.geometry, dx);
            dx = d;
            if tape.past > 0 {
                let shape = (1, self.cfg.kv_heads, tape.past, self.cfg.head_dim());
                let (dk, dv) = (self.sum_past(&dk, tape), self.sum_past(&dv, tape));
                d_past.push((
                    Tensor::from_vec(dk, shape, device)?,
                    Tensor::from_vec(dv, shape, device)?,
                ));
            }
        }
        d_past.reverse();
        Ok((tape.packed.unpack(&dx, false, device)?, d_past))
    }

    /// The gradient of the cached slots `[B·S, kv_dim]` → `[Hkv, past, hd]`, summed over rows.
    fn sum_past(&self, slots: &[f32], tape: &FusedTape) -> Vec<f32> {
        let g = &tape.geometry;
        sum_past_slots(slots, g.rows, g.keys, tape.past, self.cfg.kv_heads, self.cfg.head_dim())
    }

    /// One layer's input gradient, and the gradient of every key/value slot (for a prefix).
    fn layer_backward(&self, l: &Layer, t: &LayerTape, g: &Geometry, dy: Vec<f32>) -> (Vec<f32>, (Vec<f32>, Vec<f32>)) {
        use Direction::Backward as B;
        let (d, hd, qd, kvd, inter) = (
            self.cfg.hidden,
            self.cfg.head_dim(),
            self.cfg.q_dim(),
            self.cfg.kv_dim(),
            self.cfg.intermediate,
        );
        let n = dy.len() / d;
        let positions = &g.query_pos;
        // MLP block
        let mut dn2 = vec![0f32; n * d];
        span("mlp", B, || {
            let mut dm = vec![0f32; n * inter];
            l.w_down.matmul(&dy, &mut dm, n, d, inter, false);
            let mut dgu = vec![0f32; n * 2 * inter];
            activation::silu_mul_backward(&t.gate_up, &dm, &mut dgu, inter);
            l.w_gate_up.matmul(&dgu, &mut dn2, n, 2 * inter, d, false);
        });
        let mut dx2 = dy;
        span("norm", B, || {
            norm::rms_norm_backward(&t.x2, &l.ffn_norm, &t.rstd2, &dn2, &mut dx2)
        });
        // attention block
        let mut da = vec![0f32; n * qd];
        span("o-proj", B, || l.wo.matmul(&dx2, &mut da, n, d, qd, false));
        let mut dq = vec![0f32; n * qd];
        let (mut dk, mut dv) = (vec![0f32; t.k.len()], vec![0f32; t.v.len()]);
        span("attention", B, || {
            let lay = g.layout(&self.cfg.shape);
            attention::attention_backward(&lay, &t.q, &t.k, &t.v, &da, &mut dq, &mut dk, &mut dv)
        });
        let mut dk_new = vec![0f32; n * kvd];
        span("copies", B, || {
            for (i, row) in dk_new.chunks_mut(kvd).enumerate() {
                for s in g.slots(i) {
                    for (r, d) in row.iter_mut().zip(&dk[s * kvd..(s + 1) * kvd]) {
                        *r += d;
                    }
                }
            }
        });
        span("rope", B, || {
            rope::rope(&mut dq, positions, hd, &self.cos, &self.sin, true);
            rope::rope(&mut dk_new, positions, hd, &self.cos, &self.sin, true);
        });
        if let (Some(gq), Some(gk), Some(hn)) = (&l.q_norm, &l.k_norm, &t.head_norms) {
            span("norm", B, || {
                let (mut dq_pre, mut dk_pre) = (vec![0f32; dq.len()], vec![0f32; dk_new.len()]);
                norm::rms_norm_backward(&hn.q_pre, gq, &hn.rstd_q, &dq, &mut dq_pre);
                norm::rms_norm_backward(&hn.k_pre, gk, &hn.rstd_k, &dk_new, &mut dk_pre);
                (dq, dk_new) = (dq_pre, dk_pre);
            });
        }
        let width = qd + 2 * kvd;
        let mut dqkv = vec![0f32; n * width];
        span("copies", B, || {
            for (i, row) in dqkv.chunks_mut(width).enumerate() {
                row[..qd].copy_from_slice(&dq[i * qd..(i + 1) * qd]);
                row[qd..qd + kvd].copy_from_slice(&dk_new[i * kvd..(i + 1) * kvd]);
                for s in g.slots(i) {
                    for (r, v) in row[qd + kvd..].iter_mut().zip(&dv[s * kvd..(s + 1) * kvd]) {
                        *r += v;
                    }
                }
            }
        });
        let mut dn1 = dn2; // reuse: [n, D]
        span("qkv", B, || l.w_qkv.matmul(&dqkv, &mut dn1, n, width, d, false));
        let mut dx = dx2;
        span("norm", B, || {
            norm::rms_norm_backward(&t.x, &l.attn_norm, &t.rstd1, &dn1, &mut dx)
        });
        (dx, (dk, dv))
    }
}
