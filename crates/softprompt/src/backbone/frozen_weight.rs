//! A frozen linear weight `[out, in]` for the fused kernels: f32 packed into panels at load
//! (the fastest products), or the rows as the model file stores them (GGUF quantized blocks,
//! f16, bf16), converted to f32 tile by tile inside each product. Only the two products a
//! frozen layer needs exist: the forward `x · Wᵀ` and the input gradient `dy · W`.
//!
//! Generation on quantized blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) multiplies them as
//! llama.cpp does instead, over at most [`QUANT_ROWS`] positions at a time (decode steps,
//! batched or not; prompt chunks up to that length): the activations quantized to 8 bits per
//! block, integer dot products (`softprompt_kernels::quant`), reading 4.5–8.5 bits per weight
//! once per step. Generation runs inside [`rounding_scope`]`(`[`Rounding::Inference`]`, …)`
//! (opened by `infer::engine` and `infer::generate`; [`forward_on_pool`] carries it to the
//! thread that runs the forward); training, scoring and every input gradient read the weights'
//! exact values.

use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0,
    GgmlType,
};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use softprompt_kernels::matmul;
use softprompt_kernels::packed::PackedWeight;
use softprompt_kernels::quant::{self, QuantRows, QuantType};
use std::cell::Cell;

/// Generation's products over at most this many rows (positions) use the quantized kernels;
/// longer ones (long prompts) convert the blocks to f32 tiles for the blocked product, which
/// is faster from about here on: SmolLM2-135M Q4_1 on 2 cores, a forward over 96 positions
/// 272 tokens/s quantized vs 232 by tiles, over 192 positions 251 vs 331.
pub const QUANT_ROWS: usize = 128;

/// How a forward product on stored weights may round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// The product of the weights' own values (training, scoring).
    Exact,
    /// Generation: quantized weights multiply 8-bit activations in integers over at most
    /// [`QUANT_ROWS`] rows, as llama.cpp does.
    Inference,
}

thread_local! {
    /// The rounding of the products on this thread.
    static ROUNDING: Cell<Rounding> = const { Cell::new(Rounding::Exact) };
}

/// The rounding of the products on this thread ([`Rounding::Exact`] outside any
/// [`rounding_scope`]).
pub fn rounding() -> Rounding {
    ROUNDING.get()
}

/// Runs `f` with the products on this thread rounding as `rounding` says (restored afterwards,
/// also when `f` panics). Generation (`infer::engine`, `infer::generate`) runs its forwards and
/// logits inside [`Rounding::Inference`]; everything else is exact.
pub fn rounding_scope<R>(rounding: Rounding, f: impl FnOnce() -> R) -> R {
    struct Restore(Rounding);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROUNDING.set(self.0);
        }
    }
    let _restore = Restore(ROUNDING.replace(rounding));
    f()
}

/// Runs a model's forward `f` on a thread of rayon's pool, with this thread's rounding (exact
/// when `keep`: its tape feeds the exact input gradient). On the pool, the kernels' parallel
/// steps are shared with the other workers by work stealing; from any other thread each of
/// them (a norm of one row, a product) would be handed over to the pool and waited for, two
/// thread switches per step of a decode.
pub fn forward_on_pool<R: Send>(keep: bool, f: impl FnOnce() -> R + Send) -> R {
    let rounding = if keep { Rounding::Exact } else { rounding() };
    rayon::scope(|_| rounding_scope(rounding, f))
}

/// The kernels' name of a GGML type they multiply directly.
fn quant_type(dtype: GgmlDType) -> Option<QuantType> {
    Some(match dtype {
        GgmlDType::Q4_0 => QuantType::Q4_0,
        GgmlDType::Q4_1 => QuantType::Q4_1,
        GgmlDType::Q8_0 => QuantType::Q8_0,
        GgmlDType::Q4K => QuantType::Q4K,
        GgmlDType::Q5K => QuantType::Q5K,
        GgmlDType::Q6K => QuantType::Q6K,
        _ => return None,
    })
}

/// How the fused CPU path keeps the frozen weights of the linear layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum WeightStorage {
    /// Converted to f32 when the model loads (fastest; 4 bytes per weight).
    #[default]
    F32,
    /// As the file stores them (GGUF Q4_0/Q4_1/Q5_x/Q8_0/K-quants, f16, bf16), converted to f32
    /// tile by tile inside each product: the same numbers as `f32` in a fraction of the memory.
    /// Generation (decode steps, prompts up to 128 positions at a time) on Q4_0/Q4_1/Q8_0/
    /// Q4_K/Q5_K/Q6_K blocks runs llama.cpp's integer kernels instead (activations quantized to
    /// 8 bits per block; the vocabulary head too, as Q8_0): its numbers, several times faster.
    /// The embedding table, norms and biases stay f32.
    File,
    /// Converted to f16 at load (2 bytes per weight), whatever the file stores.
    F16,
    /// Converted to bf16 at load (2 bytes per weight), whatever the file stores.
    Bf16,
    /// Quantized to GGML Q8_0 at load (34 bytes per 32 weights), whatever the file stores;
    /// generation runs the integer kernels as with `file`.
    #[serde(rename = "q8_0")]
    #[cfg_attr(feature = "cli", value(name = "q8_0"))]
    Q8_0,
}

impl WeightStorage {
    /// The name configs and flags use (`f32`, `file`, `f16`, `bf16`, `q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            WeightStorage::F32 => "f32",
            WeightStorage::File => "file",
            WeightStorage::F16 => "f16",
            WeightStorage::Bf16 => "bf16",
            WeightStorage::Q8_0 => "q8_0",
        }
    }

    /// The type the weights are converted to at load (`None`: f32, or the file's own storage).
    pub fn converted_to(self) -> Option<GgmlDType> {
        match self {
            WeightStorage::F32 | WeightStorage::File => None,
            WeightStorage::F16 => Some(GgmlDType::F16),
            WeightStorage::Bf16 => Some(GgmlDType::BF16),
            WeightStorage::Q8_0 => Some(GgmlDType::Q8_0),
        }
    }
}

/// A linear weight `[out, in]` as loaded: a tensor (f32, or any dtype on any device for the
/// composed path), or rows in a file's storage (which only the fused kernels read).
pub enum Linear {
    /// A candle tensor.
    Tensor(candle_core::Tensor),
    /// Rows in GGML storage types, parts stacked by rows (see [`FrozenWeight::Stored`]).
    Stored(Vec<StoredRows>),
}

impl Linear {
    /// Whether every part is held in quantized blocks that the integer kernels multiply.
    pub fn quantized(&self) -> bool {
        match self {
            Linear::Tensor(_) => false,
            Linear::Stored(parts) => parts.iter().all(|p| quant_type(p.dtype).is_some()),
        }
    }

    /// The weight as a tensor; an error for rows kept in a file's storage.
    pub fn into_tensor(self) -> Result<candle_core::Tensor> {
        match self {
            Linear::Tensor(t) => Ok(t),
            Linear::Stored(parts) => bail!(
                "a weight kept in the file's storage ({:?}) runs only on the fused CPU kernels",
                parts.first().map(StoredRows::dtype)
            ),
        }
    }
}

/// A frozen `[rows, cols]` weight.
pub enum FrozenWeight {
    /// f32, packed into panels once (see `softprompt_kernels::packed`).
    F32(PackedWeight),
    /// Rows in the file's storage: parts stacked by rows (e.g. q, k and v, each in the type
    /// its file gives it).
    Stored(Vec<StoredRows>),
}

impl FrozenWeight {
    /// The f32 weight `w: [rows, cols]`, packed.
    pub fn f32(w: &candle_core::Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values = super::fused::to_vec(w)?;
        Ok(FrozenWeight::F32(PackedWeight::pack(&values, rows, cols)))
    }

    /// A loaded weight for the fused kernels: a tensor converted to f32 and packed, stored rows
    /// kept as they are.
    pub fn from_linear(w: Linear) -> Result<Self> {
        match w {
            Linear::Tensor(t) => Self::f32(&t),
            Linear::Stored(parts) => Ok(FrozenWeight::Stored(parts)),
        }
    }

    /// A vocabulary head `[vocab, D]` (f32) quantized to Q8_0 for decode's logits.
    pub fn quantized_head(head: &candle_core::Tensor) -> Result<Self> {
        Ok(FrozenWeight::Stored(vec![StoredRows::convert(head, GgmlDType::Q8_0)?]))
    }

    /// Logits `[m, vocab]` of hidden rows `[m, D]` through this head (`[vocab, D]`), rounding as
    /// this thread's products do.
    pub fn logits(&self, rows: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let (m, d) = rows.dims2()?;
        let vocab = match self {
            FrozenWeight::F32(w) => w.rows(),
            FrozenWeight::Stored(parts) => parts.iter().map(|p| p.rows).sum(),
        };
        let x = super::fused::to_vec(rows)?;
        let mut out = vec![0f32; m * vocab];
        self.matmul_wt(&x, &mut out, m, d, vocab, false);
        Ok(candle_core::Tensor::from_vec(out, (m, vocab), rows.device())?)
    }

    /// The parts as the integer kernels read them, if every part has such kernels.
    fn quant_parts(&self) -> Option<Vec<QuantRows<'_>>> {
        match self {
            FrozenWeight::F32(_) => None,
            FrozenWeight::Stored(parts) => parts.iter().map(StoredRows::quant_rows).collect(),
        }
    }

    /// Whether inference products may use the integer kernels (see [`QUANT_ROWS`]).
    pub fn quantized(&self) -> bool {
        self.quant_parts().is_some()
    }

    /// `out (+)= x · Wᵀ` with `x: [m, k]`, `W: [n, k]`, `out: [m, n]`; inside a
    /// [`Rounding::Inference`] scope with quantized blocks and `m ≤ QUANT_ROWS`, by the integer
    /// kernels.
    pub fn matmul_wt(&self, x: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
        if m <= QUANT_ROWS && ROUNDING.get() == Rounding::Inference {
            if let Some(parts) = self.quant_parts() {
                assert_eq!(
                    (parts.iter().map(|p| p.rows).sum::<usize>(), parts[0].cols),
                    (n, k),
                    "matmul_wt: the weight is not [n, k]"
                );
                return quant::matmul_wt(&parts, x, out, m, accumulate);
            }
        }
        match self {
            FrozenWeight::F32(w) => {
                assert_eq!((w.rows(), w.cols()), (n, k), "matmul_wt: the weight is not [n, k]");
                w.forward(x, out, m, accumulate)
            }
            FrozenWeight::Stored(s) => matmul::matmul_wt_by_rows(
                x,
                &|r0, r1, t: &mut [f32]| stack_rows_f32(s, r0, r1, t),
                out,
                m,
                k,
                n,
                accumulate,
            ),
        }
    }

    /// `out (+)= dy · W` with `dy: [m, k]`, `W: [k, n]`, `out: [m, n]` (the input gradient).
    pub fn matmul(&self, dy: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
        match self {
            FrozenWeight::F32(w) => {
                assert_eq!((w.rows(), w.cols()), (k, n), "matmul: the weight is not [k, n]");
                w.backward(dy, out, m, accumulate)
            }
            FrozenWeight::Stored(s) => matmul::matmul_by_rows(
                dy,
                &|r0, r1, t: &mut [f32]| stack_rows_f32(s, r0, r1, t),
                out,
                m,
                k,
                n,
                accumulate,
            ),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::F32(w) => w.bytes(),
            FrozenWeight::Stored(s) => s.iter().map(|p| p.blocks.bytes()).sum(),
        }
    }
}

/// Rows `r0..r1` of parts stacked by rows, as f32 into `out: [r1 - r0, cols]`, several rows at a
/// time in parallel.
fn stack_rows_f32(parts: &[StoredRows], r0: usize, r1: usize, out: &mut [f32]) {
    const ROWS_PER_TASK: usize = 8;
    let cols = out.len() / (r1 - r0).max(1);
    out.par_chunks_mut(ROWS_PER_TASK * cols)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut a = r0 + i * ROWS_PER_TASK;
            let b = (a + ROWS_PER_TASK).min(r1);
            let mut start = 0;
            for part in parts {
                let end = start + part.rows;
                if a < end && a < b {
                    let to = b.min(end);
                    let (head, _) = chunk[(a - r0 - i * ROWS_PER_TASK) * cols..].split_at_mut((to - a) * cols);
                    part.blocks.rows_f32(a - start, to - start, head);
                    a = to;
                }
                start = end;
            }
        });
}

/// Rows in a GGML storage type: every row a whole number of blocks.
pub struct StoredRows {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    blocks: Box<dyn BlockRows>,
}

impl StoredRows {
    /// Rows from their raw little-endian bytes in `dtype` (as in a GGUF file or, for f16/bf16/
    /// f32, a safetensors file): `rows · cols / block_size` blocks of `type_size` bytes.
    pub fn from_bytes(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Result<StoredRows> {
        check_blocks(dtype, cols)?;
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        let n_blocks = rows * cols / bs;
        if bytes.len() != n_blocks * ts {
            bail!(
                "{} bytes for a [{rows}, {cols}] {dtype:?} weight; expected {}",
                bytes.len(),
                n_blocks * ts
            );
        }
        let per_row = cols / bs;
        let blocks: Box<dyn BlockRows> = match dtype {
            GgmlDType::F32 => typed::<f32>(bytes, per_row),
            GgmlDType::F16 => typed::<half::f16>(bytes, per_row),
            GgmlDType::BF16 => typed::<half::bf16>(bytes, per_row),
            GgmlDType::Q4_0 => typed::<BlockQ4_0>(bytes, per_row),
            GgmlDType::Q4_1 => typed::<BlockQ4_1>(bytes, per_row),
            GgmlDType::Q5_0 => typed::<BlockQ5_0>(bytes, per_row),
            GgmlDType::Q5_1 => typed::<BlockQ5_1>(bytes, per_row),
            GgmlDType::Q8_0 => typed::<BlockQ8_0>(bytes, per_row),
            GgmlDType::Q2K => typed::<BlockQ2K>(bytes, per_row),
            GgmlDType::Q3K => typed::<BlockQ3K>(bytes, per_row),
            GgmlDType::Q4K => typed::<BlockQ4K>(bytes, per_row),
            GgmlDType::Q5K => typed::<BlockQ5K>(bytes, per_row),
            GgmlDType::Q6K => typed::<BlockQ6K>(bytes, per_row),
            GgmlDType::Q8K => typed::<BlockQ8K>(bytes, per_row),
            GgmlDType::Q8_1 => bail!("Q8_1 is an activation format, not a weight storage"),
        };
        Ok(StoredRows {
            dtype,
            rows,
            cols,
            blocks,
        })
    }

    /// The f32 matrix `w: [rows, cols]` converted to `dtype` (GGML's own quantization).
    /// Q8_0, f16 and bf16 (the conversions [`WeightStorage`] offers) run on every thread.
    pub fn convert(w: &candle_core::Tensor, dtype: GgmlDType) -> Result<StoredRows> {
        let (rows, cols) = w.dims2()?;
        check_blocks(dtype, cols)?;
        let per_row = cols / dtype.block_size();
        let values = || super::fused::to_vec(&w.to_dtype(candle_core::DType::F32)?);
        let blocks: Box<dyn BlockRows> = match dtype {
            GgmlDType::Q8_0 => quantized::<BlockQ8_0>(&values()?, per_row),
            GgmlDType::F16 => quantized::<half::f16>(&values()?, per_row),
            GgmlDType::BF16 => quantized::<half::bf16>(&values()?, per_row),
            _ => {
                let q = candle_core::quantized::QTensor::quantize(w, dtype)?;
                return Self::from_bytes(dtype, rows, cols, &q.data()?);
            }
        };
        Ok(StoredRows {
            dtype,
            rows,
            cols,
            blocks,
        })
    }

    /// The storage type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// The blocks as the integer kernels read them (`None` for types they do not multiply).
    fn quant_rows(&self) -> Option<QuantRows<'_>> {
        quant_type(self.dtype).map(|t| QuantRows::new(t, self.rows, self.cols, self.blocks.raw()))
    }
}

/// Refuses rows of `cols` values that do not split into whole `dtype` blocks.
fn check_blocks(dtype: GgmlDType, cols: usize) -> Result<()> {
    let bs = dtype.block_size();
    if !cols.is_multiple_of(bs) {
        bail!("rows of {cols} values do not split into {dtype:?} blocks of {bs}");
    }
    Ok(())
}

/// Raw bytes in a row-major `[rows, row_bytes]` layout with the rows reordered: row `r` of the
/// result is row `order[r]` of `bytes` (used to undo llama.cpp's q/k row permutation on stored
/// blocks, exactly as it is undone on f32 rows).
pub fn reorder_rows(bytes: &[u8], order: &[usize]) -> Vec<u8> {
    let row_bytes = bytes.len() / order.len().max(1);
    order
        .iter()
        .flat_map(|&r| &bytes[r * row_bytes..(r + 1) * row_bytes])
        .copied()
        .collect()
}

/// Blocks of one GGML type, converted to f32 by whole rows.
trait BlockRows: Send + Sync {
    /// Rows `r0..r1` into `out`.
    fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]);
    /// Bytes held.
    fn bytes(&self) -> usize;
    /// The blocks' bytes as the file stores them.
    fn raw(&self) -> &[u8];
}

/// Blocks of type `T`, `per_row` to a row.
struct Typed<T> {
    blocks: Vec<T>,
    per_row: usize,
}

impl<T: GgmlType> BlockRows for Typed<T> {
    fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        T::to_float(&self.blocks[r0 * self.per_row..r1 * self.per_row], out);
    }
    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<T>()
    }
    fn raw(&self) -> &[u8] {
        // SAFETY: GGML block types are plain `repr(C)` structs of integers and f16 without
        // padding (their size is GGML's `type_size`), so their memory is exactly the bytes
        // they were copied from; the slice covers the vector's `len` blocks.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.bytes()) }
    }
}

/// Row-major f32 `values` quantized to blocks of type `T` (`per_row` to a row) by GGML's own
/// quantization, rows spread over the threads.
fn quantized<T: GgmlType + 'static>(values: &[f32], per_row: usize) -> Box<dyn BlockRows> {
    const ROWS_PER_TASK: usize = 64;
    let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
    let (block_chunk, value_chunk) = (
        (ROWS_PER_TASK * per_row).max(1),
        (ROWS_PER_TASK * per_row * T::BLCK_SIZE).max(1),
    );
    blocks
        .par_chunks_mut(block_chunk)
        .zip(values.par_chunks(value_chunk))
        .for_each(|(b, v)| T::from_float(v, b));
    Box::new(Typed { blocks, per_row })
}

/// Copies raw bytes into a vector of blocks (the bytes need not be aligned for `T`).
fn typed<T: GgmlType + 'static>(bytes: &[u8], per_row: usize) -> Box<dyn BlockRows> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut blocks = vec![T::zeros(); n];
    // SAFETY: GGML block types are plain `repr(C)` structs of integers and f16 (every bit
    // pattern is a valid value) of exactly `type_size` bytes; `blocks` holds n of them, i.e.
    // `bytes.len()` bytes (checked by the caller), and the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            blocks.as_mut_ptr().cast::<u8>(),
            n * std::mem::size_of::<T>(),
        );
    }
    Box::new(Typed { blocks, per_row })
}

#[cfg(test)]
mod tests;
