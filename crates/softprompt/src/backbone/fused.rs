//! What the fused CPU paths of every architecture share: reading f32 tensors into plain
//! vectors, the packed-batch bookkeeping (which padded position each real token came from), and
//! for causal models the [`Geometry`] of queries and key slots (K/V prefixes and caches included).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use softprompt_kernels::AttentionLayout;

use super::{KvCache, Shape};

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

/// Where the queries and key slots of one fused call sit: every packed position's batch row,
/// key slot and rotary position, and which key slots are real. Shared by the fused stacks of
/// every causal family.
pub struct Geometry {
    /// Cached key slots per row before the new ones (a generation cache or a K/V prefix).
    pub past: usize,
    /// Key slots per row (cached + new).
    pub keys: usize,
    /// Packed positions whose keys and values every row sees (the shared prefix).
    pub shared: usize,
    /// Batch rows.
    pub rows: usize,
    /// `[rows·keys]` whether each key slot holds a real position.
    pub key_mask: Vec<bool>,
    /// `[N]` batch row of each query.
    pub query_row: Vec<usize>,
    /// `[N]` key slot of each query (its causal limit).
    pub query_key: Vec<usize>,
    /// `[N]` rotary position of each query: its key slot, unless the cache gives its row its
    /// own position (rows of different lengths padded to one number of slots).
    pub query_pos: Vec<usize>,
    /// `[B]` rotary position of each row's first new column.
    pub base: Option<Vec<usize>>,
}

impl Geometry {
    /// The geometry of the packed batch `packed` after `past` cached slots (their key mask in
    /// `cache`), each row's first new position in `base` when the cache gives rows their own;
    /// refuses a sequence longer than `max_positions`.
    pub fn new(
        packed: &Packed,
        past: usize,
        cache: Option<&KvCache>,
        base: Option<Vec<usize>>,
        max_positions: usize,
    ) -> Result<Self> {
        let keys = past + packed.cols;
        let mut key_mask = vec![false; packed.rows * keys];
        if let Some(m) = cache.and_then(|c| c.mask.as_ref()) {
            // One cached row is every row's (a shared prefix).
            let (cached_rows, slots) = m.dims2()?;
            if slots != past || (cached_rows != packed.rows && cached_rows != 1) {
                bail!(
                    "the key/value cache holds {:?} rows, the batch {}",
                    m.dims(),
                    packed.rows
                );
            }
            let cached = to_vec(m)?;
            for b in 0..packed.rows {
                let from = if cached_rows == 1 { 0 } else { b };
                for j in 0..past {
                    key_mask[b * keys + j] = cached[from * past + j] != 0.0;
                }
            }
        }
        // A shared position appears in every row; its slot in rows other than 0 is real too.
        for (i, &r) in packed.real.iter().enumerate() {
            key_mask[(i / packed.cols) * keys + past + i % packed.cols] = r;
        }
        if let Some(b) = &base {
            if b.len() != packed.rows {
                bail!(
                    "the key/value cache gives positions for {} rows, the batch has {}",
                    b.len(),
                    packed.rows
                );
            }
            if packed.shared != 0 {
                bail!("rows with their own positions cannot share a prefix");
            }
        }
        let longest = base.as_ref().map_or(past, |b| b.iter().copied().max().unwrap_or(0)) + packed.cols;
        if keys > max_positions || longest > max_positions {
            bail!(
                "sequence of {} positions exceeds the model's context of {max_positions}",
                keys.max(longest)
            );
        }
        let query_key: Vec<usize> = packed.col.iter().map(|c| past + c).collect();
        let query_pos = match &base {
            Some(b) => packed.row.iter().zip(&packed.col).map(|(&r, c)| b[r] + c).collect(),
            None => query_key.clone(),
        };
        Ok(Geometry {
            past,
            keys,
            shared: packed.shared,
            rows: packed.rows,
            key_mask,
            query_row: packed.row.clone(),
            query_key,
            query_pos,
            base,
        })
    }

    /// The attention layout of these queries for heads of `shape` (causal).
    pub fn layout(&self, shape: &Shape) -> AttentionLayout<'_> {
        AttentionLayout {
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            keys: self.keys,
            key_mask: &self.key_mask,
            query_row: &self.query_row,
            query_key: &self.query_key,
            causal: true,
        }
    }

    /// The key slots that hold packed position `i`'s key and value (one per row when shared).
    pub fn slots(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let rows = if i < self.shared {
            0..self.rows
        } else {
            self.query_row[i]..self.query_row[i] + 1
        };
        rows.map(move |r| r * self.keys + self.query_key[i])
    }

    /// The rotary position of key slot `j` of batch row `row`: a cached slot's index, a new
    /// slot's row base plus its column.
    pub fn key_pos(&self, row: usize, j: usize) -> usize {
        if j < self.past {
            j
        } else {
            self.base.as_ref().map_or(self.past, |b| b[row]) + (j - self.past)
        }
    }

    /// Per layer (`layers` of them), the key and value slots `[B·S, kv_dim]` with the cached
    /// positions of `cache` filled in.
    pub fn past_slots(
        &self,
        layers: usize,
        kv_dim: usize,
        cache: Option<&KvCache>,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let size = self.rows * self.keys * kv_dim;
        let mut slots = Vec::with_capacity(layers);
        for l in 0..layers {
            let (mut k, mut v) = (vec![0f32; size], vec![0f32; size]);
            if let Some((pk, pv)) = cache.and_then(|c| c.layers.get(l)) {
                fill_past_slots(pk, &mut k, self.rows, self.keys)?;
                fill_past_slots(pv, &mut v, self.rows, self.keys)?;
            }
            slots.push((k, v));
        }
        Ok(slots)
    }

    /// Replaces the keys and values of `cache` by the slots `kv` (per layer `[B·S, kv_dim]`,
    /// heads of `shape`), with their key mask and each row's next position.
    pub fn store_cache(
        &self,
        cache: &mut KvCache,
        shape: &Shape,
        kv: Vec<(Vec<f32>, Vec<f32>)>,
        device: &Device,
    ) -> Result<()> {
        let dims = (self.rows, self.keys, shape.kv_heads, shape.head_dim);
        let as_cache = |slots: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(slots, dims, device)?.transpose(1, 2)?.contiguous()?)
        };
        cache.layers = kv
            .into_iter()
            .map(|(k, v)| Ok((as_cache(k)?, as_cache(v)?)))
            .collect::<Result<_>>()?;
        let mask: Vec<f32> = self.key_mask.iter().map(|&m| f32::from(u8::from(m))).collect();
        cache.mask = Some(Tensor::from_vec(mask, (self.rows, self.keys), device)?);
        let cols = self.keys - self.past;
        cache.next_pos = self.base.as_ref().map(|b| b.iter().map(|p| p + cols).collect());
        Ok(())
    }
}
