//! What the fused CPU paths of every architecture share: reading f32 tensors into plain
//! vectors, and the packed-batch bookkeeping (which padded position each real token came from).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// Whether a model on `device` with weights of `dtype` runs the fused f32 CPU kernels
/// (otherwise it runs the composed candle version: CUDA, f64 in the gradient tests).
pub fn applies(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32 && std::env::var_os("SOFTPROMPT_COMPOSED").is_none()
}

/// The elements of a tensor as a flat f32 vector (row-major).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// A batch `[B, T]` of which only the real positions are computed, packed one row after another.
///
/// When every row starts with the same positions (same input embeddings, all real: a prepended
/// soft prompt and the template text after it), those positions are computed once: they are the
/// first `shared` packed positions, standing for column `i` of **every** row, and their keys and
/// values are handed to every row's attention. Their outputs are copied to every row; the
/// gradient flowing into them is the sum over rows.
pub struct Packed {
    /// Batch rows.
    pub rows: usize,
    /// Positions per row (padded layout).
    pub cols: usize,
    /// `[N]` batch row of each packed position (row 0 for the shared ones).
    pub row: Vec<usize>,
    /// `[N]` column of each packed position in the padded layout.
    pub col: Vec<usize>,
    /// Leading packed positions shared by every row.
    pub shared: usize,
    /// `[B·T]` whether each padded position is real.
    pub real: Vec<bool>,
}

impl Packed {
    /// From a `[B, T]` mask (1 = real; u32 or float). With `embeds` (`[B, T, D]`) the prefix
    /// common to all rows is found and shared.
    pub fn new(mask: &Tensor, embeds: Option<&Tensor>) -> Result<Self> {
        let (rows, cols) = mask.dims2()?;
        let real: Vec<bool> = to_vec(mask)?.iter().map(|&v| v != 0.0).collect();
        let shared = match embeds {
            Some(e) if rows > 1 => common_prefix(&real, e)?,
            _ => 0,
        };
        let (mut row, mut col): (Vec<usize>, Vec<usize>) = ((0..shared).map(|_| 0).collect(), (0..shared).collect());
        for (i, _) in real.iter().enumerate().filter(|(i, r)| **r && i % cols >= shared) {
            row.push(i / cols);
            col.push(i % cols);
        }
        Ok(Self {
            rows,
            cols,
            row,
            col,
            shared,
            real,
        })
    }

    /// Number of packed positions.
    pub fn len(&self) -> usize {
        self.row.len()
    }

    /// Whether there is no real position.
    pub fn is_empty(&self) -> bool {
        self.row.is_empty()
    }

    /// The packed position of column `col` of batch row `row` (a shared one for every row);
    /// an error if that position is padding or outside the batch.
    pub fn index_of(&self, row: usize, col: usize) -> Result<usize> {
        if row < self.rows && col < self.shared {
            return Ok(col);
        }
        let found = (self.shared..self.len()).find(|&i| self.row[i] == row && self.col[i] == col);
        found.with_context(|| {
            format!(
                "position {col} of row {row} is padding or outside the batch [{}, {}]",
                self.rows, self.cols
            )
        })
    }

    /// The padded-layout rows `b·T + t` a packed position stands for.
    pub fn targets(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let copies = if i < self.shared { self.rows } else { 1 };
        (0..copies).map(move |c| {
            let r = if i < self.shared { c } else { self.row[i] };
            r * self.cols + self.col[i]
        })
    }

    fn check(&self, x: &Tensor) -> Result<usize> {
        let (b, t, c) = x.dims3()?;
        if (b, t) != (self.rows, self.cols) {
            bail!(
                "tensor of shape {:?} does not match the batch [{}, {}]",
                x.dims(),
                self.rows,
                self.cols
            );
        }
        Ok(c)
    }

    /// `[B, T, C]` → `[N, C]`: each packed position's values (shared ones read from row 0).
    pub fn pack(&self, x: &Tensor) -> Result<Vec<f32>> {
        let c = self.check(x)?;
        let flat = to_vec(x)?;
        let mut out = Vec::with_capacity(self.len() * c);
        for (r, t) in self.row.iter().zip(&self.col) {
            let at = (r * self.cols + t) * c;
            out.extend_from_slice(&flat[at..at + c]);
        }
        Ok(out)
    }

    /// `[B, T, C]` gradients → `[N, C]`: a shared position receives the sum over the rows.
    pub fn pack_sum(&self, x: &Tensor) -> Result<Vec<f32>> {
        let c = self.check(x)?;
        let flat = to_vec(x)?;
        let mut out = vec![0f32; self.len() * c];
        for (i, o) in out.chunks_mut(c.max(1)).enumerate() {
            for at in self.targets(i) {
                for (o, v) in o.iter_mut().zip(&flat[at * c..(at + 1) * c]) {
                    *o += v;
                }
            }
        }
        Ok(out)
    }

    /// `[N, C]` → `[B, T, C]` with zeros at padding. With `broadcast` a shared position is
    /// written to every row (outputs); without, only to row 0 (the gradient of shared inputs,
    /// whose sum over rows is then exact).
    pub fn unpack(&self, x: &[f32], broadcast: bool, device: &Device) -> Result<Tensor> {
        let c = x.len() / self.len().max(1);
        let mut full = vec![0f32; self.rows * self.cols * c];
        for i in 0..self.len() {
            for at in self.targets(i).take(if broadcast { usize::MAX } else { 1 }) {
                full[at * c..(at + 1) * c].copy_from_slice(&x[i * c..(i + 1) * c]);
            }
        }
        Ok(Tensor::from_vec(full, (self.rows, self.cols, c), device)?)
    }
}

/// Length of the prefix that is real and bit-identical in every row of `embeds` `[B, T, D]`.
fn common_prefix(real: &[bool], embeds: &Tensor) -> Result<usize> {
    let (b, t, d) = embeds.dims3()?;
    let flat = to_vec(embeds)?;
    let row = |r: usize, p: usize| &flat[(r * t + p) * d..(r * t + p + 1) * d];
    let same = |p: usize| (0..b).all(|r| real[r * t + p] && row(r, p) == row(0, p));
    Ok((0..t).take_while(|&p| same(p)).count())
}

/// Writes cached keys or values `cache` (`[R, H, past, hd]`; `R` is `rows`, or 1 for a prefix
/// every row shares) into the first `past` key slots of every row of `slots`
/// (`[rows·keys, H·hd]`).
pub fn fill_past_slots(cache: &Tensor, slots: &mut [f32], rows: usize, keys: usize) -> Result<()> {
    let (r, heads, past, hd) = cache.dims4()?;
    if (r != 1 && r != rows) || past > keys || slots.len() != rows * keys * heads * hd {
        bail!(
            "cached keys/values of shape {:?} do not fit a batch of {rows} rows and {keys} key slots",
            cache.dims()
        );
    }
    let src = to_vec(cache)?;
    let width = heads * hd;
    for b in 0..rows {
        let from_row = if r == 1 { 0 } else { b };
        for h in 0..heads {
            for j in 0..past {
                let from = ((from_row * heads + h) * past + j) * hd;
                let to = (b * keys + j) * width + h * hd;
                slots[to..to + hd].copy_from_slice(&src[from..from + hd]);
            }
        }
    }
    Ok(())
}

/// The gradient of the first `past` key slots of `slots` (`[rows·keys, H·hd]`) summed over the
/// rows, laid out `[H, past, hd]`: a shared prefix's gradient.
pub fn sum_past_slots(slots: &[f32], rows: usize, keys: usize, past: usize, heads: usize, hd: usize) -> Vec<f32> {
    let width = heads * hd;
    let mut out = vec![0f32; heads * past * hd];
    for b in 0..rows {
        for j in 0..past {
            let src = &slots[(b * keys + j) * width..(b * keys + j + 1) * width];
            for h in 0..heads {
                let dst = &mut out[(h * past + j) * hd..(h * past + j + 1) * hd];
                for (o, s) in dst.iter_mut().zip(&src[h * hd..(h + 1) * hd]) {
                    *o += s;
                }
            }
        }
    }
    out
}
