//! Scaled dot-product attention over packed queries and padded keys, causal or not, with
//! grouped-query heads, and its input gradient.
//!
//! Queries are the packed real positions `q: [N, heads·head_dim]` (rows of the batch one after
//! another). Keys and values sit in a padded, token-major layout `[rows·keys, kv_heads·head_dim]`:
//! key slot `j` of batch row `b` is row `b·keys + j`, and `key_mask` says which slots are real.
//! Query `i` belongs to batch row `query_row[i]` and, when causal, sees key slots `0..=query_key[i]`.
//! Query head `h` reads key/value head `h / (heads / kv_heads)`.

use rayon::prelude::*;

/// Shapes and masks of one attention call.
pub struct AttentionLayout<'a> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Key slots per batch row.
    pub keys: usize,
    /// `[rows·keys]`: whether a key slot holds a real position.
    pub key_mask: &'a [bool],
    /// `[N]`: the batch row of each query (non-decreasing; within a row, `query_key` too).
    pub query_row: &'a [usize],
    /// `[N]`: the key slot of each query's own position (the causal limit).
    pub query_key: &'a [usize],
    /// Whether a query sees only the key slots up to its own.
    pub causal: bool,
}

impl AttentionLayout<'_> {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Key slots query `i` may see: `(row, end)` with slots `0..end` of that row.
    fn span(&self, i: usize) -> (usize, usize) {
        let end = if self.causal {
            (self.query_key[i] + 1).min(self.keys)
        } else {
            self.keys
        };
        (self.query_row[i], end)
    }
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        let (n, hd) = (self.query_row.len(), self.head_dim);
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads));
        assert_eq!(q.len(), n * self.heads * hd, "attention: q is not [N, heads·head_dim]");
        assert_eq!(
            k.len(),
            self.key_mask.len() * self.kv_heads * hd,
            "attention: k does not match key_mask"
        );
        assert_eq!(v.len(), k.len(), "attention: v and k differ in size");
        assert_eq!(self.query_key.len(), n);
        assert!(
            self.query_row.windows(2).all(|w| w[0] <= w[1]),
            "attention: queries must be grouped by row"
        );
        // A block's key range is its last query's (see `block_keys`).
        assert!(
            (1..n).all(|i| self.query_row[i] != self.query_row[i - 1] || self.query_key[i] >= self.query_key[i - 1]),
            "attention: the queries of a row must be in key order"
        );
    }
}

/// Queries per block: attention runs block by block (one task each), so a block's scores
/// `[BLOCK, keys]` are the only score matrix that ever exists (memory linear in the keys).
const BLOCK: usize = 64;

/// `dst (+)= beta · lhs · rhs` for an `[m, k]` lhs and a `[k, n]` rhs given by (row, column)
/// strides into slices, `dst` `[m, n]` with row stride `dst_rs`, on the calling thread.
/// The largest index each operand is read or written at is checked first, so the call is safe.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len(), "mm: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(last(m, k, lhs.1, lhs.2) < lhs.0.len(), "mm: lhs out of bounds");
    assert!(last(k, n, rhs.1, rhs.2) < rhs.0.len(), "mm: rhs out of bounds");
    // SAFETY: every index gemm touches is below the bounds checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// The query blocks: `(first, end)` ranges of at most [`BLOCK`] queries of one batch row.
fn blocks(lay: &AttentionLayout) -> Vec<(usize, usize)> {
    let n = lay.query_row.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && end - start < BLOCK && lay.query_row[end] == lay.query_row[start] {
            end += 1;
        }
        out.push((start, end));
        start = end;
    }
    out
}

/// Splits `data` into the per-block chunks of `width` values per query.
fn block_chunks<'a>(mut data: &'a mut [f32], blocks: &[(usize, usize)], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(blocks.len());
    for &(a, b) in blocks {
        let (head, rest) = data.split_at_mut((b - a) * width);
        out.push(head);
        data = rest;
    }
    out
}

/// Masked softmax of each row of `scores` `[m, end]` in place: query `first + r` sees the key
/// slots `j < its span` that are real; the others get probability 0.
#[inline(always)]
fn softmax_rows(lay: &AttentionLayout, scores: &mut [f32], first: usize, end: usize) {
    for (r, row) in scores.chunks_mut(end).enumerate() {
        let (b, lim) = lay.span(first + r);
        let allowed = |j: usize| j < lim && lay.key_mask[b * lay.keys + j];
        let max = (0..end)
            .filter(|&j| allowed(j))
            .map(|j| row[j])
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        // Exponentials first, all of them (a loop the compiler vectorises), then the masked
        // slots cleared.
        for x in row.iter_mut() {
            *x = crate::exp::exp(*x - max);
        }
        let mut sum = 0.0;
        for (j, x) in row.iter_mut().enumerate() {
            if !allowed(j) {
                *x = 0.0;
            }
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Key slots a block needs: up to the last query's causal limit (queries of a row are in
/// position order), or all of them.
fn block_keys(lay: &AttentionLayout, last_query: usize) -> usize {
    lay.span(last_query).1
}

/// Softmax attention: writes `out: [N, heads·head_dim]`. Nothing of size queries × keys is
/// kept: [`attention_backward`] recomputes the probabilities block by block.
pub fn attention(lay: &AttentionLayout, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
    lay.check(q, k, v);
    let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    assert_eq!(out.len(), q.len());
    let blocks = blocks(lay);
    let tasks: Vec<_> = blocks.iter().zip(block_chunks(out, &blocks, h * hd)).collect();
    tasks.into_par_iter().for_each(|(&(first, last_end), out)| {
        let m = last_end - first;
        let b = lay.query_row[first];
        let end = block_keys(lay, last_end - 1);
        let mut scores = vec![0f32; m * end];
        let (k_row, v_row) = (&k[b * s * kvd..], &v[b * s * kvd..]);
        for head in 0..h {
            let g = head / group;
            // scores = scale · Q·Kᵀ
            mm(
                (m, end, hd),
                &mut scores,
                end,
                false,
                (&q[(first * h + head) * hd..], h * hd, 1),
                (&k_row[g * hd..], 1, kvd),
                scale,
                gemm::Parallelism::None,
            );
            crate::simd::wide(|| softmax_rows(lay, &mut scores, first, end));
            // out = P·V
            mm(
                (m, hd, end),
                &mut out[head * hd..],
                h * hd,
                false,
                (&scores, end, 1),
                (&v_row[g * hd..], kvd, 1),
                1.0,
                gemm::Parallelism::None,
            );
        }
    });
}

/// One query head's gradients over one batch row's queries: `dq` `[queries, head_dim]`, and
/// `dk`, `dv` `[keys, head_dim]` (this head's share of its key/value head).
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Input gradients of [`attention`] from `d_out: [N, heads·head_dim]`: writes `dq` (like `q`)
/// and `dk`, `dv` (like `k`, `v`; zero at padded slots). The probabilities are recomputed from
/// `q` and `k` one block of queries at a time (as FlashAttention does), so memory stays linear
/// in the keys. One task per (batch row, query head): P = softmax(scale·Q·Kᵀ), dP = dO·Vᵀ,
/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K, dV += Pᵀ·dO, dK += scale·dSᵀ·Q; the
/// heads of a group are then summed into their key/value head.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    lay: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    lay.check(q, k, v);
    let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    assert_eq!(d_out.len(), q.len());
    assert_eq!(dq.len(), q.len());
    assert_eq!((dk.len(), dv.len()), (k.len(), v.len()));
    let rows = lay.key_mask.len() / s.max(1);
    let mut row_blocks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); rows];
    for (first, end) in blocks(lay) {
        row_blocks[lay.query_row[first]].push((first, end));
    }
    let tasks: Vec<(usize, usize)> = (0..rows)
        .filter(|&b| !row_blocks[b].is_empty())
        .flat_map(|b| (0..h).map(move |head| (b, head)))
        .collect();
    let head_grads = |&(b, head): &(usize, usize)| -> HeadGrads {
        let g = head / group;
        let blocks = &row_blocks[b];
        let start = blocks[0].0;
        let count = blocks[blocks.len() - 1].1 - start;
        let mut out = HeadGrads {
            dq: vec![0f32; count * hd],
            dk: vec![0f32; s * hd],
            dv: vec![0f32; s * hd],
        };
        let (k_row, v_row) = (&k[b * s * kvd + g * hd..], &v[b * s * kvd + g * hd..]);
        let (mut p, mut ds) = (Vec::new(), Vec::new());
        for &(first, last_end) in blocks {
            let m = last_end - first;
            let end = block_keys(lay, last_end - 1);
            let (q_blk, do_blk) = (&q[(first * h + head) * hd..], &d_out[(first * h + head) * hd..]);
            p.resize(m * end, 0.0);
            ds.resize(m * end, 0.0);
            let none = gemm::Parallelism::None;
            mm(
                (m, end, hd),
                &mut p,
                end,
                false,
                (q_blk, h * hd, 1),
                (k_row, 1, kvd),
                scale,
                none,
            );
            crate::simd::wide(|| softmax_rows(lay, &mut p, first, end));
            mm(
                (m, end, hd),
                &mut ds,
                end,
                false,
                (do_blk, h * hd, 1),
                (v_row, 1, kvd),
                1.0,
                none,
            );
            for (p, ds) in p.chunks(end).zip(ds.chunks_mut(end)) {
                let row: f32 = p.iter().zip(ds.iter()).map(|(p, d)| p * d).sum();
                for (d, p) in ds.iter_mut().zip(p) {
                    *d = p * (*d - row);
                }
            }
            let dq_blk = &mut out.dq[(first - start) * hd..];
            mm(
                (m, hd, end),
                dq_blk,
                hd,
                false,
                (&ds, end, 1),
                (k_row, kvd, 1),
                scale,
                none,
            );
            mm(
                (end, hd, m),
                &mut out.dv,
                hd,
                true,
                (&p, 1, end),
                (do_blk, h * hd, 1),
                1.0,
                none,
            );
            mm(
                (end, hd, m),
                &mut out.dk,
                hd,
                true,
                (&ds, 1, end),
                (q_blk, h * hd, 1),
                scale,
                none,
            );
        }
        out
    };
    let grads: Vec<HeadGrads> = tasks.par_iter().map(head_grads).collect();
    dk.fill(0.0);
    dv.fill(0.0);
    for (&(b, head), gr) in tasks.iter().zip(&grads) {
        let g = head / group;
        let start = row_blocks[b][0].0;
        for (i, row) in gr.dq.chunks(hd).enumerate() {
            dq[((start + i) * h + head) * hd..][..hd].copy_from_slice(row);
        }
        for (slot, (gk, gv)) in gr.dk.chunks(hd).zip(gr.dv.chunks(hd)).enumerate() {
            let at = (b * s + slot) * kvd + g * hd;
            for ((k, v), (a, c)) in dk[at..at + hd]
                .iter_mut()
                .zip(&mut dv[at..at + hd])
                .zip(gk.iter().zip(gv))
            {
                *k += a;
                *v += c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of two batch rows of `s` key slots, `h` query heads over `hkv` key/value heads
    /// of width `hd`.
    fn layout<'a>(
        (h, hkv, hd, s): (usize, usize, usize, usize),
        key_mask: &'a [bool],
        query_row: &'a [usize],
        query_key: &'a [usize],
        causal: bool,
    ) -> AttentionLayout<'a> {
        AttentionLayout {
            heads: h,
            kv_heads: hkv,
            head_dim: hd,
            keys: s,
            key_mask,
            query_row,
            query_key,
            causal,
        }
    }

    /// Deterministic inputs for `n` queries of that shape: q, k, v and a weight (or output
    /// gradient) shaped like q.
    fn inputs(n: usize, (h, hkv, hd, s): (usize, usize, usize, usize)) -> [Vec<f32>; 4] {
        let gen = |len: usize, seed: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * seed).sin()).collect() };
        [
            gen(n * h * hd, 0.37),
            gen(2 * s * hkv * hd, 0.53),
            gen(2 * s * hkv * hd, 0.71),
            gen(n * h * hd, 0.91),
        ]
    }

    /// Outputs and input gradients of attention computed directly in f64, query by query (no
    /// blocks): the reference for the blocked kernels.
    fn reference(lay: &AttentionLayout, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32]) -> [Vec<f64>; 4] {
        let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
        let kvd = lay.kv_heads * hd;
        let scale = lay.scale() as f64;
        let (mut out, mut dq) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        let (mut dk, mut dv) = (vec![0.0; k.len()], vec![0.0; v.len()]);
        for i in 0..lay.query_row.len() {
            let (b, lim) = lay.span(i);
            for head in 0..h {
                let g = head / lay.group();
                let qi = (i * h + head) * hd;
                let slot = |j: usize| (b * s + j) * kvd + g * hd;
                let keys: Vec<usize> = (0..lim).filter(|&j| lay.key_mask[b * s + j]).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| scale * (0..hd).map(|c| q[qi + c] as f64 * k[slot(j) + c] as f64).sum::<f64>())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / total).collect();
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|c| d_out[qi + c] as f64 * v[slot(j) + c] as f64)
                            .sum::<f64>()
                    })
                    .collect();
                let row: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &j) in keys.iter().enumerate() {
                    let ds = p[n] * (dp[n] - row);
                    for c in 0..hd {
                        out[qi + c] += p[n] * v[slot(j) + c] as f64;
                        dv[slot(j) + c] += p[n] * d_out[qi + c] as f64;
                        dq[qi + c] += scale * ds * k[slot(j) + c] as f64;
                        dk[slot(j) + c] += scale * ds * q[qi + c] as f64;
                    }
                }
            }
        }
        [out, dq, dk, dv]
    }

    /// Rows longer than a block (150 and 70 real positions in 160 slots, the second padded):
    /// the blocked forward and backward agree with the direct f64 computation, causal or not.
    #[test]
    fn blocked_kernels_match_the_direct_computation_across_blocks() {
        let shape = (4, 2, 8, 160);
        let s = shape.3;
        let lens = [150, 70];
        let key_mask: Vec<bool> = lens.iter().flat_map(|&l| (0..s).map(move |j| j < l)).collect();
        let query_row: Vec<usize> = lens.iter().enumerate().flat_map(|(b, &l)| vec![b; l]).collect();
        let query_key: Vec<usize> = lens.iter().flat_map(|&l| 0..l).collect();
        let [q, k, v, d_out] = inputs(query_row.len(), shape);
        for causal in [true, false] {
            let lay = layout(shape, &key_mask, &query_row, &query_key, causal);
            let mut out = vec![0.0; q.len()];
            attention(&lay, &q, &k, &v, &mut out);
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(&lay, &q, &k, &v, &d_out, &mut dq, &mut dk, &mut dv);
            let want = reference(&lay, &q, &k, &v, &d_out);
            for (name, got, want) in [
                ("out", &out, &want[0]),
                ("dq", &dq, &want[1]),
                ("dk", &dk, &want[2]),
                ("dv", &dv, &want[3]),
            ] {
                let worst = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 1e-4, "causal {causal}: {name} differs by {worst}");
            }
        }
    }

    /// Two rows (lengths 3 and 2, padded to 3 slots), 4 query heads over 2 key/value heads.
    #[test]
    fn gradient_matches_finite_differences() {
        let shape = (4, 2, 3, 3);
        let key_mask = [true, true, true, true, true, false];
        let query_row = [0, 0, 0, 1, 1];
        let query_key = [0, 1, 2, 0, 1];
        for causal in [true, false] {
            let lay = layout(shape, &key_mask, &query_row, &query_key, causal);
            let [q, k, v, w] = inputs(query_row.len(), shape);
            let loss = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut out = vec![0.0; q.len()];
                attention(&lay, q, k, v, &mut out);
                out.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(&lay, &q, &k, &v, &w, &mut dq, &mut dk, &mut dv);
            let fd = |which: usize, idx: usize| {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which][idx] += 1e-2;
                let up = loss(&args[0], &args[1], &args[2]);
                args[which][idx] -= 2e-2;
                let down = loss(&args[0], &args[1], &args[2]);
                (up - down) / 2e-2
            };
            for (which, grad) in [&dq, &dk, &dv].into_iter().enumerate() {
                for (idx, &g) in grad.iter().enumerate() {
                    let f = fd(which, idx);
                    assert!(
                        (f - g as f64).abs() < 2e-3,
                        "causal {causal} arg {which} at {idx}: fd {f} vs {g}"
                    );
                }
            }
        }
    }
}
