//! The BERT encoder on fused, multi-threaded f32 CPU kernels: the same math as the composed
//! version in `bert.rs`, over the packed real positions only (padding costs nothing; the hidden
//! states of padded positions are zero).
//!
//! ```text
//! x0 = LN(e + pos + type)
//! per layer: qkv = x·W_qkvᵀ + b;  a = attention(q, K, V);  r1 = x + a·W_oᵀ + b_o;  x1 = LN(r1)
//!            z = x1·W_inᵀ + b_in;  r2 = x1 + gelu(z)·W_outᵀ + b_out;  out = LN(r2)
//! ```

use anyhow::{ensure, Result};
use candle_core::Tensor;
use softprompt_kernels::{activation, attention, matmul, norm, AttentionLayout};

use super::fused::{to_vec, Packed};
use super::profile::{span, Direction};

/// A dense layer `[out, in]` with its bias.
pub struct FusedDense {
    /// Weight rows `[out, in]`.
    pub w: Vec<f32>,
    /// Bias `[out]`.
    pub b: Vec<f32>,
}

impl FusedDense {
    fn forward(&self, x: &[f32], out: &mut [f32], rows: usize, accumulate: bool) {
        let (o, i) = (self.b.len(), self.w.len() / self.b.len());
        matmul::matmul_wt(x, &self.w, out, rows, i, o, accumulate);
        matmul::add_bias(out, &self.b);
    }
    fn backward(&self, dy: &[f32], dx: &mut [f32], rows: usize, accumulate: bool) {
        let (o, i) = (self.b.len(), self.w.len() / self.b.len());
        matmul::matmul(dy, &self.w, dx, rows, o, i, accumulate);
    }
}

/// LayerNorm gain and bias.
pub struct FusedNorm {
    /// Gain `[D]`.
    pub g: Vec<f32>,
    /// Bias `[D]`.
    pub b: Vec<f32>,
}

/// One encoder layer's frozen weights.
pub struct FusedBertLayer {
    /// q, k, v stacked: `[3·D, D]`.
    pub qkv: FusedDense,
    /// Attention output projection.
    pub o: FusedDense,
    /// LayerNorm after attention.
    pub attn_norm: FusedNorm,
    /// MLP up projection `[I, D]`.
    pub inner: FusedDense,
    /// MLP down projection `[D, I]`.
    pub out: FusedDense,
    /// LayerNorm after the MLP.
    pub out_norm: FusedNorm,
}

/// The BERT stack on fused kernels.
pub struct FusedBert {
    /// Encoder layers.
    pub layers: Vec<FusedBertLayer>,
    /// Position embeddings `[max_positions, D]`.
    pub position: Vec<f32>,
    /// Token-type embeddings `[types, D]`.
    pub token_type: Vec<f32>,
    /// Embedding LayerNorm.
    pub emb_norm: FusedNorm,
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP inner size.
    pub intermediate: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
}

struct LayerTape {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    r1: Vec<f32>,
    rstd1: Vec<f32>,
    z: Vec<f32>,
    r2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// The tape of a fused BERT forward.
pub struct FusedBertTape {
    packed: Packed,
    e: Vec<f32>,
    rstd0: Vec<f32>,
    layers: Vec<LayerTape>,
}

impl FusedBert {
    /// Forward over the real positions; hidden states `[B, T, D]` (zeros at padding).
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        token_types: Option<&Tensor>,
        keep: bool,
    ) -> Result<(Tensor, Option<FusedBertTape>)> {
        let d = self.hidden;
        let packed = Packed::new(mask, None)?;
        let types = token_types.map(to_vec).transpose()?;
        let max_pos = self.position.len() / d;
        ensure!(
            packed.cols <= max_pos,
            "sequence of {} positions exceeds the model's {max_pos} positions",
            packed.cols
        );
        let mut e = packed.pack(embeds)?;
        for (i, row) in e.chunks_mut(d).enumerate() {
            let (r, c) = (packed.row[i], packed.col[i]);
            let ty = types.as_ref().map_or(0, |t| t[r * packed.cols + c] as usize);
            ensure!((ty + 1) * d <= self.token_type.len(), "token type {ty} is out of range");
            let (pos, tt) = (
                &self.position[c * d..(c + 1) * d],
                &self.token_type[ty * d..(ty + 1) * d],
            );
            for ((x, p), t) in row.iter_mut().zip(pos).zip(tt) {
                *x += p + t;
            }
        }
        let n = packed.len();
        let (mut x, mut rstd0) = (vec![0f32; n * d], vec![0f32; n]);
        norm::layer_norm(&e, &self.emb_norm.g, &self.emb_norm.b, self.eps, &mut x, &mut rstd0);
        let query_key = packed.col.clone();
        let lay = AttentionLayout {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: d / self.heads,
            keys: packed.cols,
            key_mask: &packed.real,
            query_row: &packed.row,
            query_key: &query_key,
            causal: false,
        };
        let mut tapes = Vec::new();
        for layer in &self.layers {
            let (y, tape) = self.layer_forward(layer, x, &lay, &packed, keep);
            tapes.extend(tape);
            x = y;
        }
        let hidden = packed.unpack(&x, true, embeds.device())?;
        let tape = keep.then_some(FusedBertTape {
            packed,
            e,
            rstd0,
            layers: tapes,
        });
        Ok((hidden, tape))
    }

    /// d(loss)/d(input embeddings) from d(loss)/d(hidden).
    pub fn backward(&self, tape: &FusedBertTape, d_hidden: &Tensor) -> Result<Tensor> {
        let packed = &tape.packed;
        let mut dx = packed.pack_sum(d_hidden)?;
        let query_key = packed.col.clone();
        let lay = AttentionLayout {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.hidden / self.heads,
            keys: packed.cols,
            key_mask: &packed.real,
            query_row: &packed.row,
            query_key: &query_key,
            causal: false,
        };
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
            dx = self.layer_backward(layer, lt, &lay, packed, dx);
        }
        let mut de = vec![0f32; dx.len()];
        norm::layer_norm_backward(&tape.e, &self.emb_norm.g, &tape.rstd0, &dx, &mut de);
        packed.unpack(&de, false, d_hidden.device())
    }

    fn layer_forward(
        &self,
        l: &FusedBertLayer,
        x: Vec<f32>,
        lay: &AttentionLayout,
        packed: &Packed,
        keep: bool,
    ) -> (Vec<f32>, Option<LayerTape>) {
        use Direction::Forward as F;
        let (d, inter) = (self.hidden, self.intermediate);
        let n = x.len() / d;
        let slots = packed.rows * packed.cols;
        let mut qkv = vec![0f32; n * 3 * d];
        span("qkv", F, || l.qkv.forward(&x, &mut qkv, n, false));
        let (mut q, mut k, mut v) = (vec![0f32; n * d], vec![0f32; slots * d], vec![0f32; slots * d]);
        span("copies", F, || {
            for (i, row) in qkv.chunks(3 * d).enumerate() {
                let s = (packed.row[i] * packed.cols + packed.col[i]) * d;
                q[i * d..(i + 1) * d].copy_from_slice(&row[..d]);
                k[s..s + d].copy_from_slice(&row[d..2 * d]);
                v[s..s + d].copy_from_slice(&row[2 * d..]);
            }
        });
        let mut a = vec![0f32; n * d];
        let mut probs = if keep {
            vec![0f32; n * self.heads * packed.cols]
        } else {
            Vec::new()
        };
        span("attention", F, || {
            attention::attention(lay, &q, &k, &v, &mut a, keep.then_some(&mut probs[..]))
        });
        let mut r1 = x;
        span("o-proj", F, || l.o.forward(&a, &mut r1, n, true));
        let (mut x1, mut rstd1) = (a, vec![0f32; n]);
        span("norm", F, || {
            norm::layer_norm(&r1, &l.attn_norm.g, &l.attn_norm.b, self.eps, &mut x1, &mut rstd1)
        });
        let mut z = vec![0f32; n * inter];
        let mut r2 = x1.clone();
        span("mlp", F, || {
            l.inner.forward(&x1, &mut z, n, false);
            let mut g = z.clone();
            activation::gelu_erf(&mut g);
            l.out.forward(&g, &mut r2, n, true);
        });
        let (mut out, mut rstd2) = (x1, vec![0f32; n]);
        span("norm", F, || {
            norm::layer_norm(&r2, &l.out_norm.g, &l.out_norm.b, self.eps, &mut out, &mut rstd2)
        });
        let tape = keep.then_some(LayerTape {
            q,
            k,
            v,
            probs,
            r1,
            rstd1,
            z,
            r2,
            rstd2,
        });
        (out, tape)
    }

    fn layer_backward(
        &self,
        l: &FusedBertLayer,
        t: &LayerTape,
        lay: &AttentionLayout,
        packed: &Packed,
        dy: Vec<f32>,
    ) -> Vec<f32> {
        use Direction::Backward as B;
        let (d, inter) = (self.hidden, self.intermediate);
        let n = dy.len() / d;
        let mut dr2 = vec![0f32; n * d];
        span("norm", B, || {
            norm::layer_norm_backward(&t.r2, &l.out_norm.g, &t.rstd2, &dy, &mut dr2)
        });
        let mut dx1 = dr2.clone();
        span("mlp", B, || {
            let mut dz = vec![0f32; n * inter];
            l.out.backward(&dr2, &mut dz, n, false);
            activation::gelu_erf_backward(&t.z, &mut dz);
            l.inner.backward(&dz, &mut dx1, n, true);
        });
        let mut dr1 = dy; // reuse
        dr1.fill(0.0);
        span("norm", B, || {
            norm::layer_norm_backward(&t.r1, &l.attn_norm.g, &t.rstd1, &dx1, &mut dr1)
        });
        let mut da = dx1; // reuse
        span("o-proj", B, || l.o.backward(&dr1, &mut da, n, false));
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * d], vec![0f32; t.k.len()], vec![0f32; t.v.len()]);
        span("attention", B, || {
            attention::attention_backward(lay, &t.q, &t.k, &t.v, &t.probs, &da, &mut dq, &mut dk, &mut dv)
        });
        let mut dqkv = vec![0f32; n * 3 * d];
        span("copies", B, || {
            for (i, row) in dqkv.chunks_mut(3 * d).enumerate() {
                let s = (packed.row[i] * packed.cols + packed.col[i]) * d;
                row[..d].copy_from_slice(&dq[i * d..(i + 1) * d]);
                row[d..2 * d].copy_from_slice(&dk[s..s + d]);
                row[2 * d..].copy_from_slice(&dv[s..s + d]);
            }
        });
        let mut dx = dr1;
        span("qkv", B, || l.qkv.backward(&dqkv, &mut dx, n, true));
        dx
    }
}
