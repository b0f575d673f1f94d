//! The blocked machinery both passes share: query blocks, the masked softmax of a block's
//! scores, and one bounds-checked `gemm` call on strided slices.

use super::AttentionLayout;

/// Queries per block: attention runs block by block (one task each), so a block's scores
/// `[BLOCK, keys]` are the only score matrix that ever exists (memory linear in the keys).
const BLOCK: usize = 64;

/// `dst (+)= beta · lhs · rhs` for an `[m, k]` lhs and a `[k, n]` rhs given by (row, column)
/// strides into slices, `dst` `[m, n]` with row stride `dst_rs`, on the calling thread.
/// The largest index each operand is read or written at is checked first, so the call is safe.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len(), "mm: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(last(m, k, lhs.1, lhs.2) < lhs.0.len(), "mm: lhs out of bounds");
    assert!(last(k, n, rhs.1, rhs.2) < rhs.0.len(), "mm: rhs out of bounds");
    // SAFETY: every index gemm touches is below the bounds checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// The query blocks: `(first, end)` ranges of at most [`BLOCK`] queries of one batch row.
pub(super) fn blocks(lay: &AttentionLayout) -> Vec<(usize, usize)> {
    let n = lay.query_row.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && end - start < BLOCK && lay.query_row[end] == lay.query_row[start] {
            end += 1;
        }
        out.push((start, end));
        start = end;
    }
    out
}

/// Splits `data` into the per-block chunks of `width` values per query.
pub(super) fn block_chunks<'a>(mut data: &'a mut [f32], blocks: &[(usize, usize)], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(blocks.len());
    for &(a, b) in blocks {
        let (head, rest) = data.split_at_mut((b - a) * width);
        out.push(head);
        data = rest;
    }
    out
}

/// Masked softmax of each row of `scores` `[m, end]` in place: query `first + r` sees the key
/// slots `j < its span` that are real; the others get probability 0.
#[inline(always)]
pub(super) fn softmax_rows(lay: &AttentionLayout, scores: &mut [f32], first: usize, end: usize) {
    for (r, row) in scores.chunks_mut(end).enumerate() {
        let (b, lim) = lay.span(first + r);
        let allowed = |j: usize| j < lim && lay.key_mask[b * lay.keys + j];
        let max = (0..end)
            .filter(|&j| allowed(j))
            .map(|j| row[j])
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        // Exponentials first, all of them (a loop the compiler vectorises), then the masked
        // slots cleared.
        for x in row.iter_mut() {
            *x = crate::exp::exp(*x - max);
        }
        let mut sum = 0.0;
        for (j, x) in row.iter_mut().enumerate() {
            if !allowed(j) {
                *x = 0.0;
            }
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Key slots a block needs: up to the last query's causal limit (queries of a row are in
/// position order), or all of them.
pub(super) fn block_keys(lay: &AttentionLayout, last_query: usize) -> usize {
    lay.span(last_query).1
}
