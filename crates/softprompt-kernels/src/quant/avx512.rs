//! AVX-512 VNNI kernels: 64 codes at a time through `_mm512_dpbusd_epi32` (unsigned × signed
//! bytes, four products summed into each i32 lane, no saturation). The 32-value types take two
//! blocks per instruction (a last odd block runs 256 bits wide); the K-quants two sub-blocks,
//! each lane then multiplied by its sub-block's scale.
//!
//! Every function here needs AVX-512 F, BW, VL and VNNI, and FMA and F16C (the callers check,
//! once, at run time).

use std::arch::x86_64::*;

use super::avx2::{by_rows, f16_at, hsum_ps, k4_scales, nibbles, q6_codes, q6_offsets};
use super::blocks::{QuantType, QK, QK_K};
use super::{Q8KRow, Q8Row};

/// How far ahead of the block being read the weight stream is prefetched (bytes).
const PREFETCH: usize = 1024;

/// Two 256-bit halves as one 512-bit vector (`lo` in the low half).
///
/// # Safety
/// The CPU has AVX-512 F.
#[inline(always)]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    // SAFETY: register-only AVX-512 F operations.
    unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi) }
}

/// The unsigned nibbles of two 32-value blocks whose 16 code bytes are at `p0` and `p1`:
/// block 0's 32 codes, then block 1's (each: low nibbles, then high).
///
/// # Safety
/// 16 bytes are readable at each; the CPU has AVX-512 F/BW.
#[inline(always)]
unsafe fn nibbles2(p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: the caller guarantees the bytes and the features.
    unsafe {
        let both = _mm256_loadu2_m128i(p1.cast(), p0.cast());
        // 128-bit lanes [q0 q0 q1 q1], the second of each pair shifted down a nibble
        let z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(both));
        let z = _mm512_mask_srli_epi16::<4>(z, 0xFF00_FF00, z);
        _mm512_and_si512(z, _mm512_set1_epi8(0xF))
    }
}

/// How the 512-bit kernels read a 32-value block type.
trait Block32 {
    /// The type.
    const T: QuantType;
    /// Whether the codes are signed (they then go through their absolute value, the
    /// activation taking their sign).
    const SIGNED: bool;
    /// The codes of the blocks at `p0` and `p1` (each 32: low nibbles, then high).
    ///
    /// # Safety
    /// Both blocks are readable; the CPU has AVX-512 F/BW.
    unsafe fn two(p0: *const u8, p1: *const u8) -> __m512i;
    /// The codes of the block at `p`.
    ///
    /// # Safety
    /// The block is readable; the CPU has AVX2.
    unsafe fn one(p: *const u8) -> __m256i;
    /// Q4_1's offset `m` of the block at `p` (0 for the others).
    ///
    /// # Safety
    /// The block is readable; the CPU has F16C.
    unsafe fn m(_p: *const u8) -> f32 {
        0.0
    }
}

/// Q4_0: codes `q − 8`.
struct Q4_0;
impl Block32 for Q4_0 {
    const T: QuantType = QuantType::Q4_0;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn two(p0: *const u8, p1: *const u8) -> __m512i {
        // SAFETY: the caller's blocks and features.
        unsafe { _mm512_sub_epi8(nibbles2(p0.add(2), p1.add(2)), _mm512_set1_epi8(8)) }
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> __m256i {
        // SAFETY: the caller's block and features.
        unsafe { _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)) }
    }
}

/// Q4_1: unsigned codes, `m·s8` added per block.
struct Q4_1;
impl Block32 for Q4_1 {
    const T: QuantType = QuantType::Q4_1;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn two(p0: *const u8, p1: *const u8) -> __m512i {
        // SAFETY: the caller's blocks and features.
        unsafe { nibbles2(p0.add(4), p1.add(4)) }
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> __m256i {
        // SAFETY: the caller's block and features.
        unsafe { nibbles(p.add(4)) }
    }
    #[inline(always)]
    unsafe fn m(p: *const u8) -> f32 {
        // SAFETY: the caller's block and features.
        unsafe { f16_at(p.add(2)) }
    }
}

/// Q8_0: signed codes.
struct Q8_0;
impl Block32 for Q8_0 {
    const T: QuantType = QuantType::Q8_0;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn two(p0: *const u8, p1: *const u8) -> __m512i {
        // SAFETY: the caller's blocks and features.
        unsafe {
            join(
                _mm256_loadu_si256(p0.add(2).cast()),
                _mm256_loadu_si256(p1.add(2).cast()),
            )
        }
    }
    #[inline(always)]
    unsafe fn one(p: *const u8) -> __m256i {
        // SAFETY: the caller's block and features.
        unsafe { _mm256_loadu_si256(p.add(2).cast()) }
    }
}

/// A 32-value type for `R` activation rows, two blocks per instruction (a last odd block 256
/// bits wide). Signed weight codes go through their absolute value and the activation codes
/// take their sign (`_mm512_abs_epi8`, a masked negation), so every lane holds the exact dot
/// product of its four code pairs.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[inline(always)]
unsafe fn blocks32<B: Block32, const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
    let nb = a[0].qs.len() / QK;
    let bytes = B::T.block_bytes();
    // SAFETY: the caller's `check` asserted that `w` and every row hold `nb` blocks; every pointer
    // addresses block `b` or `b + 1 < nb`; the features are the caller's guarantee.
    unsafe {
        let (mut acc, mut offsets) = ([_mm512_setzero_ps(); R], [_mm_setzero_ps(); R]);
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut b = 0;
        while b + 2 <= nb {
            let p0 = w.as_ptr().add(b * bytes);
            let p1 = p0.add(bytes);
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(PREFETCH).cast());
            let x = B::two(p0, p1);
            let (u, negative) = if B::SIGNED {
                (_mm512_abs_epi8(x), _mm512_movepi8_mask(x))
            } else {
                (x, 0)
            };
            // [d0, m0, d1, m1] (Q4_0/Q8_0: no m; those lanes unused), then [d0, d1] and [m0, m1]
            let dm = _mm_cvtph_ps(_mm_insert_epi32::<1>(
                _mm_cvtsi32_si128(p0.cast::<i32>().read_unaligned()),
                p1.cast::<i32>().read_unaligned(),
            ));
            let dw = _mm_shuffle_ps::<0b10_00_10_00>(dm, dm);
            for r in 0..R {
                let mut y = _mm512_loadu_si512(a[r].qs.as_ptr().add(b * QK).cast());
                if B::SIGNED {
                    y = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
                }
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y);
                // [d0·d8₀ ×8, d1·d8₁ ×8]
                let d8 = _mm_castpd_ps(_mm_load_sd(a[r].d.as_ptr().add(b).cast()));
                let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(dw, d8)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
            }
            if B::T == QuantType::Q4_1 {
                let m = _mm_shuffle_ps::<0b11_01_11_01>(dm, dm);
                for r in 0..R {
                    let s8 = _mm_castpd_ps(_mm_load_sd(a[r].s.as_ptr().add(b).cast()));
                    offsets[r] = _mm_fmadd_ps(m, s8, offsets[r]);
                }
            }
            b += 2;
        }
        for r in 0..R {
            // lanes 2 and 3 of the offsets are zero (the loads fill two lanes)
            let o = _mm_add_ps(offsets[r], _mm_movehdup_ps(offsets[r]));
            out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(o);
        }
        if b < nb {
            let p = w.as_ptr().add(b * bytes);
            let (x, dw, m) = (B::one(p), f16_at(p), B::m(p));
            let u = if B::SIGNED { _mm256_abs_epi8(x) } else { x };
            for r in 0..R {
                let mut y = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK).cast());
                if B::SIGNED {
                    y = _mm256_sign_epi8(y, x);
                }
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, y);
                let d = _mm256_set1_ps(dw * a[r].d[b]);
                out[r] += hsum_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), d)) + m * a[r].s[b];
            }
        }
    }
}

/// Q4_0 × Q8_0 for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<Q4_0, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q4_0, rows, w, a, out, stride) }
}

/// Q4_1 × Q8_1 for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_1(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<Q4_1, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q4_1, rows, w, a, out, stride) }
}

/// Q8_0 × Q8_0 for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<Q8_0, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q8_0, rows, w, a, out, stride) }
}

/// Q4_K and Q5_K × Q8_K (`HIGH`: Q5_K's fifth bit) for `R` activation rows: 64 codes (two
/// sub-blocks) at a time, byte pairs summed into i16 (`_mm512_maddubs_epi16`), then multiplied
/// by their sub-block's scale and summed into i32 in one VNNI instruction
/// (`_mm512_dpwssd_epi32`).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[inline(always)]
unsafe fn q45_k<const HIGH: bool, const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
    let t = if HIGH { QuantType::Q5K } else { QuantType::Q4K };
    let nb = a[0].qs.len() / QK_K;
    let (bytes, qs_at) = (t.block_bytes(), if HIGH { 48 } else { 16 });
    // SAFETY: the caller's `check` asserted the sizes; every offset lies inside block `b` of `w` or
    // of a row.
    unsafe {
        let mut acc = [0f32; R];
        let (low4, one) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(1));
        for b in 0..nb {
            let p = w.as_ptr().add(b * bytes);
            let sc = k4_scales(p);
            let mut h = if HIGH {
                _mm256_loadu_si256(p.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut sum = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let q = _mm256_loadu_si256(p.add(qs_at + 32 * c).cast());
                let (mut lo, mut hi) = (
                    _mm256_and_si256(q, low4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4),
                );
                if HIGH {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(h, one)));
                    hi = _mm256_or_si256(
                        hi,
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(h), one)),
                    );
                    h = _mm256_srli_epi16::<2>(h);
                }
                let u = join(lo, hi);
                // 16 i16 lanes per sub-block after the byte pairs are summed
                let scale = _mm512_mask_blend_epi16(
                    0xFFFF_0000,
                    _mm512_set1_epi16(sc.scales[2 * c]),
                    _mm512_set1_epi16(sc.scales[2 * c + 1]),
                );
                for r in 0..R {
                    let y = _mm512_loadu_si512(a[r].qs.as_ptr().add(b * QK_K + 64 * c).cast());
                    sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(u, y), scale);
                }
            }
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            for r in 0..R {
                let d8 = a[r].d[b];
                let mins = sc.mins_dot(&a[r].bsums[b * 16..b * 16 + 16]);
                acc[r] += d * d8 * _mm512_reduce_add_epi32(sum[r]) as f32 - dmin * d8 * mins as f32;
            }
        }
        out[..R].copy_from_slice(&acc);
    }
}

/// Q4_K × Q8_K for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_k(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { q45_k::<false, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows_k, QuantType::Q4K, rows, w, a, out, stride) }
}

/// Q5_K × Q8_K for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q5_k(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { q45_k::<true, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows_k, QuantType::Q5K, rows, w, a, out, stride) }
}

/// Q6_K × Q8_K for `R` activation rows: 64 unsigned codes (four groups of 16) at a time, as
/// Q4_K's (each group's eight i16 lanes with its scale); `32·Σ sc·Σ y` subtracted per
/// super-block.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[inline(always)]
unsafe fn q6_k_rows<const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
    let nb = a[0].qs.len() / QK_K;
    // SAFETY: the caller's `check` asserted the sizes; every offset lies inside block `b` of `w` or
    // of a row.
    unsafe {
        let mut acc = [0f32; R];
        // byte i of the scale shuffle: group base + i / 4
        // bytes of the scale shuffles: group base + 0 (×8), + 1 (×8); + 2, + 3
        let (spread0, spread1) = (
            _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        );
        for b in 0..nb {
            let p = w.as_ptr().add(b * 210);
            let scales = std::slice::from_raw_parts(p.add(192), 16);
            let sc = _mm_loadu_si128(p.add(192).cast());
            let mut sum = [_mm512_setzero_si512(); R];
            for n in 0..2 {
                let q = q6_codes(p.add(64 * n), p.add(128 + 32 * n));
                for half in 0..2 {
                    let codes = join(q[2 * half], q[2 * half + 1]);
                    // each of the four groups' scale on its eight i16 lanes
                    let base = _mm_set1_epi8((8 * n + 4 * half) as i8);
                    let scale = _mm512_cvtepi8_epi16(_mm256_set_m128i(
                        _mm_shuffle_epi8(sc, _mm_add_epi8(spread1, base)),
                        _mm_shuffle_epi8(sc, _mm_add_epi8(spread0, base)),
                    ));
                    for r in 0..R {
                        let y = _mm512_loadu_si512(a[r].qs.as_ptr().add(b * QK_K + 128 * n + 64 * half).cast());
                        sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(codes, y), scale);
                    }
                }
            }
            let d = f16_at(p.add(208));
            for r in 0..R {
                let total = _mm512_reduce_add_epi32(sum[r]) - 32 * q6_offsets(scales, &a[r].bsums[b * 16..b * 16 + 16]);
                acc[r] += d * a[r].d[b] * total as f32;
            }
        }
        out[..R].copy_from_slice(&acc);
    }
}

/// Q6_K × Q8_K for 1 to 4 activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C are present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32], stride: usize) {
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows_k, QuantType::Q6K, q6_k_rows, w, a, out, stride) }
}
