//! The portable kernels: one weight row's blocks against one quantized activation row, integer
//! dot products per block in i32, scaled in f32 (GGML's generic `ggml_vec_dot_*`). Any CPU runs
//! them; the SIMD kernels give the same integers.

use super::blocks::{decode, f16_at, QuantType, QK, QK_K};
use super::{Q8KRow, Q8Row};

/// Σ of the products of two code slices, in i32.
#[inline(always)]
fn idot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum()
}

/// Q4_0 × Q8_0.
fn q4_0_one(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(QuantType::Q4_0.block_bytes()).enumerate() {
        let y = &a.qs[b * QK..b * QK + QK];
        let mut sum = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            sum += (i32::from(q & 0xF) - 8) * i32::from(y[j]) + (i32::from(q >> 4) - 8) * i32::from(y[j + 16]);
        }
        acc += f16_at(blk, 0) * a.d[b] * sum as f32;
    }
    acc
}

/// Q4_1 × Q8_1: `d·d8·Σ q·y + m·s8` per block.
fn q4_1_one(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(QuantType::Q4_1.block_bytes()).enumerate() {
        let y = &a.qs[b * QK..b * QK + QK];
        let mut sum = 0i32;
        for j in 0..16 {
            let q = blk[4 + j];
            sum += i32::from(q & 0xF) * i32::from(y[j]) + i32::from(q >> 4) * i32::from(y[j + 16]);
        }
        acc += f16_at(blk, 0) * a.d[b] * sum as f32 + f16_at(blk, 2) * a.s[b];
    }
    acc
}

/// Q8_0 × Q8_0.
fn q8_0_one(w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(QuantType::Q8_0.block_bytes()).enumerate() {
        let y = &a.qs[b * QK..b * QK + QK];
        let x: &[i8; QK] = &std::array::from_fn(|j| blk[2 + j] as i8);
        acc += f16_at(blk, 0) * a.d[b] * idot(x, y) as f32;
    }
    acc
}

/// Any K-quant × Q8_K: per super-block `d·d8·Σ_g sc_g·Σ q·y − dmin·d8·Σ_g mn_g·Σ y`.
fn k_quant(t: QuantType, w: &[u8], a: Q8KRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(t.block_bytes()).enumerate() {
        let x = decode(t, blk);
        let y = &a.qs[b * QK_K..b * QK_K + QK_K];
        let bsums = &a.bsums[b * 16..b * 16 + 16];
        let (mut dots, mut mins) = (0i32, 0i32);
        for (g, (xg, yg)) in x.q.chunks_exact(x.group).zip(y.chunks_exact(x.group)).enumerate() {
            dots += x.sc[g] * idot(xg, yg);
            // a group's Σ y from the 16-value block sums
            let per = x.group / 16;
            let ysum: i32 = bsums[g * per..(g + 1) * per].iter().map(|&s| i32::from(s)).sum();
            mins += x.mn[g] * ysum;
        }
        acc += x.d * a.d[b] * dots as f32 - x.dmin * a.d[b] * mins as f32;
    }
    acc
}

/// Kernels for several weight and activation rows: the one-row kernel per pair.
macro_rules! per_row {
    ($($name:ident: $row:ident, $check:ident, $t:expr => $one:expr;)*) => {$(
        #[doc = concat!("`", stringify!($name), "` for every weight row and activation row.")]
        pub(super) fn $name(w: &[u8], a: &[$row<'_>], out: &mut [f32], stride: usize) {
            let row_bytes = super::$check($t, w, a, out, stride);
            for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                for (o, &r) in out[j * stride..][..a.len()].iter_mut().zip(a) {
                    *o = $one(row, r);
                }
            }
        }
    )*};
}

per_row! {
    q4_0: Q8Row, check_rows, QuantType::Q4_0 => q4_0_one;
    q4_1: Q8Row, check_rows, QuantType::Q4_1 => q4_1_one;
    q8_0: Q8Row, check_rows, QuantType::Q8_0 => q8_0_one;
    q4_k: Q8KRow, check_rows_k, QuantType::Q4K => |w, r| k_quant(QuantType::Q4K, w, r);
    q5_k: Q8KRow, check_rows_k, QuantType::Q5K => |w, r| k_quant(QuantType::Q5K, w, r);
    q6_k: Q8KRow, check_rows_k, QuantType::Q6K => |w, r| k_quant(QuantType::Q6K, w, r);
}
