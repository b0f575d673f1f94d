//! The vocabulary head for a few rows (scoring a batch's last positions, generating a token):
//! `logits = x · Eᵀ` with `E: [vocab, d]` read as it is stored (row-major; often the tied
//! embedding table), each of its rows loaded once and dotted with every row of `x`.
//!
//! A general product packs its weight operand first: for a few rows that means copying the
//! whole table (113 MB for SmolLM2) per call, which costs more than the dot products.

use rayon::prelude::*;

use crate::matmul;

/// Up to this many rows the dot products run; more go through the blocked product.
pub const MAX_DOT_ROWS: usize = 16;

/// Table rows per parallel work item.
const CHUNK: usize = 512;

/// Table rows reused from L2 by every group of rows of `x` (32 · 576 floats: 74 KB for SmolLM2).
const BLOCK: usize = 32;

/// `out[r, v] = x[r] · table[v]` for `x: [m, d]`, `table: [n, d]` and `out: [m, n]`.
pub fn logits(x: &[f32], table: &[f32], out: &mut [f32], m: usize, d: usize, n: usize) {
    assert_eq!(x.len(), m * d, "head: x is not [m, d]");
    assert_eq!(table.len(), n * d, "head: the table is not [n, d]");
    assert_eq!(out.len(), m * n, "head: out is not [m, n]");
    if m > MAX_DOT_ROWS {
        matmul::matmul_wt(x, table, out, m, d, n, false);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let dots = dots_kernel();
    // [n, m] first: each work item owns a contiguous run of table rows.
    let mut by_vocab = vec![0f32; n * m];
    by_vocab.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, chunk)| {
        // A block of table rows stays in L2 while each group of rows of x (in L1) passes over it.
        for (b, block) in chunk.chunks_mut(BLOCK * m).enumerate() {
            let v0 = c * CHUNK + b * BLOCK;
            for r0 in (0..m).step_by(GROUP) {
                let rows = GROUP.min(m - r0);
                for (j, scores) in block.chunks_mut(m).enumerate() {
                    let w = &table[(v0 + j) * d..(v0 + j + 1) * d];
                    // SAFETY: `w` holds `d` values, `x` from row r0 `rows·d`, `scores` `m`.
                    unsafe { dots(w.as_ptr(), x[r0 * d..].as_ptr(), rows, d, scores[r0..].as_mut_ptr()) };
                }
            }
        }
    });
    for (v, scores) in by_vocab.chunks(m).enumerate() {
        for (r, &s) in scores.iter().enumerate() {
            out[r * n + v] = s;
        }
    }
}

/// `scores[r] = Σ_p w[p]·x[r·d + p]` for `r < rows` (at most [`GROUP`]): one table row against
/// a group of rows of `x`.
type DotsKernel = unsafe fn(*const f32, *const f32, usize, usize, *mut f32);

/// The fastest kernel this CPU runs.
fn dots_kernel() -> DotsKernel {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return avx2_dots;
    }
    portable_dots
}

/// Rows of `x` taken together: each 8-lane load of the table row serves this many FMAs.
const GROUP: usize = 4;

/// AVX2/FMA: [`avx2_group`] with the number of rows fixed, so its accumulators stay in registers.
///
/// # Safety
/// `w` points to `d` readable values, `x` to `rows·d`, `scores` to `rows` writable; `rows` is
/// at most [`GROUP`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_dots(w: *const f32, x: *const f32, rows: usize, d: usize, scores: *mut f32) {
    // SAFETY: the caller upholds this function's contract (`rows` picks a group of at most [`GROUP`]
    // rows, each of `d` values), which is `avx2_group`'s.
    unsafe {
        match rows {
            4 => avx2_group::<4>(w, x, d, scores),
            3 => avx2_group::<3>(w, x, d, scores),
            2 => avx2_group::<2>(w, x, d, scores),
            _ => avx2_group::<1>(w, x, d, scores),
        }
    }
}

/// `R` rows of `x` against one table row: two 8-lane accumulators per row (eight independent
/// FMA chains for four rows), then each row's lanes summed.
///
/// # Safety
/// As [`avx2_dots`] with `rows = R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_group<const R: usize>(w: *const f32, x: *const f32, d: usize, scores: *mut f32) {
    // SAFETY: every pointer offset stays inside the `d` values of `w`, the `R·d` of `x` and the `R`
    // of `scores` the caller provides, and the CPU has AVX2 and FMA (the caller's contract).
    unsafe {
        use std::arch::x86_64::*;
        let body = d - d % 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in (0..body).step_by(16) {
            let w0 = _mm256_loadu_ps(w.add(p));
            let w1 = _mm256_loadu_ps(w.add(p + 8));
            for (g, a) in acc.iter_mut().enumerate() {
                let xr = x.add(g * d + p);
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a[1]);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a[0], a[1]));
            let xr = x.add(g * d);
            let tail: f32 = (body..d).map(|p| *w.add(p) * *xr.add(p)).sum();
            *scores.add(g) = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// Portable kernel (eight partial sums per row, which the compiler vectorises).
///
/// # Safety
/// `w` points to `d` readable values, `x` to `rows·d`, `scores` to `rows` writable.
unsafe fn portable_dots(w: *const f32, x: *const f32, rows: usize, d: usize, scores: *mut f32) {
    // SAFETY: the caller provides `d` readable values at `w`, `rows·d` at `x` and `rows` writable at
    // `scores`: every slice and offset below lies inside them.
    unsafe {
        let w = std::slice::from_raw_parts(w, d);
        for r in 0..rows {
            let xr = std::slice::from_raw_parts(x.add(r * d), d);
            let mut lanes = [0f32; 8];
            let (wc, xc) = (w.chunks_exact(8), xr.chunks_exact(8));
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in wc.zip(xc) {
                for l in 0..8 {
                    lanes[l] += a[l] * b[l];
                }
            }
            *scores.add(r) = lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * seed).sin()).collect()
    }

    fn direct(x: &[f32], table: &[f32], m: usize, d: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for v in 0..n {
                out[r * n + v] = (0..d).map(|p| x[r * d + p] as f64 * table[v * d + p] as f64).sum();
            }
        }
        out
    }

    #[test]
    fn logits_match_the_direct_product_for_few_and_many_rows() {
        // d = 45 leaves a tail after the 32- and 8-wide steps; n spans several work items.
        let (d, n) = (45, 1300);
        let table = values(n * d, 0.37);
        for m in [1, 3, MAX_DOT_ROWS, MAX_DOT_ROWS + 5] {
            let x = values(m * d, 0.91);
            let mut out = vec![f32::NAN; m * n];
            logits(&x, &table, &mut out, m, d, n);
            for (i, (&got, want)) in out.iter().zip(direct(&x, &table, m, d, n)).enumerate() {
                assert!((got as f64 - want).abs() < 1e-4, "m {m} entry {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn portable_kernel_matches_the_fast_one() {
        let (m, d) = (GROUP, 77);
        let (w, x) = (values(d, 0.5), values(m * d, 1.3));
        let (mut fast, mut portable) = (vec![0f32; m], vec![0f32; m]);
        // SAFETY: `w` holds `d` values, `x` `m·d` and each output `m` (`m` is `GROUP`).
        unsafe { dots_kernel()(w.as_ptr(), x.as_ptr(), m, d, fast.as_mut_ptr()) };
        // SAFETY: as above.
        unsafe { portable_dots(w.as_ptr(), x.as_ptr(), m, d, portable.as_mut_ptr()) };
        for (f, p) in fast.iter().zip(&portable) {
            assert!((f - p).abs() < 1e-5, "{f} vs {p}");
        }
    }
}
