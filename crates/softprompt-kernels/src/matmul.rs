//! Matrix multiplies on row-major slices, multi-threaded by `gemm`.

use gemm::{gemm, Parallelism};

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Tiny products (one generated token, a short prompt) are not worth waking the pool for.
    if m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `out (+)= x · wᵀ` with `x: [m, k]`, `w: [n, k]` (a linear layer's `[out, in]` weight) and
/// `out: [m, n]`. With `accumulate` the product is added to `out` (a fused residual add).
pub fn matmul_wt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(w.len(), n * k, "matmul: the weight is not [n, k]");
    assert_eq!(x.len(), m * k, "matmul: the left operand is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul: out is not [m, n]");
    // wᵀ[p, j] = w[j·k + p]
    product(
        Block::rows(x, k),
        (w, 1, k),
        Block::rows_mut(out, n),
        (m, k, n),
        accumulate,
    );
}

/// `out (+)= dy · w` with `dy: [m, k]`, `w: [k, n]` and `out: [m, n]`: the input gradient of a
/// linear layer whose weight is `w` (`[out, in]`, so `k` = out and `n` = in).
pub fn matmul(dy: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(w.len(), k * n, "matmul: the weight is not [k, n]");
    assert_eq!(dy.len(), m * k, "matmul: the left operand is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul: out is not [m, n]");
    // w[p, j] = w[p·n + j]
    product(
        Block::rows(dy, k),
        (w, n, 1),
        Block::rows_mut(out, n),
        (m, k, n),
        accumulate,
    );
}

/// Rows of a weight `[rows, cols]` held in another storage (quantized blocks, f16, …):
/// `fill(r0, r1, out)` writes rows `r0..r1` as f32 into `out: [r1 - r0, cols]`.
pub type RowSource<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// Weight rows converted per tile: large enough for `gemm` to run at speed, small enough to
/// stay in cache.
const TILE_ROWS: usize = 128;

/// [`matmul_wt`] with the weight `[n, k]` read tile by tile from `rows` (dequantized on the fly:
/// never more than `TILE_ROWS` (128) rows as f32 at once).
pub fn matmul_wt_by_rows(x: &[f32], rows: RowSource, out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(x.len(), m * k, "matmul: the left operand is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul: out is not [m, n]");
    let mut tile = vec![0.0f32; TILE_ROWS.min(n) * k];
    for j0 in (0..n).step_by(TILE_ROWS) {
        let j1 = (j0 + TILE_ROWS).min(n);
        let t = &mut tile[..(j1 - j0) * k];
        rows(j0, j1, t);
        // out[:, j0..j1] (+)= x · tᵀ
        let dst = Block {
            ptr: out[j0..].as_mut_ptr(),
            rows: m,
            row_stride: n,
        };
        product(Block::rows(x, k), (t, 1, k), dst, (m, k, j1 - j0), accumulate);
    }
}

/// [`matmul`] with the weight `[k, n]` read tile by tile from `rows` (dequantized on the fly).
pub fn matmul_by_rows(dy: &[f32], rows: RowSource, out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(dy.len(), m * k, "matmul: the left operand is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul: out is not [m, n]");
    if k == 0 && !accumulate {
        out.fill(0.0);
    }
    let mut tile = vec![0.0f32; TILE_ROWS.min(k) * n];
    for p0 in (0..k).step_by(TILE_ROWS) {
        let p1 = (p0 + TILE_ROWS).min(k);
        let t = &mut tile[..(p1 - p0) * n];
        rows(p0, p1, t);
        // out (+)= dy[:, p0..p1] · t
        let src = Block {
            ptr: dy[p0..].as_ptr().cast_mut(),
            rows: m,
            row_stride: k,
        };
        product(
            src,
            (t, n, 1),
            Block::rows_mut(out, n),
            (m, p1 - p0, n),
            accumulate || p0 > 0,
        );
    }
}

/// A row-major block of a larger matrix: `rows` rows of `row_stride` apart (the columns used
/// are given by the product's sizes).
struct Block {
    ptr: *mut f32,
    rows: usize,
    row_stride: usize,
}

impl Block {
    fn rows(x: &[f32], cols: usize) -> Block {
        Block {
            ptr: x.as_ptr().cast_mut(),
            rows: x.len() / cols.max(1),
            row_stride: cols,
        }
    }
    fn rows_mut(x: &mut [f32], cols: usize) -> Block {
        Block {
            ptr: x.as_mut_ptr(),
            rows: x.len() / cols.max(1),
            row_stride: cols,
        }
    }
}

/// `out (+)= x · r` for blocks `x: [m, k]` and `out: [m, n]`, and an `r: [k, n]` given as
/// (slice, row stride, column stride) over `k·n` values. Callers guarantee that every block
/// addresses memory inside its slice (`rows ≥ m`, and the columns used fit the row stride).
fn product(
    x: Block,
    (r, r_rs, r_cs): (&[f32], usize, usize),
    out: Block,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert_eq!(r.len(), k * n, "matmul: the right operand does not hold k·n values");
    assert!(x.rows >= m && out.rows >= m, "matmul: a block has too few rows");
    assert!(
        x.row_stride >= k && out.row_stride >= n,
        "matmul: a block's rows are too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of `out` holds at least n values (asserted above).
                unsafe { std::slice::from_raw_parts_mut(out.ptr.add(i * out.row_stride), n) }.fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the sizes are asserted above; both stride layouts of `r` used by the callers
    // ((1, k) and (n, 1)) address exactly its k·n values; x[i, p] = x[i·rs + p] and
    // out[i, j] = out[i·rs + j] stay inside their blocks, which the callers take from slices
    // (a tile's columns start at an offset inside each row and end before the next row).
    unsafe {
        gemm(
            m,
            n,
            k,
            out.ptr,
            1,
            out.row_stride as isize,
            accumulate,
            x.ptr,
            1,
            x.row_stride as isize,
            r.as_ptr(),
            r_cs as isize,
            r_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        )
    }
}

/// Adds `bias: [n]` to every row of `out: [m, n]`.
pub fn add_bias(out: &mut [f32], bias: &[f32]) {
    use rayon::prelude::*;
    let n = bias.len();
    out.par_chunks_mut(n.max(1) * 64).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_products_equal_the_plain_ones() {
        // Sizes that leave a partial last tile in both directions.
        let (m, k, n) = (5, 3 * TILE_ROWS / 2 + 1, TILE_ROWS + 7);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).cos()).collect();
        let fill = |r0: usize, r1: usize, out: &mut [f32], cols: usize| out.copy_from_slice(&w[r0 * cols..r1 * cols]);
        let (mut a, mut b) = (vec![0.5; m * n], vec![0.5; m * n]);
        matmul_wt(&x, &w, &mut a, m, k, n, true);
        matmul_wt_by_rows(&x, &|r0, r1, o: &mut [f32]| fill(r0, r1, o, k), &mut b, m, k, n, true);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4));
        // The input gradient: dy [m, n] · w [n, k].
        let dy: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.7).sin()).collect();
        let (mut a, mut b) = (vec![9.0; m * k], vec![9.0; m * k]);
        matmul(&dy, &w, &mut a, m, n, k, false);
        matmul_by_rows(&dy, &|r0, r1, o: &mut [f32]| fill(r0, r1, o, k), &mut b, m, n, k, false);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    #[test]
    fn products_match_the_definition() {
        let (m, k, n) = (3, 4, 5);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![1.0; m * n];
        matmul_wt(&x, &w, &mut out, m, k, n, true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f32>();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
        // w read as [k', n'] = [n, k]: dy [m, n] · w [n, k] → [m, k]
        let dy: Vec<f32> = (0..m * n).map(|i| (i as f32).cos()).collect();
        let mut dx = vec![0.0; m * k];
        matmul(&dy, &w, &mut dx, m, n, k, false);
        for i in 0..m {
            for p in 0..k {
                let want: f32 = (0..n).map(|j| dy[i * n + j] * w[j * k + p]).sum();
                assert!((dx[i * k + p] - want).abs() < 1e-5);
            }
        }
    }
}
