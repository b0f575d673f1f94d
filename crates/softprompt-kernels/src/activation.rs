//! Gated and plain activations with their input gradients.

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 8;

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + crate::exp::exp(-z))
}

/// SwiGLU's gate: for each row of `gate_up: [rows, 2·width]` (gate, then up),
/// `out = silu(gate) ⊙ up` with `out: [rows, width]`.
pub fn silu_mul(gate_up: &[f32], out: &mut [f32], width: usize) {
    assert_eq!(
        gate_up.len(),
        2 * out.len(),
        "silu_mul: gate_up must be twice as wide as out"
    );
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * width * ROWS_PER_TASK))
        .for_each(|(out, gu)| {
            crate::simd::wide(|| {
                for (o, gu) in out.chunks_mut(width).zip(gu.chunks(2 * width)) {
                    let (gate, up) = gu.split_at(width);
                    for ((o, &z), u) in o.iter_mut().zip(gate).zip(up) {
                        *o = z * sigmoid(z) * u;
                    }
                }
            })
        });
}

/// Input gradient of [`silu_mul`]: `d_gate = dm ⊙ up ⊙ silu'(gate)`, `d_up = dm ⊙ silu(gate)`,
/// written to `d_gate_up: [rows, 2·width]`; `silu'(z) = s·(1 + z·(1 − s))`, `s = sigmoid(z)`.
pub fn silu_mul_backward(gate_up: &[f32], dm: &[f32], d_gate_up: &mut [f32], width: usize) {
    assert_eq!(gate_up.len(), 2 * dm.len());
    assert_eq!(gate_up.len(), d_gate_up.len());
    d_gate_up
        .par_chunks_mut(2 * width * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * width * ROWS_PER_TASK))
        .zip(dm.par_chunks(width * ROWS_PER_TASK))
        .for_each(|((dgu, gu), dm)| {
            crate::simd::wide(|| {
                for ((dgu, gu), dm) in dgu
                    .chunks_mut(2 * width)
                    .zip(gu.chunks(2 * width))
                    .zip(dm.chunks(width))
                {
                    let (gate, up) = gu.split_at(width);
                    let (dgate, dup) = dgu.split_at_mut(width);
                    for i in 0..width {
                        let (z, s) = (gate[i], sigmoid(gate[i]));
                        dup[i] = dm[i] * z * s;
                        dgate[i] = dm[i] * up[i] * s * (1.0 + z * (1.0 - s));
                    }
                }
            })
        });
}

/// The exact GELU `z·Φ(z)` (BERT's `gelu`), in place.
pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|x| {
        for z in x {
            *z = 0.5 * *z * (1.0 + libm::erff(*z * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// Input gradient of [`gelu_erf`] at pre-activations `z`, multiplied into `dy` in place:
/// `dy ⊙ (Φ(z) + z·φ(z))`.
pub fn gelu_erf_backward(z: &[f32], dy: &mut [f32]) {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    dy.par_chunks_mut(4096).zip(z.par_chunks(4096)).for_each(|(dy, z)| {
        for (d, &z) in dy.iter_mut().zip(z) {
            let cdf = 0.5 * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * z * z).exp() * inv_sqrt_2pi;
            *d *= cdf + z * pdf;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_gradient_matches_finite_differences() {
        let width = 5;
        let gu: Vec<f32> = (0..2 * 2 * width).map(|i| (i as f32 * 0.7).sin() * 2.0).collect();
        let w: Vec<f32> = (0..2 * width).map(|i| (i as f32 * 0.3).cos()).collect();
        let loss = |gu: &[f32]| {
            let mut m = vec![0.0; 2 * width];
            silu_mul(gu, &mut m, width);
            m.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut d = vec![0.0; gu.len()];
        silu_mul_backward(&gu, &w, &mut d, width);
        for i in 0..gu.len() {
            let (mut p, mut m) = (gu.clone(), gu.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            let fd = (loss(&p) - loss(&m)) / 2e-2;
            assert!((fd - d[i] as f64).abs() < 1e-3, "at {i}: {fd} vs {}", d[i]);
        }
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        for z in [-3.0f32, -1.0, -0.2, 0.0, 0.5, 2.0] {
            let f = |z: f32| {
                let mut v = [z];
                gelu_erf(&mut v);
                v[0] as f64
            };
            let mut d = [1.0];
            gelu_erf_backward(&[z], &mut d);
            let fd = (f(z + 1e-2) - f(z - 1e-2)) / 2e-2;
            assert!((fd - d[0] as f64).abs() < 1e-3, "at {z}: {fd} vs {}", d[0]);
        }
    }
}
