//! The blocked kernels against a direct f64 computation and finite differences.

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
    let wave = |len: usize, seed: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * seed).sin()).collect() };
    [
        wave(n * h * hd, 0.37),
        wave(2 * s * hkv * hd, 0.53),
        wave(2 * s * hkv * hd, 0.71),
        wave(n * h * hd, 0.91),
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
