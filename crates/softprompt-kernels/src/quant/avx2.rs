//! AVX2 kernels: 32 codes at a time through `_mm256_maddubs_epi16` (unsigned × signed bytes,
//! pairs summed into i16) and `_mm256_madd_epi16` (pairs into i32), as GGML's x86 build does.
//! No sum can saturate: unsigned codes are at most 63 (Q6_K; signed codes go through their
//! absolute value, at most 128) and activation codes at most 127 in magnitude, so a pair is at
//! most 2·128·127 < 2¹⁵.
//!
//! Every function here needs AVX2, FMA and F16C (the callers check, once, at run time).

use std::arch::x86_64::*;

use super::blocks::{scale_min_k4, QuantType, QK, QK_K};
use super::{Q8KRow, Q8Row};

/// The f16 at `p` (unaligned) as f32.
///
/// # Safety
/// Two bytes are readable at `p`; the CPU has F16C.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes and F16C.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// The sum of 8 f32 lanes.
///
/// # Safety
/// The CPU has AVX2 (inlined into a function that enables it).
#[inline(always)]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: register-only AVX operations (the caller's function enables AVX2).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// The sum of 8 i32 lanes.
///
/// # Safety
/// The CPU has AVX2 (inlined into a function that enables it).
#[inline(always)]
pub(super) unsafe fn hsum_epi32(v: __m256i) -> i32 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// 16 bytes at `p` split into 32 nibbles: the low nibbles, then the high ones.
///
/// # Safety
/// 16 bytes are readable at `p`; the CPU has AVX2.
#[inline(always)]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes and AVX2.
    unsafe {
        let t = _mm_loadu_si128(p.cast());
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
        _mm256_and_si256(both, _mm256_set1_epi8(0xF))
    }
}

/// Σ x·y in 8 i32 lanes, for unsigned `x` (at most 128) and signed `y`.
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn dot_us(x: __m256i, y: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)) }
}

/// The 32 activation codes of block `b`.
///
/// # Safety
/// `a` holds block `b`; the CPU has AVX2.
#[inline(always)]
unsafe fn codes(a: &Q8Row<'_>, b: usize) -> __m256i {
    // SAFETY: the caller guarantees the block exists; loads are unaligned.
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(b * QK).cast()) }
}

/// `check(t, w, a, out, stride)` (which asserts the sizes and gives the bytes per weight row),
/// then `f::<R>(row, a, &mut out[j·stride..])` for every weight row `j` of `w`, with `R` = the
/// number of activation rows (1 to [`super::GROUP`]).
macro_rules! by_rows {
    ($check:path, $t:expr, $f:ident, $w:expr, $a:expr, $out:expr, $stride:expr) => {{
        let row_bytes = $check($t, $w, $a, $out, $stride);
        // plain loops, not closures: the kernels must inline into the caller's target features
        match $a.len() {
            1 => {
                for (j, row) in $w.chunks_exact(row_bytes).enumerate() {
                    $f::<1>(row, $a, &mut $out[j * $stride..])
                }
            }
            2 => {
                for (j, row) in $w.chunks_exact(row_bytes).enumerate() {
                    $f::<2>(row, $a, &mut $out[j * $stride..])
                }
            }
            3 => {
                for (j, row) in $w.chunks_exact(row_bytes).enumerate() {
                    $f::<3>(row, $a, &mut $out[j * $stride..])
                }
            }
            _ => {
                for (j, row) in $w.chunks_exact(row_bytes).enumerate() {
                    $f::<4>(row, $a, &mut $out[j * $stride..])
                }
            }
        }
    }};
}
pub(super) use by_rows;

/// The 32-value types for `R` activation rows: per block, the weight codes dotted with each
/// row's codes, scaled by `d·d8`; `m·s8` added per block for Q4_1.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[inline(always)]
unsafe fn blocks32<const R: usize>(t: QuantType, w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
    let nb = a[0].qs.len() / QK;
    let bytes = t.block_bytes();
    // SAFETY: the caller's `check` asserted that `w` and every row hold `nb` blocks; the pointers
    // address block `b` of them; the features are the caller's guarantee.
    unsafe {
        let (mut acc, mut offsets) = ([_mm256_setzero_ps(); R], [0f32; R]);
        for b in 0..nb {
            let p = w.as_ptr().add(b * bytes);
            let dw = f16_at(p);
            let x = match t {
                QuantType::Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
                QuantType::Q4_1 => nibbles(p.add(4)),
                _ => _mm256_loadu_si256(p.add(2).cast()),
            };
            // signed codes go through their absolute value, the activation taking their sign
            let ax = if t == QuantType::Q4_1 {
                x
            } else {
                _mm256_sign_epi8(x, x)
            };
            for r in 0..R {
                let y = codes(&a[r], b);
                let y = if t == QuantType::Q4_1 {
                    y
                } else {
                    _mm256_sign_epi8(y, x)
                };
                let d = _mm256_set1_ps(dw * a[r].d[b]);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_us(ax, y)), acc[r]);
            }
            if t == QuantType::Q4_1 {
                let m = f16_at(p.add(2));
                for r in 0..R {
                    offsets[r] += m * a[r].s[b];
                }
            }
        }
        for r in 0..R {
            out[r] = hsum_ps(acc[r]) + offsets[r];
        }
    }
}

/// Q4_0 × Q8_0 for 1 to 4 activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<R>(QuantType::Q4_0, w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q4_0, rows, w, a, out, stride) }
}

/// Q4_1 × Q8_1 for 1 to 4 activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_1(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<R>(QuantType::Q4_1, w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q4_1, rows, w, a, out, stride) }
}

/// Q8_0 × Q8_0 for 1 to 4 activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8Row<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { blocks32::<R>(QuantType::Q8_0, w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows, QuantType::Q8_0, rows, w, a, out, stride) }
}

/// The 6-bit scales and minima of a Q4_K/Q5_K super-block.
pub(super) struct K4Scales {
    /// Sub-block scales.
    pub(super) scales: [i16; 8],
    /// Sub-block minima.
    mins: [i32; 8],
}

impl K4Scales {
    /// `Σ_j m_j · Σ y` over sub-block `j`, from an activation super-block's 16-value sums.
    #[inline(always)]
    pub(super) fn mins_dot(&self, bsums: &[i16]) -> i32 {
        (0..8)
            .map(|j| self.mins[j] * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1])))
            .sum()
    }
}

/// The scales and minima of the Q4_K/Q5_K super-block at `p` (its 12 bytes at `p + 4`).
///
/// # Safety
/// 16 bytes are readable at `p`.
#[inline(always)]
pub(super) unsafe fn k4_scales(p: *const u8) -> K4Scales {
    // SAFETY: the caller guarantees the 12 scale bytes.
    let raw = unsafe { std::slice::from_raw_parts(p.add(4), 12) };
    let mut out = K4Scales {
        scales: [0; 8],
        mins: [0; 8],
    };
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, raw);
        out.scales[j] = i16::from(s);
        out.mins[j] = i32::from(m);
    }
    out
}

/// Q4_K and Q5_K × Q8_K (`HIGH`: Q5_K's fifth bit) for `R` activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[inline(always)]
unsafe fn q45_k<const HIGH: bool, const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
    let t = if HIGH { QuantType::Q5K } else { QuantType::Q4K };
    let nb = a[0].qs.len() / QK_K;
    let (bytes, qs_at) = (t.block_bytes(), if HIGH { 48 } else { 16 });
    // SAFETY: the caller's `check` asserted the sizes; every offset lies inside block `b` of `w` or
    // of a row.
    unsafe {
        let mut acc = [0f32; R];
        let low4 = _mm256_set1_epi8(0xF);
        let one = _mm256_set1_epi8(1);
        for b in 0..nb {
            let p = w.as_ptr().add(b * bytes);
            let sc = k4_scales(p);
            let mut h = if HIGH {
                _mm256_loadu_si256(p.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut sum = [_mm256_setzero_si256(); R];
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
                let (s_lo, s_hi) = (
                    _mm256_set1_epi16(sc.scales[2 * c]),
                    _mm256_set1_epi16(sc.scales[2 * c + 1]),
                );
                for r in 0..R {
                    let y = a[r].qs.as_ptr().add(b * QK_K + 64 * c);
                    let p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, _mm256_loadu_si256(y.cast())));
                    let p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, _mm256_loadu_si256(y.add(32).cast())));
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(p_lo, p_hi));
                }
            }
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            for r in 0..R {
                let d8 = a[r].d[b];
                let mins = sc.mins_dot(&a[r].bsums[b * 16..b * 16 + 16]);
                acc[r] += d * d8 * hsum_epi32(sum[r]) as f32 - dmin * d8 * mins as f32;
            }
        }
        out[..R].copy_from_slice(&acc);
    }
}

/// Q4_K × Q8_K for 1 to 4 activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
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
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_k(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32], stride: usize) {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
        // SAFETY: the caller's features.
        unsafe { q45_k::<true, R>(w, a, out) }
    }
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows_k, QuantType::Q5K, rows, w, a, out, stride) }
}

/// Q6_K's 6-bit codes (unsigned, 0..63) of one half super-block: `ql` 64 bytes, `qh` 32;
/// values 0..32, 32..64, 64..96, 96..128 of the half.
///
/// # Safety
/// The bytes are readable; the CPU has AVX2.
#[inline(always)]
pub(super) unsafe fn q6_codes(ql: *const u8, qh: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees 64 bytes at `ql` and 32 at `qh`.
    unsafe {
        let (low4, two) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        let l0 = _mm256_loadu_si256(ql.cast());
        let l1 = _mm256_loadu_si256(ql.add(32).cast());
        let h = _mm256_loadu_si256(qh.cast());
        // bits 2i, 2i+1 of `qh` moved to bits 4, 5
        let (h0, h1) = (
            _mm256_and_si256(h, two),
            _mm256_and_si256(_mm256_srli_epi16::<2>(h), two),
        );
        let (h2, h3) = (
            _mm256_and_si256(_mm256_srli_epi16::<4>(h), two),
            _mm256_and_si256(_mm256_srli_epi16::<6>(h), two),
        );
        [
            _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16::<4>(h0)),
            _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_slli_epi16::<4>(h1)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), low4),
                _mm256_slli_epi16::<4>(h2),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), low4),
                _mm256_slli_epi16::<4>(h3),
            ),
        ]
    }
}

/// `Σ_g sc_g · Σ y_g` over a Q6_K super-block's 16 groups (the offset of its codes is 32).
#[inline(always)]
pub(super) fn q6_offsets(scales: &[u8], bsums: &[i16]) -> i32 {
    scales
        .iter()
        .zip(bsums)
        .map(|(&s, &y)| i32::from(s as i8) * i32::from(y))
        .sum()
}

/// Q6_K × Q8_K for `R` activation rows: the codes taken unsigned, `32·Σ sc·Σ y` subtracted
/// per super-block.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[inline(always)]
unsafe fn q6_k_rows<const R: usize>(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32]) {
    let nb = a[0].qs.len() / QK_K;
    // SAFETY: the caller's `check` asserted the sizes; every offset lies inside block `b` of `w` or
    // of a row.
    unsafe {
        let mut acc = [0f32; R];
        for b in 0..nb {
            let p = w.as_ptr().add(b * 210);
            let scales = std::slice::from_raw_parts(p.add(192), 16);
            let mut sum = [_mm256_setzero_si256(); R];
            for n in 0..2 {
                let q = q6_codes(p.add(64 * n), p.add(128 + 32 * n));
                for (k, &qk) in q.iter().enumerate() {
                    let g = 8 * n + 2 * k;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(scales[g + 1] as i8)),
                        _mm_set1_epi16(i16::from(scales[g] as i8)),
                    );
                    for r in 0..R {
                        let yk = _mm256_loadu_si256(a[r].qs.as_ptr().add(b * QK_K + 128 * n + 32 * k).cast());
                        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(s, _mm256_maddubs_epi16(qk, yk)));
                    }
                }
            }
            let d = f16_at(p.add(208));
            for r in 0..R {
                let total = hsum_epi32(sum[r]) - 32 * q6_offsets(scales, &a[r].bsums[b * 16..b * 16 + 16]);
                acc[r] += d * a[r].d[b] * total as f32;
            }
        }
        out[..R].copy_from_slice(&acc);
    }
}

/// Q6_K × Q8_K for 1 to 4 activation rows.
///
/// # Safety
/// AVX2, FMA and F16C are present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[Q8KRow<'_>], out: &mut [f32], stride: usize) {
    // SAFETY: the caller guarantees the features.
    unsafe { by_rows!(super::check_rows_k, QuantType::Q6K, q6_k_rows, w, a, out, stride) }
}
