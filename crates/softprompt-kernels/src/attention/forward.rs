//! The forward pass: softmax attention block by block.

use super::blocks::{block_chunks, block_keys, blocks, mm, softmax_rows};
use super::AttentionLayout;
use rayon::prelude::*;

/// Softmax attention: writes `out: [N, heads·head_dim]`. Nothing of size queries × keys is
/// kept: [`attention_backward`](super::attention_backward) recomputes the probabilities block
/// by block.
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
