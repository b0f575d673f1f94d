//! RMSNorm and LayerNorm over the last axis, with their input gradients.

use rayon::prelude::*;

/// Rows handed to one rayon task (norms are memory-bound; small tasks only add overhead).
const ROWS_PER_TASK: usize = 16;

/// RMSNorm: `out = x · r · g` with `r = 1/sqrt(mean(x²) + eps)` per row of `x: [rows, d]`.
/// Writes each row's `r` to `rstd` (kept for the backward pass).
pub fn rms_norm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = g.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len(), rstd.len() * d);
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|((out, rstd), x)| {
            for ((o, r), x) in out.chunks_mut(d).zip(rstd.iter_mut()).zip(x.chunks(d)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, x), g) in o.iter_mut().zip(x).zip(g) {
                    *o = x * *r * g;
                }
            }
        });
}

/// Input gradient of [`rms_norm`], **added** to `dx` (so a residual branch's gradient can be
/// fused in): with `a = g·dy`, `dx += r·a − x·r³·mean(a·x)`.
pub fn rms_norm_backward(x: &[f32], g: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let d = g.len();
    assert_eq!(x.len(), dy.len());
    assert_eq!(x.len(), dx.len());
    dx.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, x), dy), rstd)| {
            for (((dx, x), dy), &r) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)).zip(rstd) {
                let dot = x.iter().zip(dy).zip(g).map(|((x, dy), g)| g * dy * x).sum::<f32>() / d as f32;
                let c = r * r * r * dot;
                for (((dx, x), dy), g) in dx.iter_mut().zip(x).zip(dy).zip(g) {
                    *dx += r * g * dy - x * c;
                }
            }
        });
}

/// LayerNorm: `out = (x − μ)·r·g + b`, `r = 1/sqrt(var + eps)` per row; `rstd` receives `r`.
pub fn layer_norm(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = g.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len(), rstd.len() * d);
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|((out, rstd), x)| {
            for ((o, r), x) in out.chunks_mut(d).zip(rstd.iter_mut()).zip(x.chunks(d)) {
                let mu = x.iter().sum::<f32>() / d as f32;
                let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32;
                *r = 1.0 / (var + eps).sqrt();
                for (((o, x), g), b) in o.iter_mut().zip(x).zip(g).zip(b) {
                    *o = (x - mu) * *r * g + b;
                }
            }
        });
}

/// Input gradient of [`layer_norm`], **added** to `dx`: with `x̂ = (x−μ)·r` and `a = g·dy`,
/// `dx += r·(a − mean(a) − x̂·mean(a·x̂))`.
pub fn layer_norm_backward(x: &[f32], g: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let d = g.len();
    assert_eq!(x.len(), dy.len());
    assert_eq!(x.len(), dx.len());
    dx.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, x), dy), rstd)| {
            for (((dx, x), dy), &r) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)).zip(rstd) {
                let mu = x.iter().sum::<f32>() / d as f32;
                let (mut mean_a, mut mean_ax) = (0f32, 0f32);
                for ((x, dy), g) in x.iter().zip(dy).zip(g) {
                    let a = g * dy;
                    mean_a += a;
                    mean_ax += a * (x - mu) * r;
                }
                mean_a /= d as f32;
                mean_ax /= d as f32;
                for (((dx, x), dy), g) in dx.iter_mut().zip(x).zip(dy).zip(g) {
                    let xhat = (x - mu) * r;
                    *dx += r * (g * dy - mean_a - xhat * mean_ax);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finite_difference_check(
        forward: impl Fn(&[f32], &mut [f32], &mut [f32]),
        backward: impl Fn(&[f32], &[f32], &[f32], &mut [f32]),
    ) {
        let (rows, d) = (3, 8);
        let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let w: Vec<f32> = (0..rows * d).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.1).collect();
        let loss = |x: &[f32]| {
            let (mut y, mut r) = (vec![0.0; rows * d], vec![0.0; rows]);
            forward(x, &mut y, &mut r);
            y.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let (mut y, mut r) = (vec![0.0; rows * d], vec![0.0; rows]);
        forward(&x, &mut y, &mut r);
        let mut dx = vec![0.0; rows * d];
        backward(&x, &r, &w, &mut dx);
        for i in 0..rows * d {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += 1e-2;
            xm[i] -= 1e-2;
            let fd = (loss(&xp) - loss(&xm)) / 2e-2;
            assert!((fd - dx[i] as f64).abs() < 2e-3, "at {i}: fd {fd} vs {}", dx[i]);
        }
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let g: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        finite_difference_check(
            |x, y, r| rms_norm(x, &g, 1e-5, y, r),
            |x, r, dy, dx| rms_norm_backward(x, &g, r, dy, dx),
        );
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let g: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..8).map(|i| i as f32 * 0.01).collect();
        finite_difference_check(
            |x, y, r| layer_norm(x, &g, &b, 1e-5, y, r),
            |x, r, dy, dx| layer_norm_backward(x, &g, r, dy, dx),
        );
    }
}
