//! Products of weights held in GGML's quantized blocks (as a GGUF file stores them) with a few
//! activation rows, as llama.cpp computes them: each activation row is quantized to 8 bits per
//! block ([`activation`]: Q8_0/Q8_1 for the 32-value types, Q8_K for the K-quants), every block
//! pair is an integer dot product in i32, scaled by the two blocks' factors in f32. Decode
//! reads each weight byte once per step, 4.5–8.5 bits per weight instead of 32.
//!
//! Kernels per type ([`QuantType`]): portable Rust (any CPU), AVX2 (`_mm256_maddubs_epi16`),
//! AVX-512 VNNI (`_mm512_dpbusd_epi32`); [`Isa::best`] picks the fastest this CPU runs, once,
//! at run time. [`matmul_wt`] spreads the output rows over rayon's threads.

pub mod activation;
pub mod blocks;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use activation::{Q8KRows, Q8Rows};
pub use blocks::QuantType;

/// The instructions a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (and AVX2, FMA, F16C).
    Avx512Vnni,
}

impl Isa {
    /// Every kernel family, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni];

    /// Whether this CPU runs these kernels.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest kernels this CPU runs (checked once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .rev()
                .find(|i| i.available())
                .unwrap_or(Isa::Portable)
        })
    }
}

/// One activation row quantized in 32-value blocks (a view into [`Q8Rows`]).
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

/// One activation row quantized in 256-value super-blocks (a view into [`Q8KRows`]).
#[derive(Clone, Copy)]
pub(crate) struct Q8KRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    bsums: &'a [i16],
}

impl Q8Rows {
    /// Row `i`.
    fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.k / blocks::QK;
        Q8Row {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            s: &self.s[i * nb..(i + 1) * nb],
        }
    }
}

impl Q8KRows {
    /// Row `i`.
    fn row(&self, i: usize) -> Q8KRow<'_> {
        let nb = self.k / blocks::QK_K;
        Q8KRow {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            bsums: &self.bsums[i * nb * 16..(i + 1) * nb * 16],
        }
    }
}

/// Activation rows one kernel call takes: each weight block is decoded once for all of them.
const GROUP: usize = 4;

/// Asserts that every row of `a` (1 to [`GROUP`]) holds as many blocks, that `w` holds whole
/// weight rows of `t` blocks of that count, and that `out` has room for `R` values at
/// `j·stride` for every weight row `j`; returns the bytes per weight row.
fn check_rows(t: QuantType, w: &[u8], a: &[Q8Row<'_>], out: &[f32], stride: usize) -> usize {
    let nb = a.first().map_or(0, |r| r.qs.len() / blocks::QK);
    for r in a {
        assert!(
            r.qs.len() == nb * blocks::QK && r.d.len() == nb && r.s.len() == nb,
            "quantized dot: activation rows of different lengths"
        );
    }
    check_out(t, nb, w, a.len(), out, stride)
}

/// [`check_rows`] for the K-quants.
fn check_rows_k(t: QuantType, w: &[u8], a: &[Q8KRow<'_>], out: &[f32], stride: usize) -> usize {
    let nb = a.first().map_or(0, |r| r.qs.len() / blocks::QK_K);
    for r in a {
        assert!(
            r.qs.len() == nb * blocks::QK_K && r.d.len() == nb && r.bsums.len() == nb * 16,
            "quantized dot: activation rows of different lengths"
        );
    }
    check_out(t, nb, w, a.len(), out, stride)
}

/// The sizes [`check_rows`] asserts besides the activation rows'.
fn check_out(t: QuantType, nb: usize, w: &[u8], r: usize, out: &[f32], stride: usize) -> usize {
    let row_bytes = nb * t.block_bytes();
    assert!((1..=GROUP).contains(&r), "quantized dot: {r} activation rows at once");
    assert!(
        row_bytes > 0 && w.len().is_multiple_of(row_bytes),
        "quantized dot: {} bytes are not whole {t:?} rows of {nb} blocks",
        w.len()
    );
    let rows = w.len() / row_bytes;
    assert!(stride >= r, "quantized dot: stride {stride} for {r} values");
    assert!(
        rows == 0 || out.len() >= (rows - 1) * stride + r,
        "quantized dot: no room for {rows} rows of {r} values"
    );
    row_bytes
}

/// Weight rows (their blocks, row after row) dotted with 1 to [`GROUP`] quantized activation
/// rows: `f(w, a, out, stride)` writes row `j`'s values at `out[j·stride..][..a.len()]`.
#[derive(Clone, Copy)]
enum Dot {
    /// A 32-value type against Q8_0/Q8_1 activations.
    Q8(unsafe fn(&[u8], &[Q8Row<'_>], &mut [f32], usize)),
    /// A K-quant against Q8_K activations.
    Q8K(unsafe fn(&[u8], &[Q8KRow<'_>], &mut [f32], usize)),
}

/// The kernel of `t` in the family `isa` (which this CPU runs: checked by the caller).
fn dot_kernel(t: QuantType, isa: Isa) -> Dot {
    use QuantType as T;
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Vnni => {
            return match t {
                T::Q4_0 => Dot::Q8(avx512::q4_0),
                T::Q4_1 => Dot::Q8(avx512::q4_1),
                T::Q8_0 => Dot::Q8(avx512::q8_0),
                T::Q4K => Dot::Q8K(avx512::q4_k),
                T::Q5K => Dot::Q8K(avx512::q5_k),
                T::Q6K => Dot::Q8K(avx512::q6_k),
            }
        }
        Isa::Avx2 => {
            return match t {
                T::Q4_0 => Dot::Q8(avx2::q4_0),
                T::Q4_1 => Dot::Q8(avx2::q4_1),
                T::Q8_0 => Dot::Q8(avx2::q8_0),
                T::Q4K => Dot::Q8K(avx2::q4_k),
                T::Q5K => Dot::Q8K(avx2::q5_k),
                T::Q6K => Dot::Q8K(avx2::q6_k),
            }
        }
        Isa::Portable => {}
    }
    let _ = isa;
    match t {
        T::Q4_0 => Dot::Q8(scalar::q4_0),
        T::Q4_1 => Dot::Q8(scalar::q4_1),
        T::Q8_0 => Dot::Q8(scalar::q8_0),
        T::Q4K => Dot::Q8K(scalar::q4_k),
        T::Q5K => Dot::Q8K(scalar::q5_k),
        T::Q6K => Dot::Q8K(scalar::q6_k),
    }
}

/// Rows of a weight `[rows, cols]` in one GGML block type: row `r` is
/// `bytes[r·row_bytes..(r + 1)·row_bytes]`, `cols / block_values` blocks.
#[derive(Debug, Clone, Copy)]
pub struct QuantRows<'a> {
    /// The block type.
    pub dtype: QuantType,
    /// Rows (output features).
    pub rows: usize,
    /// Values per row (input features, a whole number of blocks).
    pub cols: usize,
    /// The blocks, row after row, as GGUF stores them.
    pub bytes: &'a [u8],
}

impl<'a> QuantRows<'a> {
    /// Rows over `bytes`; panics where the sizes do not fit the type.
    pub fn new(dtype: QuantType, rows: usize, cols: usize, bytes: &'a [u8]) -> Self {
        assert!(
            cols.is_multiple_of(dtype.block_values()),
            "rows of {cols} values do not split into {dtype:?} blocks"
        );
        assert_eq!(
            bytes.len(),
            rows * cols / dtype.block_values() * dtype.block_bytes(),
            "{dtype:?}: the bytes are not [{rows}, {cols}]"
        );
        QuantRows {
            dtype,
            rows,
            cols,
            bytes,
        }
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_values() * self.dtype.block_bytes()
    }
}

/// Products smaller than this (weight values × rows) run on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// `out (+)= x · Wᵀ` for `x: [m, k]` and `out: [m, n]`, the weight `W: [n, k]` being `parts`
/// stacked by rows (each `cols == k`), with the fastest kernels this CPU runs.
pub fn matmul_wt(parts: &[QuantRows<'_>], x: &[f32], out: &mut [f32], m: usize, accumulate: bool) {
    matmul_wt_with(Isa::best(), parts, x, out, m, accumulate)
}

/// [`matmul_wt`] with the kernels `isa` (which must be [`Isa::available`]).
pub fn matmul_wt_with(isa: Isa, parts: &[QuantRows<'_>], x: &[f32], out: &mut [f32], m: usize, accumulate: bool) {
    assert!(isa.available(), "this CPU does not run the {isa:?} kernels");
    let k = parts.first().map_or(0, |p| p.cols);
    let n: usize = parts.iter().map(|p| p.rows).sum();
    assert!(parts.iter().all(|p| p.cols == k), "stacked parts of different widths");
    assert_eq!(x.len(), m * k, "quantized matmul: x is not [m, k]");
    assert_eq!(out.len(), m * n, "quantized matmul: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let q8 = parts.iter().any(|p| !p.dtype.is_k()).then(|| Q8Rows::quantize(x, k));
    let q8k = parts.iter().any(|p| p.dtype.is_k()).then(|| Q8KRows::quantize(x, k));
    let kernels: Vec<Dot> = parts.iter().map(|p| dot_kernel(p.dtype, isa)).collect();
    let rows8: Vec<Q8Row<'_>> = q8.as_ref().map_or(Vec::new(), |q| (0..m).map(|i| q.row(i)).collect());
    let rows8k: Vec<Q8KRow<'_>> = q8k.as_ref().map_or(Vec::new(), |q| (0..m).map(|i| q.row(i)).collect());
    // out_t[j·m + i] = W[j] · x[i] for the rows j0.. of one task
    let rows_of = |j0: usize, dst: &mut [f32]| {
        let j1 = j0 + dst.len() / m;
        let mut start = 0;
        for (p, kernel) in parts.iter().zip(&kernels) {
            let (a, b) = (j0.max(start), j1.min(start + p.rows));
            if a < b {
                let rb = p.row_bytes();
                let w = &p.bytes[(a - start) * rb..(b - start) * rb];
                let out = &mut dst[(a - j0) * m..(b - j0) * m];
                for g in (0..m).step_by(GROUP) {
                    let rows = g..(g + GROUP).min(m);
                    // SAFETY: `dot_kernel` gave kernels of the family `isa`, which this CPU runs
                    // (asserted above); the kernels check their slices' sizes.
                    unsafe {
                        match *kernel {
                            Dot::Q8(f) => f(w, &rows8[rows], &mut out[g..], m),
                            Dot::Q8K(f) => f(w, &rows8k[rows], &mut out[g..], m),
                        }
                    }
                }
            }
            start += p.rows;
        }
    };
    let threads = if n * k * m < PARALLEL_MIN {
        1
    } else {
        rayon::current_num_threads()
    };
    // about eight tasks per thread, for balance when a core is busy elsewhere
    let per_task = n.div_ceil(8 * threads).max(8);
    let run = |dst: &mut [f32]| {
        if threads == 1 {
            rows_of(0, dst);
        } else {
            dst.par_chunks_mut(per_task * m)
                .enumerate()
                .for_each(|(t, chunk)| rows_of(t * per_task, chunk));
        }
    };
    if m == 1 && !accumulate {
        run(out);
        return;
    }
    let mut by_row = vec![0f32; n * m];
    run(&mut by_row);
    for (j, col) in by_row.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let o = &mut out[i * n + j];
            *o = if accumulate { *o + v } else { v };
        }
    }
}
