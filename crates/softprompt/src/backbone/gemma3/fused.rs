//! The Gemma 3 stack on fused, multi-threaded f32 CPU kernels: the math of `gemma3.rs`'s module
//! documentation, one pass per step over the packed real positions, with only the activations
//! the input-gradient pass (`fused/backward.rs`) needs kept on the tape. Norm gains are the
//! effective `1 + w`; the attention of sliding layers is in `fused/window.rs`, the gated GELU in
//! `fused/gelu.rs`.
//!
//! Per layer (x: `[N, D]` packed real positions; q `[N, q_dim]`; K/V in padded key slots
//! `[B·S, kv_dim]`; `c = sqrt(head_dim / query_pre_attn_scalar)`):
//! ```text
//! n1 = rms(x)·g_in          qkv = n1·W_qkvᵀ            q_h, k_h = rms(q_h)·g_q, rms(k_h)·g_k
//! q, k = rope_kind(q, k)    q = c·q                    a = attention_kind(q, K, V)
//! o = a·W_oᵀ                x2 = x + rms(o)·g_post_attn
//! n2 = rms(x2)·g_pre_ffn    gu = n2·W_guᵀ              y = (gelu_tanh(g) ⊙ u)·W_downᵀ
//! out = x2 + rms(y)·g_post_ffn
//! ```

mod backward;
mod gelu;
mod window;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use softprompt_kernels::{norm, rope, AttentionLayout};

use self::backward::{FusedTape, LayerTape};
use self::window::Window;
use super::{rope_tables, AttentionKind, Gemma3Config, Gemma3Layer, Gemma3Stack};
use crate::backbone::frozen_weight::FrozenWeight;
use crate::backbone::fused::{to_vec, Geometry, Packed};
use crate::backbone::profile::{span, Direction};
use crate::backbone::{BackboneInput, KernelPath, KvCache, Tape};

/// A layer's weights for the fused kernels: linear weights packed (or in their file's storage),
/// gains as f32 rows.
type Layer = Gemma3Layer<FrozenWeight, Vec<f32>>;

/// The decoder layers, the final norm and each layer kind's RoPE tables as plain f32 rows.
pub struct FusedStack {
    cfg: Gemma3Config,
    layers: Vec<Layer>,
    /// Final norm gain `[D]`.
    norm: Vec<f32>,
    /// `(cos, sin)` `[max_positions, head_dim/2]`: the global layers', then the sliding ones'.
    tables: [(Vec<f32>, Vec<f32>); 2],
}

impl Gemma3Stack for FusedStack {
    const PATH: KernelPath = KernelPath::Fused;

    /// Moves the layers' weights into the layouts the fused kernels read.
    fn new(cfg: Gemma3Config, layers: Vec<Gemma3Layer>, norm: Tensor) -> Result<Self> {
        KernelPath::check_fused(norm.device(), norm.dtype())?;
        let vector = |v: Tensor| to_vec(&v);
        let layers = layers
            .into_iter()
            .map(|l| l.convert(FrozenWeight::from_linear, vector))
            .collect::<Result<_>>()?;
        let table = |rope| -> Result<(Vec<f32>, Vec<f32>)> {
            let (cos, sin) = rope_tables(&cfg, rope, DType::F32, &Device::Cpu)?;
            Ok((to_vec(&cos)?, to_vec(&sin)?))
        };
        let tables = [table(&cfg.global_rope)?, table(&cfg.local_rope)?];
        Ok(Self {
            layers,
            norm: to_vec(&norm)?,
            tables,
            cfg,
        })
    }

    /// Forward over the real positions of `embeds` (`[B, T, D]`, `mask` `[B, T]`), after the
    /// positions in `cache` (whose keys and values are then replaced by the extended ones).
    fn forward(
        &self,
        input: &BackboneInput,
        cache: Option<&mut KvCache>,
        keep: bool,
    ) -> Result<(Tensor, Option<Tape>)> {
        let (embeds, mask) = (input.embeds, input.mask);
        let device = embeds.device().clone();
        let past = cache.as_ref().map_or(0, |c| c.len());
        // A prefix shared by every row is computed once (not after a cache: rows may differ there).
        let positions = cache.as_ref().and_then(|c| c.next_pos.clone());
        let packed = Packed::new(mask, (past == 0 && positions.is_none()).then_some(embeds))?;
        let geometry = Geometry::new(&packed, past, cache.as_deref(), positions, self.cfg.max_positions)?;
        let mut kv = geometry.past_slots(self.layers.len(), self.cfg.kv_dim(), cache.as_deref())?;
        let mut x = packed.pack(embeds)?;
        let mut tapes = Vec::new();
        for (layer, kv) in self.layers.iter().zip(kv.iter_mut()) {
            let (y, tape) = self.layer_forward(layer, x, &geometry, kv, keep);
            tapes.extend(tape);
            x = y;
        }
        let (mut h, mut rstd) = (vec![0f32; x.len()], vec![0f32; packed.len()]);
        norm::rms_norm(&x, &self.norm, self.eps(), &mut h, &mut rstd);
        let hidden = packed.unpack(&h, true, &device)?;
        if let Some(c) = cache {
            geometry.store_cache(c, &self.cfg.shape, kv, &device)?;
        }
        let tape = keep.then_some(FusedTape {
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
        self.run_backward(tape.get("a fused Gemma 3 model")?, d_hidden)
    }

    /// The final-normed hidden states `[R, D]` of the positions `at` (`(row, column)`, in row,
    /// then column order) after the positions in `prefix`, which is left as it is. The last
    /// layer runs only at `at`.
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
        let query_pos: Vec<usize> = selected.iter().map(|&i| geometry.query_pos[i]).collect();
        let lay = AttentionLayout {
            query_row: &query_row,
            query_key: &query_key,
            ..geometry.layout(&self.cfg.shape)
        };
        let window = self.window(last.kind, &geometry, &query_pos);
        let out = self
            .attention_and_mlp(last, &rows_of(&x, d), &rows_of(&q, qd), &lay, window.as_ref(), last_kv)
            .out;
        let (mut h, mut rstd) = (vec![0f32; out.len()], vec![0f32; selected.len()]);
        norm::rms_norm(&out, &self.norm, self.eps(), &mut h, &mut rstd);
        Ok(Tensor::from_vec(h, (selected.len(), d), embeds.device())?)
    }

    /// The head read once for a few rows ([`softprompt_kernels::head::logits`]).
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
/// pass keeps.
struct LayerOutputs {
    out: Vec<f32>,
    /// The attention's output after its projection, before its norm, and that norm's 1/rms.
    o: Vec<f32>,
    rstd_o: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    gate_up: Vec<f32>,
    /// The MLP's output before its norm, and that norm's 1/rms.
    y: Vec<f32>,
    rstd_y: Vec<f32>,
}

/// What [`FusedStack::attention_inputs`] computes: the rotated, scaled queries, the attention
/// norm's reciprocal RMS, and (when a tape is kept) the per-head norms' inputs and 1/rms.
struct AttentionInputs {
    q: Vec<f32>,
    rstd1: Vec<f32>,
    head_norms: Option<backward::HeadNorms>,
}

impl FusedStack {
    fn eps(&self) -> f32 {
        self.cfg.eps as f32
    }

    /// `(cos, sin)` of layers of `kind`.
    fn table(&self, kind: AttentionKind) -> (&[f32], &[f32]) {
        let (cos, sin) = match kind {
            AttentionKind::Global => &self.tables[0],
            AttentionKind::Sliding => &self.tables[1],
        };
        (cos, sin)
    }

    /// The window of a layer of `kind` for queries at `query_pos` (`None` on global layers).
    fn window<'a>(&self, kind: AttentionKind, geometry: &'a Geometry, query_pos: &'a [usize]) -> Option<Window<'a>> {
        self.cfg.window(kind).map(|size| Window {
            size,
            geometry,
            query_pos,
        })
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
        let window = self.window(l.kind, g, &g.query_pos);
        let rest = self.attention_and_mlp(l, &x, &q, &g.layout(&self.cfg.shape), window.as_ref(), kv);
        let tape = keep.then(|| LayerTape {
            x,
            rstd1,
            head_norms,
            q,
            k: kv.0.clone(),
            v: kv.1.clone(),
            o: rest.o,
            rstd_o: rest.rstd_o,
            x2: rest.x2,
            rstd2: rest.rstd2,
            gate_up: rest.gate_up,
            y: rest.y,
            rstd_y: rest.rstd_y,
        });
        (rest.out, tape)
    }

    /// One layer's queries `[N, q_dim]` (normed, projected, head-normed, rotated, scaled) and
    /// its input norm's reciprocal RMS `[N]`; the keys and values of the positions are written
    /// into their slots.
    fn attention_inputs(
        &self,
        l: &Layer,
        x: &[f32],
        g: &Geometry,
        (k_slots, v_slots): &mut (Vec<f32>, Vec<f32>),
        keep: bool,
    ) -> AttentionInputs {
        use Direction::Forward as F;
        let (d, hd, qd, kvd) = (self.cfg.hidden, self.cfg.head_dim, self.cfg.q_dim(), self.cfg.kv_dim());
        let n = x.len() / d;
        let (mut n1, mut rstd1) = (vec![0f32; n * d], vec![0f32; n]);
        span("norm", F, || {
            norm::rms_norm(x, &l.attn_norm, self.eps(), &mut n1, &mut rstd1)
        });
        let width = qd + 2 * kvd;
        let mut qkv = vec![0f32; n * width];
        span("qkv", F, || l.w_qkv.matmul_wt(&n1, &mut qkv, n, d, width, false));
        let (mut q_pre, mut k_pre) = (vec![0f32; n * qd], vec![0f32; n * kvd]);
        span("copies", F, || {
            for (i, row) in qkv.chunks(width).enumerate() {
                q_pre[i * qd..(i + 1) * qd].copy_from_slice(&row[..qd]);
                k_pre[i * kvd..(i + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                for s in g.slots(i) {
                    v_slots[s * kvd..(s + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
                }
            }
        });
        // Every head's query and key RMS-normed (rows of `hd`).
        let (mut q, mut k) = (vec![0f32; n * qd], vec![0f32; n * kvd]);
        let (mut rstd_q, mut rstd_k) = (vec![0f32; n * self.cfg.heads], vec![0f32; n * self.cfg.kv_heads]);
        span("norm", F, || {
            norm::rms_norm(&q_pre, &l.q_norm, self.eps(), &mut q, &mut rstd_q);
            norm::rms_norm(&k_pre, &l.k_norm, self.eps(), &mut k, &mut rstd_k);
        });
        let (cos, sin) = self.table(l.kind);
        span("rope", F, || {
            rope::rope(&mut q, &g.query_pos, hd, cos, sin, false);
            rope::rope(&mut k, &g.query_pos, hd, cos, sin, false);
            if let Some(c) = self.cfg.query_scale() {
                q.iter_mut().for_each(|v| *v *= c as f32);
            }
        });
        span("copies", F, || {
            for (i, k) in k.chunks(kvd).enumerate() {
                for s in g.slots(i) {
                    k_slots[s * kvd..(s + 1) * kvd].copy_from_slice(k);
                }
            }
        });
        let head_norms = keep.then_some(backward::HeadNorms {
            q_pre,
            k_pre,
            rstd_q,
            rstd_k,
        });
        AttentionInputs { q, rstd1, head_norms }
    }

    /// The rest of one layer for the queries `q` (`[n, q_dim]`, their residual rows `x` `[n, D]`,
    /// placed by `lay`, limited by `window` on sliding layers): attention over the filled slots,
    /// the output projection and its norm, and the MLP between its norms.
    fn attention_and_mlp(
        &self,
        l: &Layer,
        x: &[f32],
        q: &[f32],
        lay: &AttentionLayout,
        window: Option<&Window>,
        (k_slots, v_slots): &(Vec<f32>, Vec<f32>),
    ) -> LayerOutputs {
        use Direction::Forward as F;
        let (d, qd, inter) = (self.cfg.hidden, self.cfg.q_dim(), self.cfg.intermediate);
        let n = x.len() / d;
        let mut a = vec![0f32; n * qd];
        span("attention", F, || {
            window::attention(lay, window, q, k_slots, v_slots, &mut a)
        });
        let mut o = vec![0f32; n * d];
        span("o-proj", F, || l.wo.matmul_wt(&a, &mut o, n, qd, d, false));
        let (mut x2, mut rstd_o) = (vec![0f32; n * d], vec![0f32; n]);
        span("norm", F, || {
            norm::rms_norm(&o, &l.post_attn_norm, self.eps(), &mut x2, &mut rstd_o);
            x2.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        });
        let (mut n2, mut rstd2) = (vec![0f32; n * d], vec![0f32; n]);
        span("norm", F, || {
            norm::rms_norm(&x2, &l.pre_ffn_norm, self.eps(), &mut n2, &mut rstd2)
        });
        let mut gate_up = vec![0f32; n * 2 * inter];
        let mut y = vec![0f32; n * d];
        span("mlp", F, || {
            l.w_gate_up.matmul_wt(&n2, &mut gate_up, n, d, 2 * inter, false);
            let mut m = vec![0f32; n * inter];
            gelu::gelu_tanh_mul(&gate_up, &mut m, inter);
            l.w_down.matmul_wt(&m, &mut y, n, inter, d, false);
        });
        let (mut out, mut rstd_y) = (n2, vec![0f32; n]); // n2's buffer takes the output
        span("norm", F, || {
            norm::rms_norm(&y, &l.post_ffn_norm, self.eps(), &mut out, &mut rstd_y);
            out.iter_mut().zip(&x2).for_each(|(a, b)| *a += b);
        });
        LayerOutputs {
            out,
            o,
            rstd_o,
            x2,
            rstd2,
            gate_up,
            y,
            rstd_y,
        }
    }
}
