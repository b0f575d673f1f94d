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
    // wᵀ[p, j] = w[j·k + p]
    product(x, (w, 1, k), out, (m, k, n), accumulate);
}

/// `out (+)= dy · w` with `dy: [m, k]`, `w: [k, n]` and `out: [m, n]`: the input gradient of a
/// linear layer whose weight is `w` (`[out, in]`, so `k` = out and `n` = in).
pub fn matmul(dy: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    // w[p, j] = w[p·n + j]
    product(dy, (w, n, 1), out, (m, k, n), accumulate);
}

/// `out (+)= x · r` for a row-major `x: [m, k]`, an `r: [k, n]` given as (slice, row stride,
/// column stride) over `k·n` values, and a row-major `out: [m, n]`.
fn product(
    x: &[f32],
    (r, r_rs, r_cs): (&[f32], usize, usize),
    out: &mut [f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert_eq!(x.len(), m * k, "matmul: the left operand is not [m, k]");
    assert_eq!(r.len(), k * n, "matmul: the right operand does not hold k·n values");
    assert_eq!(out.len(), m * n, "matmul: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    // SAFETY: the sizes are asserted above and both stride layouts of `r` used by the callers
    // ((1, k) and (n, 1)) address exactly its k·n values; x[i, p] = x[i·k + p] and
    // out[i, j] = out[i·n + j] stay inside their slices.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
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
