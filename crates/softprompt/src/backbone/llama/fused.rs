//! The Llama stack on fused, multi-threaded f32 CPU kernels (the hot path): the math of
//! `llama.rs`'s module documentation, one pass per step over the packed real positions, with
//! only the activations the input-gradient pass (`fused/backward.rs`) needs kept on the tape.
//!
//! Per layer (x: `[N, D]` packed real positions; q `[N, q_dim]`; K/V in padded key slots
//! `[B·S, kv_dim]`):
//! ```text
//! n1 = rms(x)·g1            qkv = n1·W_qkvᵀ (+b)        q_h, k_h = rms(q_h)·gq, rms(k_h)·gk (Qwen3)
//! q, k = rope(q, k)         a = attention(q, K, V)      x2 = x + a·W_oᵀ
//! n2 = rms(x2)·g2           gu = n2·W_guᵀ               out = x2 + (silu(g) ⊙ u)·W_downᵀ
//! ```

mod backward;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use softprompt_kernels::{activation, attention, matmul, norm, rope, AttentionLayout};
use std::ops::Range;

use self::backward::{FusedTape, HeadNorms, LayerTape};
use super::{rope_tables, LlamaConfig, LlamaLayer, Stack};
use crate::backbone::frozen_weight::FrozenWeight;
use crate::backbone::fused::{to_vec, Geometry, Packed};
use crate::backbone::profile::{span, Direction};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// A layer's weights for the fused kernels: linear weights packed (or in their file's storage),
/// gains and biases as f32 rows.
type Layer = LlamaLayer<FrozenWeight, Vec<f32>>;

/// The decoder layers, the final norm and the RoPE tables as plain f32 rows.
pub struct FusedStack {
    cfg: LlamaConfig,
    layers: Vec<Layer>,
    /// Final RMSNorm gain `[D]`.
    norm: Vec<f32>,
    /// RoPE tables `[max_positions, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Stack for FusedStack {
    const PATH: KernelPath = KernelPath::Fused;

    /// Moves the layers' weights into the layouts the fused kernels read (f32 linear weights
    /// packed into panels; stored rows kept as they are).
    fn new(cfg: LlamaConfig, layers: Vec<LlamaLayer>, norm: Tensor) -> Result<Self> {
        KernelPath::check_fused(norm.device(), norm.dtype())?;
        let vector = |v: Tensor| to_vec(&v);
        let layers = layers
            .into_iter()
            .map(|l| l.convert(FrozenWeight::from_linear, vector))
            .collect::<Result<_>>()?;
        let (cos, sin) = rope_tables(&cfg, DType::F32, &Device::Cpu)?;
        Ok(Self {
            layers,
            norm: to_vec(&norm)?,
            cos: to_vec(&cos)?,
            sin: to_vec(&sin)?,
            cfg,
        })
    }

    fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Forward over the real positions of `embeds` (`[B, T, D]`, `mask` `[B, T]`) through the
    /// layers `range`, after the positions in `cache` (whose keys and values are then replaced by
    /// the extended ones). Returns the residual stream leaving the range `[B, T, D]` (zeros at
    /// padding), final-normed when the range ends at the last layer, and, with `keep`, the tape
    /// for the backward pass.
    fn forward_layers(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
        range: Range<usize>,
    ) -> Result<(Tensor, Option<Tape>)> {
        let last = range.end == self.layers.len();
        ensure!(
            range.start <= range.end && range.end <= self.layers.len() && (last || !keep),
            "layers {range:?} of a model of {} layers (a kept tape needs the range to end at the last)",
            self.layers.len()
        );
        let (embeds, mask) = (input.embeds, input.mask);
        let device = embeds.device().clone();
        let past = cache.as_ref().map_or(0, |c| c.len());
        // A prefix shared by every row is computed once (not after a cache: rows may differ there).
        let positions = cache.as_ref().and_then(|c| c.next_pos.clone());
        let packed = Packed::new(mask, (past == 0 && positions.is_none()).then_some(embeds))?;
        let geometry = Geometry::new(&packed, past, cache.as_deref(), positions, self.cfg.max_positions)?;
        let mut kv = geometry.past_slots(range.len(), self.cfg.kv_dim(), cache.as_deref())?;
        let mut x = packed.pack(embeds)?;
        let mut tapes = Vec::new();
        for (layer, kv) in self.layers[range.clone()].iter().zip(kv.iter_mut()) {
            let (y, tape) = self.layer_forward(layer, x, &geometry, kv, keep);
            tapes.extend(tape);
            x = y;
        }
        let n = packed.len();
        let (mut h, mut rstd) = (vec![0f32; x.len()], vec![0f32; n]);
        if last {
            norm::rms_norm(&x, &self.norm, self.eps(), &mut h, &mut rstd);
        } else {
            h.copy_from_slice(&x);
        }
        let hidden = packed.unpack(&h, true, &device)?;
        if let Some(c) = cache {
            geometry.store_cache(c, &self.cfg.shape, kv, &device)?;
        }
        let tape = keep.then_some(FusedTape {
            first: range.start,
            past,
            packed,
            geometry,
            layers: tapes,
            last: x,
            last_rstd: rstd,
        });
        Ok((hidden, tape.map(Tape::new)))
    }

    fn backward(&self, tape: &Tape, d_hidden: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.run_backward(tape.get("a fused Llama model")?, d_hidden)
    }

    /// The final-normed hidden states `[R, D]` of the positions `at` (`(row, column)` of the
    /// batch `embeds` `[B, T, D]`, `mask` `[B, T]`; in row, then column order) after the
    /// positions in `prefix` (one row every row continues from, or one per row), which is left
    /// as it is. The last layer runs only at `at`: nothing after it reads the other positions.
    fn hidden_at(&self, input: &BackboneInput, prefix: Option<&KvCache>, at: &[(usize, usize)]) -> Result<Tensor> {
        let (embeds, mask) = (input.embeds, input.mask);
        ensure!(
            at.windows(2).all(|w| w[0] < w[1]),
            "the positions to compute are not in row order, then column order"
        );
        let past = prefix.map_or(0, |c| c.len());
        let positions = prefix.and_then(|c| c.next_pos.clone());
        let packed = Packed::new(mask, (past == 0 && positions.is_none()).then_some(embeds))?;
        let positions = positions.map(|p| match p.as_slice() {
            [one] => vec![*one; packed.rows],
            _ => p,
        });
        let geometry = Geometry::new(&packed, past, prefix, positions, self.cfg.max_positions)?;
        let selected = at
            .iter()
            .map(|&(r, c)| packed.index_of(r, c))
            .collect::<Result<Vec<_>>>()?;
        let mut kv = geometry.past_slots(self.layers.len(), self.cfg.kv_dim(), prefix)?;
        let ((last, body), (last_kv, body_kv)) = (
            self.layers.split_last().context("the model has no layers")?,
            kv.split_last_mut().context("the model has no layers")?,
        );
        let mut x = packed.pack(embeds)?;
        for (layer, kv) in body.iter().zip(body_kv) {
            x = self.layer_forward(layer, x, &geometry, kv, false).0;
        }
        let q = self.attention_inputs(last, &x, &geometry, last_kv, false).q;
        let (d, qd) = (self.cfg.hidden, self.cfg.q_dim());
        let rows_of = |v: &[f32], w: usize| -> Vec<f32> {
            selected.iter().flat_map(|&i| v[i * w..(i + 1) * w].to_vec()).collect()
        };
        // The asked-for row, not the packed one: a shared position's keys sit in every row's slots.
        let query_row: Vec<usize> = at.iter().map(|&(r, _)| r).collect();
        let query_key: Vec<usize> = selected.iter().map(|&i| geometry.query_key[i]).collect();
        let lay = AttentionLayout {
            query_row: &query_row,
            query_key: &query_key,
            ..geometry.layout(&self.cfg.shape)
        };
        let out = self
            .attention_and_mlp(last, &rows_of(&x, d), &rows_of(&q, qd), &lay, last_kv)
            .out;
        let (mut h, mut rstd) = (vec![0f32; out.len()], vec![0f32; selected.len()]);
        norm::rms_norm(&out, &self.norm, self.eps(), &mut h, &mut rstd);
        Ok(Tensor::from_vec(h, (selected.len(), d), embeds.device())?)
    }

    /// The head read once for a few rows ([`softprompt_kernels::head::logits`]) instead of being
    /// packed for a general product.
    fn head_logits(&self, head: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let plain = || Ok(rows.matmul(&head.t()?)?);
        if !KernelPath::fused_runs(rows.device(), rows.dtype()) {
            return plain();
        }
        let ((m, d), (vocab, width)) = (rows.dims2()?, head.dims2()?);
        ensure!(d == width, "hidden rows of width {d} for a head of width {width}");
        let x = to_vec(rows)?;
        let mut out = vec![0f32; m * vocab];
        let (storage, layout) = head.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((start, end))) => {
                softprompt_kernels::head::logits(&x, &all[start..end], &mut out, m, d, vocab)
            }
            _ => return plain(),
        }
        Ok(Tensor::from_vec(out, (m, vocab), rows.device())?)
    }
}

/// What [`FusedStack::attention_and_mlp`] computes: the layer's output and what the backward
/// pass keeps of the MLP block.
struct LayerOutputs {
    out: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    gate_up: Vec<f32>,
}

/// What [`FusedStack::attention_inputs`] computes: the rotated queries, the attention norm's
/// reciprocal RMS, and (Qwen3, when a tape is kept) what the per-head q/k norms' backward needs.
struct AttentionInputs {
    q: Vec<f32>,
    rstd1: Vec<f32>,
    head_norms: Option<HeadNorms>,
}

impl FusedStack {
    fn eps(&self) -> f32 {
        self.cfg.eps as f32
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: Vec<f32>,
        g: &Geometry,
        kv: &mut (Vec<f32>, Vec<f32>),
        keep: bool,
    ) -> (Vec<f32>, Option<LayerTape>) {
        let AttentionInputs { q, rstd1, head_norms } = self.attention_inputs(l, &x, g, kv, keep);
        let rest = self.attention_and_mlp(l, &x, &q, &g.layout(&self.cfg.shape), kv);
        let tape = keep.then(|| LayerTape {
            x,
            rstd1,
            head_norms,
            q,
            k: kv.0.clone(),
            v: kv.1.clone(),
            x2: rest.x2,
            rstd2: rest.rstd2,
            gate_up: rest.gate_up,
        });
        (rest.out, tape)
    }

    /// One layer's queries `[N, q_dim]` (normed, projected, head-normed for Qwen3, rotated) and
    /// its attention norm's reciprocal RMS `[N]` (with `keep`, what the q/k norms' backward
    /// needs); the keys and values of the positions are written into their slots.
    fn attention_inputs(
        &self,
        l: &Layer,
        x: &[f32],
        g: &Geometry,
        (k_slots, v_slots): &mut (Vec<f32>, Vec<f32>),
        keep: bool,
    ) -> AttentionInputs {
        use Direction::Forward as F;
        let (d, hd, qd, kvd) = (
            self.cfg.hidden,
            self.cfg.head_dim(),
            self.cfg.q_dim(),
            self.cfg.kv_dim(),
        );
        let n = x.len() / d;
        let positions = &g.query_pos;
        let (mut n1, mut rstd1) = (vec![0f32; n * d], vec![0f32; n]);
        span("norm", F, || {
            norm::rms_norm(x, &l.attn_norm, self.eps(), &mut n1, &mut rstd1)
        });
        let width = qd + 2 * kvd;
        let mut qkv = vec![0f32; n * width];
        span("qkv", F, || {
            l.w_qkv.matmul_wt(&n1, &mut qkv, n, d, width, false);
            if let Some(b) = &l.b_qkv {
                matmul::add_bias(&mut qkv, b);
            }
        });
        let (mut q, mut k_new) = (n1, vec![0f32; n * kvd]); // n1's buffer takes the queries
        q.resize(n * qd, 0.0);
        span("copies", F, || {
            for (i, row) in qkv.chunks(width).enumerate() {
                q[i * qd..(i + 1) * qd].copy_from_slice(&row[..qd]);
                k_new[i * kvd..(i + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                for s in g.slots(i) {
                    v_slots[s * kvd..(s + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
                }
            }
        });
        // Qwen3: every head's query and key RMS-normed before the rotation (rows of `hd`).
        let head_norms = match (&l.q_norm, &l.k_norm) {
            (Some(gq), Some(gk)) => span("norm", F, || {
                let (mut rstd_q, mut rstd_k) = (vec![0f32; n * self.cfg.heads], vec![0f32; n * self.cfg.kv_heads]);
                let (q_pre, k_pre) = (std::mem::take(&mut q), std::mem::take(&mut k_new));
                q = vec![0f32; q_pre.len()];
                k_new = vec![0f32; k_pre.len()];
                norm::rms_norm(&q_pre, gq, self.eps(), &mut q, &mut rstd_q);
                norm::rms_norm(&k_pre, gk, self.eps(), &mut k_new, &mut rstd_k);
                keep.then_some(HeadNorms {
                    q_pre,
                    k_pre,
                    rstd_q,
                    rstd_k,
                })
            }),
            _ => None,
        };
        span("rope", F, || {
            rope::rope(&mut q, positions, hd, &self.cos, &self.sin, false);
            rope::rope(&mut k_new, positions, hd, &self.cos, &self.sin, false);
        });
        span("copies", F, || {
            for (i, k) in k_new.chunks(kvd).enumerate() {
                for s in g.slots(i) {
                    k_slots[s * kvd..(s + 1) * kvd].copy_from_slice(k);
                }
            }
        });
        AttentionInputs { q, rstd1, head_norms }
    }

    /// The rest of one layer for the queries `q` (`[n, q_dim]`, their residual rows `x` `[n, D]`,
    /// placed by `lay`): attention over the filled slots, the output projection and the MLP.
    fn attention_and_mlp(
        &self,
        l: &Layer,
        x: &[f32],
        q: &[f32],
        lay: &AttentionLayout,
        (k_slots, v_slots): &(Vec<f32>, Vec<f32>),
    ) -> LayerOutputs {
        use Direction::Forward as F;
        let (d, qd, inter) = (self.cfg.hidden, self.cfg.q_dim(), self.cfg.intermediate);
        let n = x.len() / d;
        let mut a = vec![0f32; n * qd];
        span("attention", F, || {
            attention::attention(lay, q, k_slots, v_slots, &mut a)
        });
        let mut x2 = x.to_vec();
        span("o-proj", F, || l.wo.matmul_wt(&a, &mut x2, n, qd, d, true));
        let (mut n2, mut rstd2) = (a, vec![0f32; n]); // a's buffer takes the normed rows
        n2.resize(n * d, 0.0);
        span("norm", F, || {
            norm::rms_norm(&x2, &l.ffn_norm, self.eps(), &mut n2, &mut rstd2)
        });
        let mut gate_up = vec![0f32; n * 2 * inter];
        let mut out = x2.clone();
        span("mlp", F, || {
            l.w_gate_up.matmul_wt(&n2, &mut gate_up, n, d, 2 * inter, false);
            let mut m = vec![0f32; n * inter];
            activation::silu_mul(&gate_up, &mut m, inter);
            l.w_down.matmul_wt(&m, &mut out, n, inter, d, true);
        });
        LayerOutputs {
            out,
            x2,
            rstd2,
            gate_up,
        }
    }
}
