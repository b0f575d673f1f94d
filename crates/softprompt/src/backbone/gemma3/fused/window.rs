//! Attention of Gemma 3's layers on the fused path, sliding-window layers included.
//!
//! A sliding layer's query at position `p` sees the real key slots up to its own whose position
//! is `> p − window` (a cached or prefix slot's position is its index; a new slot's, its row's
//! base plus its column: [`Geometry::key_pos`]). A query at a position below `window` loses no
//! key to the window, so those queries (all of them in sequences shorter than the window: the
//! usual training and scoring batches) run on the blocked causal kernels of
//! `softprompt_kernels::attention`. The others ("far" queries) are computed here, one query at a
//! time over its visible keys, forward and backward:
//! ```text
//! s_j = scale·q·k_j,  p = softmax(s) over visible j,  out = Σ_j p_j·v_j
//! dp_j = dout·v_j,    ds_j = p_j·(dp_j − Σ p·dp),     dq = scale·Σ_j ds_j·k_j
//! dk_j += scale·ds_j·q,  dv_j += p_j·dout
//! ```
//! with the kernels' `scale = 1/sqrt(head_dim)` (Gemma's `query_pre_attn_scalar` is applied to
//! the queries before).

use rayon::prelude::*;
use softprompt_kernels::{attention as kernels, AttentionLayout};

use crate::backbone::fused::Geometry;

/// What limits a sliding layer's queries: the window and where positions are.
pub(super) struct Window<'a> {
    /// A query at position `p` sees key positions `> p − size`.
    pub(super) size: usize,
    /// The call's key slots (their positions: [`Geometry::key_pos`]).
    pub(super) geometry: &'a Geometry,
    /// `[n]` position of each query of the layout.
    pub(super) query_pos: &'a [usize],
}

impl Window<'_> {
    /// Whether key slot `j` of row `row` is inside the window of a query at position `pos`.
    fn sees(&self, row: usize, j: usize, pos: usize) -> bool {
        self.geometry.key_pos(row, j) + self.size > pos
    }

    /// The queries the window limits (position ≥ size), in order.
    fn far(&self) -> Vec<usize> {
        (0..self.query_pos.len())
            .filter(|&i| self.query_pos[i] >= self.size)
            .collect()
    }
}

/// The key slots query `i` of `lay` sees: real, causal, and inside `window`.
fn visible(lay: &AttentionLayout, window: &Window, i: usize) -> Vec<usize> {
    let (row, pos) = (lay.query_row[i], window.query_pos[i]);
    (0..=lay.query_key[i].min(lay.keys - 1))
        .filter(|&j| lay.key_mask[row * lay.keys + j] && window.sees(row, j, pos))
        .collect()
}

/// `Σ a·b` in 8 lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a·x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Softmax attention of the queries of `lay` (`q: [n, H·hd]`) over the key/value slots
/// (`[rows·keys, Hkv·hd]`), limited by `window` on sliding layers; writes `out: [n, H·hd]`.
pub(super) fn attention(
    lay: &AttentionLayout,
    window: Option<&Window>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let far = window.map(Window::far).unwrap_or_default();
    let Some(window) = window.filter(|_| !far.is_empty()) else {
        return kernels::attention(lay, q, k, v, out);
    };
    let width = lay.heads * lay.head_dim;
    let near = complement(&far, lay.query_row.len());
    if !near.is_empty() {
        let sub = Subset::new(lay, &near);
        let mut o = vec![0f32; near.len() * width];
        kernels::attention(&sub.layout(lay), &gather(q, &near, width), k, v, &mut o);
        scatter(&o, &near, width, out);
    }
    let rows: Vec<Vec<f32>> = far
        .par_iter()
        .map(|&i| softprompt_kernels::simd::wide(|| far_forward(lay, window, i, q, k, v)))
        .collect();
    for (&i, row) in far.iter().zip(rows) {
        out[i * width..(i + 1) * width].copy_from_slice(&row);
    }
}

/// Input gradients of [`attention`] from `d_out: [n, H·hd]`: writes `dq` (like `q`) and `dk`,
/// `dv` (like the slots; zero where no query looked).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    lay: &AttentionLayout,
    window: Option<&Window>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let far = window.map(Window::far).unwrap_or_default();
    let Some(window) = window.filter(|_| !far.is_empty()) else {
        return kernels::attention_backward(lay, q, k, v, d_out, dq, dk, dv);
    };
    let width = lay.heads * lay.head_dim;
    let near = complement(&far, lay.query_row.len());
    if near.is_empty() {
        dk.fill(0.0);
        dv.fill(0.0);
    } else {
        let sub = Subset::new(lay, &near);
        let mut dq_near = vec![0f32; near.len() * width];
        let (q_near, do_near) = (gather(q, &near, width), gather(d_out, &near, width));
        kernels::attention_backward(&sub.layout(lay), &q_near, k, v, &do_near, &mut dq_near, dk, dv);
        scatter(&dq_near, &near, width, dq);
    }
    // One task per (batch row, key/value head): its far queries' heads of that group, their dq
    // rows and the group's dK/dV of that row.
    let (hd, kvd, keys) = (lay.head_dim, lay.kv_heads * lay.head_dim, lay.keys);
    let mut tasks: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for &i in &far {
        let row = lay.query_row[i];
        if tasks.last().is_none_or(|t| t.0 != row) {
            tasks.extend((0..lay.kv_heads).map(|g| (row, g, Vec::new())));
        }
        let n = tasks.len();
        for t in &mut tasks[n - lay.kv_heads..] {
            t.2.push(i);
        }
    }
    let grads: Vec<FarGrads> = tasks
        .par_iter()
        .map(|(row, g, queries)| {
            softprompt_kernels::simd::wide(|| far_backward(lay, window, (*row, *g), queries, q, k, v, d_out))
        })
        .collect();
    let group = lay.heads / lay.kv_heads;
    for ((row, g, queries), gr) in tasks.iter().zip(grads) {
        for (n, &i) in queries.iter().enumerate() {
            for r in 0..group {
                let head = g * group + r;
                let src = &gr.dq[(n * group + r) * hd..][..hd];
                dq[i * width + head * hd..][..hd].copy_from_slice(src);
            }
        }
        for j in 0..keys {
            let at = (row * keys + j) * kvd + g * hd;
            axpy(1.0, &gr.dk[j * hd..(j + 1) * hd], &mut dk[at..at + hd]);
            axpy(1.0, &gr.dv[j * hd..(j + 1) * hd], &mut dv[at..at + hd]);
        }
    }
}

/// One far query's output row `[H·hd]`.
fn far_forward(lay: &AttentionLayout, window: &Window, i: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (h, hd, keys) = (lay.heads, lay.head_dim, lay.keys);
    let (kvd, group) = (lay.kv_heads * hd, h / lay.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let row = lay.query_row[i];
    let seen = visible(lay, window, i);
    let mut out = vec![0f32; h * hd];
    let mut p = vec![0f32; seen.len()];
    for head in 0..h {
        let slot = |j: usize| (row * keys + j) * kvd + (head / group) * hd;
        let qh = &q[(i * h + head) * hd..][..hd];
        softmax_scores(&seen, &mut p, |j| scale * dot(qh, &k[slot(j)..slot(j) + hd]));
        let o = &mut out[head * hd..(head + 1) * hd];
        for (&j, &pj) in seen.iter().zip(&p) {
            axpy(pj, &v[slot(j)..slot(j) + hd], o);
        }
    }
    out
}

/// `p = softmax(score(j))` over the slots `seen`.
fn softmax_scores(seen: &[usize], p: &mut [f32], score: impl Fn(usize) -> f32) {
    for (p, &j) in p.iter_mut().zip(seen) {
        *p = score(j);
    }
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in p.iter_mut() {
        *x = softprompt_kernels::exp::exp(*x - max);
        sum += *x;
    }
    for x in p.iter_mut() {
        *x /= sum;
    }
}

/// A (batch row, key/value head) task's gradients: `dq` of its queries' heads
/// `[queries·group, hd]`, and `dk`, `dv` of that head's slots in that row `[keys, hd]`.
struct FarGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn far_backward(
    lay: &AttentionLayout,
    window: &Window,
    (row, g): (usize, usize),
    queries: &[usize],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
) -> FarGrads {
    let (h, hd, keys) = (lay.heads, lay.head_dim, lay.keys);
    let (kvd, group) = (lay.kv_heads * hd, h / lay.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let slot = |j: usize| (row * keys + j) * kvd + g * hd;
    let mut out = FarGrads {
        dq: vec![0f32; queries.len() * group * hd],
        dk: vec![0f32; keys * hd],
        dv: vec![0f32; keys * hd],
    };
    for (n, &i) in queries.iter().enumerate() {
        let seen = visible(lay, window, i);
        let (mut p, mut ds) = (vec![0f32; seen.len()], vec![0f32; seen.len()]);
        for r in 0..group {
            let head = g * group + r;
            let qh = &q[(i * h + head) * hd..][..hd];
            let doh = &d_out[(i * h + head) * hd..][..hd];
            softmax_scores(&seen, &mut p, |j| scale * dot(qh, &k[slot(j)..slot(j) + hd]));
            for (d, &j) in ds.iter_mut().zip(&seen) {
                *d = dot(doh, &v[slot(j)..slot(j) + hd]);
            }
            let mean: f32 = p.iter().zip(&ds).map(|(p, d)| p * d).sum();
            let dqh = &mut out.dq[(n * group + r) * hd..][..hd];
            for ((&j, &pj), d) in seen.iter().zip(&p).zip(ds.iter_mut()) {
                *d = pj * (*d - mean);
                axpy(scale * *d, &k[slot(j)..slot(j) + hd], dqh);
                axpy(scale * *d, qh, &mut out.dk[j * hd..(j + 1) * hd]);
                axpy(pj, doh, &mut out.dv[j * hd..(j + 1) * hd]);
            }
        }
    }
    out
}

/// The indices `0..n` not in `far` (sorted).
fn complement(far: &[usize], n: usize) -> Vec<usize> {
    let mut is_far = vec![false; n];
    for &i in far {
        is_far[i] = true;
    }
    (0..n).filter(|&i| !is_far[i]).collect()
}

/// Rows `idx` of `x` (`[n, width]`).
fn gather(x: &[f32], idx: &[usize], width: usize) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| x[i * width..(i + 1) * width].iter().copied())
        .collect()
}

/// Row `r` of `x` to row `idx[r]` of `out`.
fn scatter(x: &[f32], idx: &[usize], width: usize, out: &mut [f32]) {
    for (r, &i) in idx.iter().enumerate() {
        out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
    }
}

/// Some of a layout's queries (in order), as a layout of their own.
struct Subset {
    query_row: Vec<usize>,
    query_key: Vec<usize>,
}

impl Subset {
    fn new(lay: &AttentionLayout, idx: &[usize]) -> Self {
        Self {
            query_row: idx.iter().map(|&i| lay.query_row[i]).collect(),
            query_key: idx.iter().map(|&i| lay.query_key[i]).collect(),
        }
    }

    fn layout<'a>(&'a self, lay: &AttentionLayout<'a>) -> AttentionLayout<'a> {
        AttentionLayout {
            query_row: &self.query_row,
            query_key: &self.query_key,
            ..*lay
        }
    }
}
