//! The input gradient: the probabilities recomputed block by block, one task per (batch row,
//! query head).

use super::blocks::{block_keys, blocks, mm, softmax_rows};
use super::AttentionLayout;
use rayon::prelude::*;

/// One query head's gradients over one batch row's queries: `dq` `[queries, head_dim]`, and
/// `dk`, `dv` `[keys, head_dim]` (this head's share of its key/value head).
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Input gradients of [`attention`](super::attention) from `d_out: [N, heads·head_dim]`: writes
/// `dq` (like `q`) and `dk`, `dv` (like `k`, `v`; zero at padded slots). The probabilities are recomputed from
/// `q` and `k` one block of queries at a time (as FlashAttention does), so memory stays linear
/// in the keys. One task per (batch row, query head): P = softmax(scale·Q·Kᵀ), dP = dO·Vᵀ,
/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K, dV += Pᵀ·dO, dK += scale·dSᵀ·Q; the
/// heads of a group are then summed into their key/value head.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    lay: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    lay.check(q, k, v);
    let (h, hd, s) = (lay.heads, lay.head_dim, lay.keys);
    let kvd = lay.kv_heads * hd;
    let (scale, group) = (lay.scale(), lay.group());
    assert_eq!(d_out.len(), q.len());
    assert_eq!(dq.len(), q.len());
    assert_eq!((dk.len(), dv.len()), (k.len(), v.len()));
    let rows = lay.key_mask.len() / s.max(1);
    let mut row_blocks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); rows];
    for (first, end) in blocks(lay) {
        row_blocks[lay.query_row[first]].push((first, end));
    }
    let tasks: Vec<(usize, usize)> = (0..rows)
        .filter(|&b| !row_blocks[b].is_empty())
        .flat_map(|b| (0..h).map(move |head| (b, head)))
        .collect();
    let head_grads = |&(b, head): &(usize, usize)| -> HeadGrads {
        let g = head / group;
        let blocks = &row_blocks[b];
        let start = blocks[0].0;
        let count = blocks[blocks.len() - 1].1 - start;
        let mut out = HeadGrads {
            dq: vec![0f32; count * hd],
            dk: vec![0f32; s * hd],
            dv: vec![0f32; s * hd],
        };
        let (k_row, v_row) = (&k[b * s * kvd + g * hd..], &v[b * s * kvd + g * hd..]);
        let (mut p, mut ds) = (Vec::new(), Vec::new());
        for &(first, last_end) in blocks {
            let m = last_end - first;
            let end = block_keys(lay, last_end - 1);
            let (q_blk, do_blk) = (&q[(first * h + head) * hd..], &d_out[(first * h + head) * hd..]);
            p.resize(m * end, 0.0);
            ds.resize(m * end, 0.0);
            let none = gemm::Parallelism::None;
            mm(
                (m, end, hd),
                &mut p,
                end,
                false,
                (q_blk, h * hd, 1),
                (k_row, 1, kvd),
                scale,
                none,
            );
            crate::simd::wide(|| softmax_rows(lay, &mut p, first, end));
            mm(
                (m, end, hd),
                &mut ds,
                end,
                false,
                (do_blk, h * hd, 1),
                (v_row, 1, kvd),
                1.0,
                none,
            );
            for (p, ds) in p.chunks(end).zip(ds.chunks_mut(end)) {
                let row: f32 = p.iter().zip(ds.iter()).map(|(p, d)| p * d).sum();
                for (d, p) in ds.iter_mut().zip(p) {
                    *d = p * (*d - row);
                }
            }
            let dq_blk = &mut out.dq[(first - start) * hd..];
            mm(
                (m, hd, end),
                dq_blk,
                hd,
                false,
                (&ds, end, 1),
                (k_row, kvd, 1),
                scale,
                none,
            );
            mm(
                (end, hd, m),
                &mut out.dv,
                hd,
                true,
                (&p, 1, end),
                (do_blk, h * hd, 1),
                1.0,
                none,
            );
            mm(
                (end, hd, m),
                &mut out.dk,
                hd,
                true,
                (&ds, 1, end),
                (q_blk, h * hd, 1),
                scale,
                none,
            );
        }
        out
    };
    let grads: Vec<HeadGrads> = tasks.par_iter().map(head_grads).collect();
    dk.fill(0.0);
    dv.fill(0.0);
    for (&(b, head), gr) in tasks.iter().zip(&grads) {
        let g = head / group;
        let start = row_blocks[b][0].0;
        for (i, row) in gr.dq.chunks(hd).enumerate() {
            dq[((start + i) * h + head) * hd..][..hd].copy_from_slice(row);
        }
        for (slot, (gk, gv)) in gr.dk.chunks(hd).zip(gr.dv.chunks(hd)).enumerate() {
            let at = (b * s + slot) * kvd + g * hd;
            for ((k, v), (a, c)) in dk[at..at + hd]
                .iter_mut()
                .zip(&mut dv[at..at + hd])
                .zip(gk.iter().zip(gv))
            {
                *k += a;
                *v += c;
            }
        }
    }
}
