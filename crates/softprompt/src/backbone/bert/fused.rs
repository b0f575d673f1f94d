//! The BERT stack on fused, multi-threaded f32 CPU kernels (the hot path): the math of
//! `bert.rs`'s module documentation over the packed real positions only (padding costs nothing;
//! the hidden states of padded positions are zero).
//!
//! ```text
//! x0 = LN(e + pos + type)
//! per layer: qkv = x·W_qkvᵀ + b;  a = attention(q, K, V);  r1 = x + a·W_oᵀ + b_o;  x1 = LN(r1)
//!            z = x1·W_inᵀ + b_in;  r2 = x1 + gelu(z)·W_outᵀ + b_out;  out = LN(r2)
//! ```

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use softprompt_kernels::{activation, attention, matmul, norm, AttentionLayout};

use super::{BertConfig, BertLayer, Dense, Embeddings, Norm, Stack};
use crate::backbone::fused::{fill_past_slots, sum_past_slots, to_vec, Packed};
use crate::backbone::profile::{span, Direction};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// A dense layer `[out, in]` with its bias.
pub struct FusedDense {
    /// Weight rows `[out, in]`.
    pub w: Vec<f32>,
    /// Bias `[out]`.
    pub b: Vec<f32>,
}

impl FusedDense {
    /// The f32 rows of a loaded dense layer.
    fn new(d: Dense) -> Result<Self> {
        Ok(Self {
            w: to_vec(&d.w)?,
            b: to_vec(&d.b)?,
        })
    }

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

impl FusedNorm {
    /// The f32 rows of a loaded LayerNorm.
    fn new(n: Norm) -> Result<Self> {
        Ok(Self {
            g: to_vec(&n.g)?,
            b: to_vec(&n.b)?,
        })
    }
}

/// One encoder layer's frozen weights as f32 rows.
type Layer = BertLayer<FusedDense, FusedNorm>;

/// The embedding tables and the encoder layers as plain f32 rows.
pub struct FusedStack {
    cfg: BertConfig,
    layers: Vec<Layer>,
    /// Position embeddings `[max_positions, D]`.
    position: Vec<f32>,
    /// Token-type embeddings `[types, D]`.
    token_type: Vec<f32>,
    /// Embedding LayerNorm.
    emb_norm: FusedNorm,
}

impl Stack for FusedStack {
    const PATH: KernelPath = KernelPath::Fused;

    /// Moves the weights into the plain rows the fused kernels read.
    fn new(cfg: BertConfig, emb: Embeddings, layers: Vec<BertLayer>) -> Result<Self> {
        KernelPath::check_fused(emb.position.device(), emb.position.dtype())?;
        let layers = layers
            .into_iter()
            .map(|l| l.convert(FusedDense::new, FusedNorm::new))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            layers,
            position: to_vec(&emb.position)?,
            token_type: to_vec(&emb.token_type)?,
            emb_norm: FusedNorm::new(emb.norm)?,
        })
    }

    /// Forward over the real positions; hidden states `[B, T, D]` (zeros at padding). With a
    /// `prefix` (one row, per layer `[1, H, V, hd]`) every layer's attention sees its `V` keys
    /// and values before the input's, and the input's positions start at `V`.
    fn forward(&self, input: &BackboneInput, prefix: Option<&KvCache>, keep: bool) -> Result<(Tensor, Option<Tape>)> {
        let (d, embeds) = (self.cfg.hidden, input.embeds);
        let packed = Packed::new(input.mask, None)?;
        let prefix_mask = match prefix {
            Some(p) => to_vec(p.mask.as_ref().context("a key/value prefix has a mask")?)?
                .iter()
                .map(|&m| m != 0.0)
                .collect(),
            None => Vec::new(),
        };
        let slots = KeySlots::new(&packed, &prefix_mask);
        let past = slots.past;
        let types = input.token_types.map(to_vec).transpose()?;
        let mut e = packed.pack(embeds)?;
        for (i, row) in e.chunks_mut(d).enumerate() {
            let (r, c) = (packed.row[i], packed.col[i]);
            let ty = types.as_ref().map_or(0, |t| t[r * packed.cols + c] as usize);
            ensure!((ty + 1) * d <= self.token_type.len(), "token type {ty} is out of range");
            let (pos, tt) = (
                &self.position[(past + c) * d..(past + c + 1) * d],
                &self.token_type[ty * d..(ty + 1) * d],
            );
            for ((x, p), t) in row.iter_mut().zip(pos).zip(tt) {
                *x += p + t;
            }
        }
        let n = packed.len();
        let (mut x, mut rstd0) = (vec![0f32; n * d], vec![0f32; n]);
        norm::layer_norm(&e, &self.emb_norm.g, &self.emb_norm.b, self.eps(), &mut x, &mut rstd0);
        let mut tapes = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let size = packed.rows * slots.keys * d;
            let (mut k, mut v) = (vec![0f32; size], vec![0f32; size]);
            if let Some((pk, pv)) = prefix.map(|p| &p.layers[l]) {
                fill_past_slots(pk, &mut k, packed.rows, slots.keys)?;
                fill_past_slots(pv, &mut v, packed.rows, slots.keys)?;
            }
            let (y, tape) = self.layer_forward(layer, x, &slots, &packed, (k, v), keep);
            tapes.extend(tape);
            x = y;
        }
        let hidden = packed.unpack(&x, true, embeds.device())?;
        let tape = keep.then_some(FusedBertTape {
            packed,
            slots,
            e,
            rstd0,
            layers: tapes,
        });
        Ok((hidden, tape.map(Tape::new)))
    }

    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.run_backward(tape.get("a fused BERT model")?, d_hidden)
    }
}

struct LayerTape {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    r1: Vec<f32>,
    rstd1: Vec<f32>,
    z: Vec<f32>,
    r2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// Where one call's key slots sit: per row, the `past` slots of a key/value prefix, then the
/// row's padded columns.
struct KeySlots {
    past: usize,
    keys: usize,
    /// `[rows·keys]` whether each slot holds a real key.
    key_mask: Vec<bool>,
    /// `[N]` key slot of each packed query (bidirectional: not a limit, only bookkeeping).
    query_key: Vec<usize>,
}

impl KeySlots {
    /// The slots of `packed` after a prefix whose key mask is `prefix_mask` (the same in every
    /// row; empty without a prefix).
    fn new(packed: &Packed, prefix_mask: &[bool]) -> Self {
        let past = prefix_mask.len();
        let keys = past + packed.cols;
        let mut key_mask = Vec::with_capacity(packed.rows * keys);
        for row in packed.real.chunks(packed.cols.max(1)).take(packed.rows) {
            key_mask.extend_from_slice(prefix_mask);
            key_mask.extend_from_slice(row);
        }
        let query_key = packed.col.iter().map(|c| past + c).collect();
        Self {
            past,
            keys,
            key_mask,
            query_key,
        }
    }

    /// The key slot of packed position `i`.
    fn slot(&self, packed: &Packed, i: usize) -> usize {
        packed.row[i] * self.keys + self.query_key[i]
    }

    fn layout<'a>(&'a self, m: &FusedStack, packed: &'a Packed) -> AttentionLayout<'a> {
        AttentionLayout {
            heads: m.cfg.heads,
            kv_heads: m.cfg.heads,
            head_dim: m.cfg.head_dim(),
            keys: self.keys,
            key_mask: &self.key_mask,
            query_row: &packed.row,
            query_key: &self.query_key,
            causal: false,
        }
    }
}

/// The tape of a fused BERT forward.
struct FusedBertTape {
    packed: Packed,
    slots: KeySlots,
    e: Vec<f32>,
    rstd0: Vec<f32>,
    layers: Vec<LayerTape>,
}

impl FusedStack {
    fn eps(&self) -> f32 {
        self.cfg.eps as f32
    }

    /// d(loss)/d(input embeddings) from d(loss)/d(hidden), and, after a prefix, its gradient
    /// per layer `(dK, dV)`, each `[1, H, V, hd]`, summed over the rows.
    fn run_backward(&self, tape: &FusedBertTape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (packed, slots) = (&tape.packed, &tape.slots);
        let device = d_hidden.device();
        let hd = self.cfg.head_dim();
        let mut dx = packed.pack_sum(d_hidden)?;
        let mut d_past = Vec::new();
        for (layer, lt) in self.layers.iter().zip(&tape.layers).rev() {
            let (d, (dk, dv)) = self.layer_backward(layer, lt, slots, packed, dx);
            dx = d;
            if slots.past > 0 {
                let shape = (1, self.cfg.heads, slots.past, hd);
                let sum = |g: &[f32]| sum_past_slots(g, packed.rows, slots.keys, slots.past, self.cfg.heads, hd);
                d_past.push((
                    Tensor::from_vec(sum(&dk), shape, device)?,
                    Tensor::from_vec(sum(&dv), shape, device)?,
                ));
            }
        }
        d_past.reverse();
        let mut de = vec![0f32; dx.len()];
        norm::layer_norm_backward(&tape.e, &self.emb_norm.g, &tape.rstd0, &dx, &mut de);
        Ok((packed.unpack(&de, false, device)?, d_past))
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: Vec<f32>,
        slots: &KeySlots,
        packed: &Packed,
        (mut k, mut v): (Vec<f32>, Vec<f32>),
        keep: bool,
    ) -> (Vec<f32>, Option<LayerTape>) {
        use Direction::Forward as F;
        let (d, inter) = (self.cfg.hidden, self.cfg.intermediate);
        let n = x.len() / d;
        let mut qkv = vec![0f32; n * 3 * d];
        span("qkv", F, || l.qkv.forward(&x, &mut qkv, n, false));
        let mut q = vec![0f32; n * d];
        span("copies", F, || {
            for (i, row) in qkv.chunks(3 * d).enumerate() {
                let s = slots.slot(packed, i) * d;
                q[i * d..(i + 1) * d].copy_from_slice(&row[..d]);
                k[s..s + d].copy_from_slice(&row[d..2 * d]);
                v[s..s + d].copy_from_slice(&row[2 * d..]);
            }
        });
        let mut a = vec![0f32; n * d];
        span("attention", F, || {
            let lay = slots.layout(self, packed);
            attention::attention(&lay, &q, &k, &v, &mut a)
        });
        let mut r1 = x;
        span("o-proj", F, || l.o.forward(&a, &mut r1, n, true));
        let (mut x1, mut rstd1) = (a, vec![0f32; n]);
        span("norm", F, || {
            norm::layer_norm(&r1, &l.attn_norm.g, &l.attn_norm.b, self.eps(), &mut x1, &mut rstd1)
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
            norm::layer_norm(&r2, &l.out_norm.g, &l.out_norm.b, self.eps(), &mut out, &mut rstd2)
        });
        let tape = keep.then_some(LayerTape {
            q,
            k,
            v,
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
        l: &Layer,
        t: &LayerTape,
        slots: &KeySlots,
        packed: &Packed,
        dy: Vec<f32>,
    ) -> (Vec<f32>, (Vec<f32>, Vec<f32>)) {
        use Direction::Backward as B;
        let (d, inter) = (self.cfg.hidden, self.cfg.intermediate);
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
            let lay = slots.layout(self, packed);
            attention::attention_backward(&lay, &t.q, &t.k, &t.v, &da, &mut dq, &mut dk, &mut dv)
        });
        let mut dqkv = vec![0f32; n * 3 * d];
        span("copies", B, || {
            for (i, row) in dqkv.chunks_mut(3 * d).enumerate() {
                let s = slots.slot(packed, i) * d;
                row[..d].copy_from_slice(&dq[i * d..(i + 1) * d]);
                row[d..2 * d].copy_from_slice(&dk[s..s + d]);
                row[2 * d..].copy_from_slice(&dv[s..s + d]);
            }
        });
        let mut dx = dr1;
        span("qkv", B, || l.qkv.backward(&dqkv, &mut dx, n, true));
        (dx, (dk, dv))
    }
}
