//! Rotary position encoding (the half-split layout of Hugging Face's Llama), in place.

use rayon::prelude::*;

/// Rotates each head of each row of `x: [rows, heads·head_dim]` by its position's angle:
/// for `i < head_dim/2`, `(a, b) = (x[i], x[i + head_dim/2])` becomes
/// `(a·cos − b·sin, b·cos + a·sin)`. `cos`, `sin`: `[positions, head_dim/2]` tables;
/// `positions[r]` is row r's position. `inverse` rotates by the opposite angle, which is the
/// input gradient of the rotation.
pub fn rope(x: &mut [f32], positions: &[usize], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = head_dim / 2;
    let width = x.len() / positions.len().max(1);
    assert_eq!(width * positions.len(), x.len());
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in row.chunks_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                let si = sign * s[i];
                lo[i] = a * c[i] - b * si;
                hi[i] = b * c[i] + a * si;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_the_rotation() {
        let (hd, positions) = (4, vec![0usize, 3]);
        let cos: Vec<f32> = (0..8).map(|i| (i as f32 * 0.4).cos()).collect();
        let sin: Vec<f32> = (0..8).map(|i| (i as f32 * 0.4).sin()).collect();
        let x0: Vec<f32> = (0..16).map(|i| i as f32 - 7.0).collect();
        let mut x = x0.clone();
        rope(&mut x, &positions, hd, &cos, &sin, false);
        rope(&mut x, &positions, hd, &cos, &sin, true);
        for (a, b) in x.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
