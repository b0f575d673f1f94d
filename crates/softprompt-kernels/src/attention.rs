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
    /// `[N]`: the batch row of each query (non-decreasing).
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
    }
}

/// Dot product with eight independent accumulators, so the compiler can keep it in SIMD lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Softmax attention: writes `out: [N, heads·head_dim]`; with `probs` (`[N, heads, keys]`) also
/// keeps the attention probabilities for [`attention_backward`] (zero where masked).
pub fn attention(lay: &AttentionLayout, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], probs: Option<&mut [f32]>) {
    lay.check(q, k, v);
    let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    assert_eq!(out.len(), q.len());
    let body = |i: usize, out: &mut [f32], p_row: &mut [f32]| {
        let (b, end) = lay.span(i);
        let base = b * s;
        for head in 0..h {
            let g = head / group;
            let qh = &q[(i * h + head) * hd..][..hd];
            let p = &mut p_row[head * s..(head + 1) * s];
            let mut max = f32::NEG_INFINITY;
            for j in 0..end {
                if lay.key_mask[base + j] {
                    let sc = scale * dot(qh, &k[(base + j) * kvd + g * hd..][..hd]);
                    p[j] = sc;
                    max = max.max(sc);
                }
            }
            let o = &mut out[head * hd..(head + 1) * hd];
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                p.fill(0.0);
                continue;
            }
            let mut sum = 0.0;
            for j in 0..s {
                p[j] = if j < end && lay.key_mask[base + j] {
                    let e = (p[j] - max).exp();
                    sum += e;
                    e
                } else {
                    0.0
                };
            }
            let inv = 1.0 / sum;
            for j in 0..end {
                if p[j] != 0.0 {
                    p[j] *= inv;
                    axpy(o, p[j], &v[(base + j) * kvd + g * hd..][..hd]);
                }
            }
        }
    };
    match probs {
        Some(probs) => {
            assert_eq!(
                probs.len(),
                lay.query_row.len() * h * s,
                "attention: probs is not [N, heads, keys]"
            );
            out.par_chunks_mut(h * hd)
                .zip(probs.par_chunks_mut(h * s))
                .enumerate()
                .for_each(|(i, (o, p))| body(i, o, p));
        }
        // Without a tape: blocks of queries share each tile of keys and values.
        None => attention_blocked(lay, q, k, v, out),
    }
}

/// Consecutive queries per block of the tape-free path.
const QUERY_BLOCK: usize = 32;
/// Key slots per tile of the tape-free path.
const KEY_TILE: usize = 64;

/// Attention without a tape, for long inputs: consecutive queries of one row are taken in blocks,
/// and each tile of keys and values is read once per block (for every query head of the block)
/// instead of once per query and head, so it is served from cache rather than memory. Each
/// query's arithmetic is that of the per-query path above (the same scores, maximum, sum and
/// value accumulation in the same order), so the output is bit-identical. The only scratch is
/// one block's probabilities (`QUERY_BLOCK × heads × keys`): memory stays linear in the length.
fn attention_blocked(lay: &AttentionLayout, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
    let width = lay.heads * lay.head_dim;
    out.par_chunks_mut(QUERY_BLOCK * width)
        .enumerate()
        .for_each_init(Vec::new, |p, (c, out)| {
            let first = c * QUERY_BLOCK;
            let n = out.len() / width;
            let mut a = 0;
            while a < n {
                let row = lay.query_row[first + a];
                let e = (a + 1..n).find(|&e| lay.query_row[first + e] != row).unwrap_or(n);
                attention_block(lay, q, k, v, first + a, e - a, &mut out[a * width..e * width], p);
                a = e;
            }
        });
}

/// Queries `i0..i0 + nq` (all of one batch row) of [`attention_blocked`]; `p` is scratch.
#[allow(clippy::too_many_arguments)]
fn attention_block(
    lay: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    i0: usize,
    nq: usize,
    out: &mut [f32],
    p: &mut Vec<f32>,
) {
    let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    let base = lay.query_row[i0] * s;
    let ends: Vec<usize> = (i0..i0 + nq).map(|i| lay.span(i).1).collect();
    let max_end = ends.iter().copied().max().unwrap_or(0);
    p.resize(nq * h * s, 0.0);
    let mut maxes = vec![f32::NEG_INFINITY; nq * h];
    // 1. scores, tile by tile
    for t0 in (0..max_end).step_by(KEY_TILE) {
        let t1 = (t0 + KEY_TILE).min(max_end);
        for (qi, &end) in ends.iter().enumerate() {
            let end = end.min(t1);
            for head in 0..h {
                let g = head / group;
                let qh = &q[((i0 + qi) * h + head) * hd..][..hd];
                let row = &mut p[(qi * h + head) * s..][..s];
                let max = &mut maxes[qi * h + head];
                for j in t0..end {
                    if lay.key_mask[base + j] {
                        let sc = scale * dot(qh, &k[(base + j) * kvd + g * hd..][..hd]);
                        row[j] = sc;
                        *max = max.max(sc);
                    }
                }
            }
        }
    }
    // 2. softmax of each (query, head), as in the per-query path
    for (qi, &end) in ends.iter().enumerate() {
        for head in 0..h {
            out[(qi * h + head) * hd..][..hd].fill(0.0);
            let max = maxes[qi * h + head];
            let row = &mut p[(qi * h + head) * s..][..s];
            if max == f32::NEG_INFINITY {
                row[..end].fill(0.0);
                continue;
            }
            let mut sum = 0.0;
            for j in 0..end {
                row[j] = if lay.key_mask[base + j] {
                    let e = (row[j] - max).exp();
                    sum += e;
                    e
                } else {
                    0.0
                };
            }
            let inv = 1.0 / sum;
            for x in &mut row[..end] {
                if *x != 0.0 {
                    *x *= inv;
                }
            }
        }
    }
    // 3. weighted values, tile by tile, each query's keys in ascending order
    for t0 in (0..max_end).step_by(KEY_TILE) {
        let t1 = (t0 + KEY_TILE).min(max_end);
        for (qi, &end) in ends.iter().enumerate() {
            let end = end.min(t1);
            for head in 0..h {
                let g = head / group;
                let row = &p[(qi * h + head) * s..][..s];
                let o = &mut out[(qi * h + head) * hd..][..hd];
                for j in t0..end {
                    if row[j] != 0.0 {
                        axpy(o, row[j], &v[(base + j) * kvd + g * hd..][..hd]);
                    }
                }
            }
        }
    }
}

/// Input gradients of [`attention`] from `d_out: [N, heads·head_dim]`: writes `dq` (like `q`)
/// and `dk`, `dv` (like `k`, `v`; zero at padded slots). `probs` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    lay: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    lay.check(q, k, v);
    let (h, hd, s, n) = (lay.heads, lay.head_dim, lay.keys, lay.query_row.len());
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    assert_eq!(probs.len(), n * h * s);
    assert_eq!(d_out.len(), q.len());
    // 1. per query: dS = P ⊙ (dP − rowsum(P ⊙ dP)) with dP = dO·Vᵀ, and dQ = scale · dS·K.
    let mut ds = vec![0f32; n * h * s];
    dq.par_chunks_mut(h * hd)
        .zip(ds.par_chunks_mut(h * s))
        .enumerate()
        .for_each(|(i, (dq, ds))| {
            let (b, end) = lay.span(i);
            let base = b * s;
            for head in 0..h {
                let g = head / group;
                let p = &probs[(i * h + head) * s..][..s];
                let d_o = &d_out[(i * h + head) * hd..][..hd];
                let ds = &mut ds[head * s..(head + 1) * s];
                let mut row = 0.0;
                for j in 0..end {
                    if p[j] != 0.0 {
                        ds[j] = dot(d_o, &v[(base + j) * kvd + g * hd..][..hd]);
                        row += p[j] * ds[j];
                    }
                }
                let dqh = &mut dq[head * hd..(head + 1) * hd];
                dqh.fill(0.0);
                for j in 0..end {
                    if p[j] != 0.0 {
                        ds[j] = p[j] * (ds[j] - row);
                        axpy(dqh, scale * ds[j], &k[(base + j) * kvd + g * hd..][..hd]);
                    }
                }
            }
        });
    // 2. per key slot: dK = scale · dSᵀ·Q and dV = Pᵀ·dO, summed over the heads of its group.
    let mut row_start = vec![n; lay.key_mask.len() / s.max(1) + 1];
    for (i, &b) in lay.query_row.iter().enumerate().rev() {
        row_start[b] = i;
    }
    for b in (0..row_start.len() - 1).rev() {
        row_start[b] = row_start[b].min(row_start[b + 1]);
    }
    dk.par_chunks_mut(kvd)
        .zip(dv.par_chunks_mut(kvd))
        .enumerate()
        .for_each(|(slot, (dk, dv))| {
            dk.fill(0.0);
            dv.fill(0.0);
            if !lay.key_mask[slot] {
                return;
            }
            let (b, j) = (slot / s, slot % s);
            for i in row_start[b]..row_start[b + 1] {
                if lay.causal && lay.query_key[i] < j {
                    continue;
                }
                for head in 0..h {
                    let g = head / group;
                    let idx = (i * h + head) * s + j;
                    let (p, d) = (probs[idx], ds[idx]);
                    if p != 0.0 {
                        axpy(
                            &mut dk[g * hd..(g + 1) * hd],
                            scale * d,
                            &q[(i * h + head) * hd..][..hd],
                        );
                        axpy(&mut dv[g * hd..(g + 1) * hd], p, &d_out[(i * h + head) * hd..][..hd]);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked tape-free path gives exactly (bit for bit) the per-query path's output, over
    /// several rows with padding, grouped heads, more queries than a block and keys than a tile.
    #[test]
    fn blocked_path_is_bit_identical_to_the_per_query_path() {
        let (h, hkv, hd) = (6, 2, 8);
        let lens = [150, 37, 0, 90];
        let s = 160;
        let key_mask: Vec<bool> = lens.iter().flat_map(|&l| (0..s).map(move |j| j < l)).collect();
        let (mut query_row, mut query_key) = (Vec::new(), Vec::new());
        for (b, &l) in lens.iter().enumerate() {
            for j in 0..l {
                query_row.push(b);
                query_key.push(j);
            }
        }
        let n = query_row.len();
        let gen = |len: usize, seed: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * seed).sin() * 3.0).collect() };
        let (q, k, v) = (
            gen(n * h * hd, 0.37),
            gen(lens.len() * s * hkv * hd, 0.53),
            gen(lens.len() * s * hkv * hd, 0.71),
        );
        for causal in [true, false] {
            let lay = AttentionLayout {
                heads: h,
                kv_heads: hkv,
                head_dim: hd,
                keys: s,
                key_mask: &key_mask,
                query_row: &query_row,
                query_key: &query_key,
                causal,
            };
            let (mut blocked, mut per_query) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            let mut probs = vec![0.0; n * h * s];
            attention(&lay, &q, &k, &v, &mut blocked, None);
            attention(&lay, &q, &k, &v, &mut per_query, Some(&mut probs));
            let same = blocked.iter().zip(&per_query).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "causal {causal}: the blocked path differs");
        }
    }

    /// Two rows (lengths 3 and 2, padded to 3 slots), 4 query heads over 2 key/value heads.
    #[test]
    fn gradient_matches_finite_differences() {
        let (h, hkv, hd, s) = (4, 2, 3, 3);
        let key_mask = [true, true, true, true, true, false];
        let query_row = [0, 0, 0, 1, 1];
        let query_key = [0, 1, 2, 0, 1];
        for causal in [true, false] {
            let lay = AttentionLayout {
                heads: h,
                kv_heads: hkv,
                head_dim: hd,
                keys: s,
                key_mask: &key_mask,
                query_row: &query_row,
                query_key: &query_key,
                causal,
            };
            let n = query_row.len();
            let gen = |len: usize, seed: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * seed).sin()).collect() };
            let (q, k, v) = (
                gen(n * h * hd, 0.37),
                gen(2 * s * hkv * hd, 0.53),
                gen(2 * s * hkv * hd, 0.71),
            );
            let w = gen(n * h * hd, 0.91);
            let loss = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut out = vec![0.0; q.len()];
                attention(&lay, q, k, v, &mut out, None);
                out.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
            };
            let mut out = vec![0.0; q.len()];
            let mut probs = vec![0.0; n * h * s];
            attention(&lay, &q, &k, &v, &mut out, Some(&mut probs));
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(&lay, &q, &k, &v, &probs, &w, &mut dq, &mut dk, &mut dv);
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
