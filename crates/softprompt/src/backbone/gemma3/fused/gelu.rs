//! Gemma's gated MLP activation on f32 rows, with its input gradient: transformers'
//! `gelu_pytorch_tanh` of the gate times the up projection.

use rayon::prelude::*;

/// `sqrt(2/π)`.
const K: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
const C: f32 = 0.044_715;
/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 16;

/// `gelu_tanh(z) = 0.5·z·(1 + tanh(k·(z + c·z³)))` (as PyTorch computes it: `z·z·z`).
#[inline(always)]
fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + (K * (z + C * (z * z * z))).tanh())
}

/// `out = gelu_tanh(gate) ⊙ up` for `gate_up: [rows, 2·width]` (gate, then up, per row) and
/// `out: [rows, width]`.
pub(super) fn gelu_tanh_mul(gate_up: &[f32], out: &mut [f32], width: usize) {
    assert_eq!(gate_up.len(), 2 * out.len(), "gate_up must be twice as wide as out");
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * width * ROWS_PER_TASK))
        .for_each(|(out, gu)| {
            for (o, gu) in out.chunks_mut(width).zip(gu.chunks(2 * width)) {
                let (gate, up) = gu.split_at(width);
                for ((o, &z), u) in o.iter_mut().zip(gate).zip(up) {
                    *o = gelu(z) * u;
                }
            }
        });
}

/// Input gradient of [`gelu_tanh_mul`]: `d_gate = dm ⊙ up ⊙ gelu'(gate)`,
/// `d_up = dm ⊙ gelu(gate)`, written to `d_gate_up: [rows, 2·width]`; with
/// `t = tanh(k·(z + c·z³))`, `gelu'(z) = 0.5·(1 + t) + 0.5·z·(1 − t²)·k·(1 + 3c·z²)`.
pub(super) fn gelu_tanh_mul_backward(gate_up: &[f32], dm: &[f32], d_gate_up: &mut [f32], width: usize) {
    assert_eq!(gate_up.len(), 2 * dm.len());
    assert_eq!(gate_up.len(), d_gate_up.len());
    d_gate_up
        .par_chunks_mut(2 * width * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * width * ROWS_PER_TASK))
        .zip(dm.par_chunks(width * ROWS_PER_TASK))
        .for_each(|((dgu, gu), dm)| {
            for ((dgu, gu), dm) in dgu
                .chunks_mut(2 * width)
                .zip(gu.chunks(2 * width))
                .zip(dm.chunks(width))
            {
                let (gate, up) = gu.split_at(width);
                let (dgate, dup) = dgu.split_at_mut(width);
                for i in 0..width {
                    let z = gate[i];
                    let t = (K * (z + C * (z * z * z))).tanh();
                    let slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * K * (1.0 + 3.0 * C * z * z);
                    dup[i] = dm[i] * 0.5 * z * (1.0 + t);
                    dgate[i] = dm[i] * up[i] * slope;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let width = 5;
        let gu: Vec<f32> = (0..2 * 2 * width).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let w: Vec<f32> = (0..2 * width).map(|i| (i as f32 * 0.3).cos()).collect();
        let loss = |gu: &[f32]| {
            let mut out = vec![0.0; 2 * width];
            gelu_tanh_mul(gu, &mut out, width);
            out.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut grad = vec![0.0; gu.len()];
        gelu_tanh_mul_backward(&gu, &w, &mut grad, width);
        for i in 0..gu.len() {
            let (mut up, mut down) = (gu.clone(), gu.clone());
            up[i] += 1e-2;
            down[i] -= 1e-2;
            let fd = (loss(&up) - loss(&down)) / 2e-2;
            assert!((fd - grad[i] as f64).abs() < 2e-3, "{i}: fd {fd} vs {}", grad[i]);
        }
    }
}
