//! Activation rows quantized to 8 bits per block, as GGML's x86 build quantizes the vector a
//! quantized weight multiplies: Q8_0/Q8_1 for the 32-value types (`quantize_row_q8_0`,
//! `quantize_row_q8_1`), Q8_K for the K-quants (`quantize_row_q8_K_ref`). The rows are held
//! with their codes contiguous (a kernel loads several blocks at once) and the per-block
//! factors beside them.

use super::blocks::{QK, QK_K};

/// GGML's `nearest_int`: round to nearest, ties to even, for `|v| ≤ 2²²` (the magic-number
/// trick, which vectorises where `round_ties_even` would call libm).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `v` rounded to an IEEE half and back (GGML stores these factors as f16).
#[inline(always)]
fn through_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// One cache line of codes.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// Activation codes in memory aligned to 64 bytes: the kernels' 512-bit loads of a row's block
/// pairs (and super-blocks) then never straddle two cache lines when a row is whole lines.
#[derive(Debug, Clone, Default)]
pub struct Codes {
    lines: Vec<Line>,
    len: usize,
}

impl Codes {
    /// Makes room for `len` codes (new ones zero).
    fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }
}

impl std::ops::Deref for Codes {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` bytes (`resize`), contiguous (`Line` is 64 bytes
        // of `i8` without padding), every bit pattern a valid `i8`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<i8>(), self.len) }
    }
}

impl std::ops::DerefMut for Codes {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as for `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<i8>(), self.len) }
    }
}

/// Rows quantized in blocks of 32 (GGML's Q8_1, whose codes and `d` are Q8_0's).
#[derive(Debug, Clone, Default)]
pub struct Q8Rows {
    /// Values per row (a multiple of 32).
    pub k: usize,
    /// Codes, `[m, k]`, each in −127..=127.
    pub qs: Codes,
    /// Per block: the scale `d = amax / 127`, rounded to f16 as GGML stores it.
    pub d: Vec<f32>,
    /// Per block: `d · Σ codes` before `d` was rounded, rounded to f16 (Q8_1's `s`).
    pub s: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `x: [m, k]` row by row (`k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize) -> Q8Rows {
        let mut out = Q8Rows::default();
        out.fill(x, k);
        out
    }

    /// [`Q8Rows::quantize`] into this value's buffers.
    pub fn fill(&mut self, x: &[f32], k: usize) {
        assert!(
            k.is_multiple_of(QK) && x.len().is_multiple_of(k.max(1)),
            "Q8: rows of {k} values"
        );
        let blocks = x.len() / QK;
        self.k = k;
        self.qs.resize(x.len());
        for v in [&mut self.d, &mut self.s] {
            v.resize(blocks, 0.0);
        }
        crate::simd::wide(|| {
            for (b, (xb, qb)) in x.chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK)).enumerate() {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    let i = nearest_int(v * id);
                    sum += i;
                    *q = i as i8;
                }
                self.d[b] = through_f16(d);
                self.s[b] = through_f16(d * sum as f32);
            }
        });
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.qs.len() / self.k.max(1)
    }
}

/// Rows quantized in super-blocks of 256 (GGML's Q8_K).
#[derive(Debug, Clone, Default)]
pub struct Q8KRows {
    /// Values per row (a multiple of 256).
    pub k: usize,
    /// Codes, `[m, k]`, each in −127..=127.
    pub qs: Codes,
    /// Per super-block: the scale (`1 / iscale`, f32).
    pub d: Vec<f32>,
    /// Per group of 16 codes: their sum.
    pub bsums: Vec<i16>,
}

impl Q8KRows {
    /// Quantizes `x: [m, k]` row by row (`k` a multiple of 256).
    pub fn quantize(x: &[f32], k: usize) -> Q8KRows {
        let mut out = Q8KRows::default();
        out.fill(x, k);
        out
    }

    /// [`Q8KRows::quantize`] into this value's buffers.
    pub fn fill(&mut self, x: &[f32], k: usize) {
        assert!(
            k.is_multiple_of(QK_K) && x.len().is_multiple_of(k.max(1)),
            "Q8_K: rows of {k} values"
        );
        let blocks = x.len() / QK_K;
        self.k = k;
        self.qs.resize(x.len());
        self.d.resize(blocks, 0.0);
        self.bsums.resize(blocks * QK_K / 16, 0);
        crate::simd::wide(|| {
            for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(self.qs.chunks_exact_mut(QK_K)).enumerate() {
                // The value of largest magnitude (the first of equal ones), with its sign.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let sums = &mut self.bsums[b * 16..b * 16 + 16];
                if amax == 0.0 {
                    self.d[b] = 0.0;
                    qb.fill(0);
                    sums.fill(0);
                    continue;
                }
                let iscale = -127.0 / max;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    *q = nearest_int(iscale * v).min(127) as i8;
                }
                for (s, g) in sums.iter_mut().zip(qb.chunks_exact(16)) {
                    *s = g.iter().map(|&q| i16::from(q)).sum();
                }
                self.d[b] = 1.0 / iscale;
            }
        });
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.qs.len() / self.k.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        for (v, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (126.7, 127),
            (-3.2, -3),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
            assert_eq!(nearest_int(v), v.round_ties_even() as i32);
        }
    }

    #[test]
    fn q8_follows_ggml() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.01).collect();
        let q = Q8Rows::quantize(&x, 64);
        for b in 0..2 {
            let xb = &x[b * 32..b * 32 + 32];
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(q.d[b], half::f16::from_f32(amax / 127.0).to_f32());
            let codes = &q.qs[b * 32..b * 32 + 32];
            assert!(codes.iter().any(|&c| c.abs() == 127));
            let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
            assert_eq!(q.s[b], half::f16::from_f32(amax / 127.0 * sum as f32).to_f32());
            for (&c, &v) in codes.iter().zip(xb) {
                assert_eq!(i32::from(c), (v * (127.0 / amax)).round_ties_even() as i32);
            }
        }
        let zeros = Q8Rows::quantize(&[0.0; 32], 32);
        assert_eq!((zeros.d[0], zeros.s[0]), (0.0, 0.0));
    }

    #[test]
    fn q8k_follows_ggml() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 101 % 256) as f32 - 100.0) * 0.003).collect();
        let q = Q8KRows::quantize(&x, 256);
        // The value of largest magnitude is 155·0.003, positive: it maps to −127.
        let iscale = -127.0 / (155.0 * 0.003f32);
        assert_eq!(q.d[0], 1.0 / iscale);
        for (&c, &v) in q.qs.iter().zip(&x) {
            assert_eq!(i32::from(c), ((iscale * v).round_ties_even() as i32).min(127));
        }
        for g in 0..16 {
            let s: i32 = q.qs[g * 16..g * 16 + 16].iter().map(|&c| i32::from(c)).sum();
            assert_eq!(i32::from(q.bsums[g]), s);
        }
    }
}
