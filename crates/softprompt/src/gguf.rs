//! A bounds-checked reader for GGUF model files (metadata, tensor directory, tensor data).
//!
//! Every length read from the file is checked against the bytes that remain, so a truncated or
//! corrupted file gives an error naming the file and the problem instead of a panic or a huge
//! allocation. Dequantization of the tensor blocks is delegated to candle's ggml kernels.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned integer of any width.
    U64(u64),
    /// Signed integer of any width.
    I64(i64),
    /// Floating point number of any width.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

/// Where a tensor lives in the file and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Shape in PyTorch order (outermost first), i.e. GGUF's dimensions reversed.
    pub shape: Vec<usize>,
    /// Storage type of the blocks.
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Size of the data in bytes.
    pub size: usize,
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    /// Key → value metadata.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor name → location.
    pub tensors: BTreeMap<String, TensorEntry>,
    mmap: memmap2::Mmap,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "truncated: needs {n} more bytes for {what} at byte {} but the file has {}",
                self.pos,
                self.bytes.len()
            ),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into()?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into()?))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            bail!("truncated or corrupted: {what} claims length {n} but only {remaining} bytes remain");
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow!("corrupted: {what} is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let what = format!("metadata value of `{key}`");
        Ok(match ty {
            0 => MetaValue::U64(self.take(1, &what)?[0] as u64),
            1 => MetaValue::I64(self.take(1, &what)?[0] as i8 as i64),
            2 => MetaValue::U64(u16::from_le_bytes(self.take(2, &what)?.try_into()?) as u64),
            3 => MetaValue::I64(i16::from_le_bytes(self.take(2, &what)?.try_into()?) as i64),
            4 => MetaValue::U64(self.u32(&what)? as u64),
            5 => MetaValue::I64(self.u32(&what)? as i32 as i64),
            6 => MetaValue::F64(f32::from_bits(self.u32(&what)?) as f64),
            7 => MetaValue::Bool(self.take(1, &what)?[0] != 0),
            8 => MetaValue::Str(self.string(&what)?),
            9 => {
                if depth > 4 {
                    bail!("corrupted: arrays nested too deeply in `{key}`");
                }
                let elem_ty = self.u32(&what)?;
                let n = self.len(&what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(&what)?),
            11 => MetaValue::I64(self.u64(&what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(&what)?)),
            other => bail!("corrupted: unknown metadata type {other} for `{key}`"),
        })
    }
}

/// Maps GGUF's numeric tensor type to candle's; unknown types are an error naming the tensor.
fn ggml_dtype(code: u32, tensor: &str) -> Result<GgmlDType> {
    Ok(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        other => bail!("tensor `{tensor}` has quantization type {other}, which softprompt does not support (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K)"),
    })
}

impl GgufFile {
    /// Opens and parses a GGUF file; the error names the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path).with_context(|| format!("cannot read GGUF file {}", path.display()))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the file is opened read-only; softprompt never writes model files.
        let mmap = unsafe { memmap2::Mmap::map(&file)? };
        let mut c = Cursor { bytes: &mmap, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            bail!("not a GGUF file (magic bytes {magic:?})");
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (supported: 2, 3)");
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > mmap.len() as u64 || n_kv > mmap.len() as u64 {
            bail!("corrupted: header claims {n_tensors} tensors and {n_kv} metadata entries");
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(MetaValue::U64(a)) if *a > 0 => *a as usize,
            _ => 32,
        };
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor rank")? as usize;
            if n_dims > 4 {
                bail!("corrupted: tensor `{name}` has rank {n_dims}");
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")? as usize);
            }
            let dtype = ggml_dtype(c.u32("tensor type")?, &name)?;
            let rel = c.u64("tensor offset")? as usize;
            dims.reverse();
            infos.push((name, dims, dtype, rel));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, dtype, rel) in infos {
            let elems = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| anyhow!("corrupted: tensor `{name}` shape {shape:?} overflows"))?;
            if elems % dtype.block_size() != 0 {
                bail!("corrupted: tensor `{name}` has {elems} elements, not a multiple of the {dtype:?} block size");
            }
            let size = elems / dtype.block_size() * dtype.type_size();
            let offset = data_start
                .checked_add(rel)
                .ok_or_else(|| anyhow!("corrupted: tensor `{name}` offset overflows"))?;
            if offset.checked_add(size).is_none_or(|e| e > mmap.len()) {
                bail!(
                    "truncated: tensor `{name}` needs bytes {offset}..{} but the file has {} bytes",
                    offset.saturating_add(size),
                    mmap.len()
                );
            }
            tensors.insert(
                name,
                TensorEntry {
                    shape,
                    dtype,
                    offset,
                    size,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            mmap,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn get(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: metadata key `{key}` is missing", self.path.display()))
    }

    /// Metadata as an unsigned integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        match self.get(key)? {
            MetaValue::U64(v) => Ok(*v as usize),
            MetaValue::I64(v) if *v >= 0 => Ok(*v as usize),
            v => bail!(
                "{}: metadata `{key}` should be an unsigned integer, found {v:?}",
                self.path.display()
            ),
        }
    }

    /// Metadata as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            MetaValue::F64(v) => Ok(*v),
            MetaValue::U64(v) => Ok(*v as f64),
            MetaValue::I64(v) => Ok(*v as f64),
            v => bail!(
                "{}: metadata `{key}` should be a number, found {v:?}",
                self.path.display()
            ),
        }
    }

    /// Metadata as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            MetaValue::Str(s) => Ok(s),
            v => bail!(
                "{}: metadata `{key}` should be a string, found {v:?}",
                self.path.display()
            ),
        }
    }

    /// Metadata as a boolean, or `default` when absent.
    pub fn get_bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.metadata.get(key) {
            None => Ok(default),
            Some(MetaValue::Bool(b)) => Ok(*b),
            Some(v) => bail!(
                "{}: metadata `{key}` should be a boolean, found {v:?}",
                self.path.display()
            ),
        }
    }

    /// Metadata as an array (any element type).
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        match self.get(key)? {
            MetaValue::Array(a) => Ok(a),
            v => bail!(
                "{}: metadata `{key}` should be an array, found {}",
                self.path.display(),
                short(v)
            ),
        }
    }

    /// Metadata as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetaValue::Str(s) => Ok(s.as_str()),
                _ => bail!("{}: metadata `{key}`[{i}] should be a string", self.path.display()),
            })
            .collect()
    }

    /// The raw bytes of a tensor's data (bounds were checked when the file was opened).
    pub fn raw_bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.mmap[e.offset..e.offset + e.size]
    }

    /// Reads one tensor, dequantized to f32 on `device`, in PyTorch dimension order.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))?;
        let q = qtensor_from_ggml(e.dtype, self.raw_bytes(e), e.shape.clone(), device)
            .with_context(|| format!("{}: cannot read tensor `{name}`", self.path.display()))?;
        let t = q
            .dequantize(device)
            .with_context(|| format!("{}: cannot dequantize tensor `{name}`", self.path.display()))?;
        Ok(t.to_dtype(candle_core::DType::F32)?)
    }
}

fn short(v: &MetaValue) -> String {
    let s = format!("{v:?}");
    if s.len() > 60 {
        format!("{}…", &s[..60])
    } else {
        s
    }
}
