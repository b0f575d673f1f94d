//! Where a backbone's frozen weights come from: GGUF files or (possibly sharded) safetensors.
//! Every tensor is returned as f32; f16/bf16/quantized storage is converted on load.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::gguf::GgufFile;

/// A named collection of weight tensors.
pub trait WeightSource {
    /// The tensor `name` as f32 on `device`; an error names the file and the tensor.
    fn tensor(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Count of tensors per storage type, e.g. `{"F32": 61, "Q4_1": 210}`.
    fn dtype_counts(&self) -> BTreeMap<String, usize>;
    /// The file or directory, for messages.
    fn location(&self) -> &Path;

    /// Loads `name` and checks it has `shape`.
    fn tensor_shaped(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.tensor(name, device)?;
        if t.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?} from the model's configuration",
                self.location().display(),
                t.dims()
            );
        }
        Ok(t)
    }

    /// The tensor `name` as the file stores it: its GGML storage type and raw little-endian
    /// bytes, row-major in PyTorch order (for weights kept in the file's storage). Sources that
    /// hold other types give f32.
    fn stored(&self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Cow<'_, [u8]>)> {
        f32_bytes(self, name, shape)
    }
}

/// The tensor `name` as f32 little-endian bytes (for sources that hold no other storage).
fn f32_bytes<'s>(
    source: &(impl WeightSource + ?Sized),
    name: &str,
    shape: &[usize],
) -> Result<(GgmlDType, Cow<'s, [u8]>)> {
    let t = source.tensor_shaped(name, shape, &Device::Cpu)?;
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok((
        GgmlDType::F32,
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    ))
}

/// Refuses a stored tensor whose shape is not the configuration's.
fn check_shape(source: &dyn WeightSource, name: &str, found: &[usize], shape: &[usize]) -> Result<()> {
    if found != shape {
        bail!(
            "{}: tensor `{name}` has shape {found:?}, expected {shape:?} from the model's configuration",
            source.location().display()
        );
    }
    Ok(())
}

impl WeightSource for GgufFile {
    fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.tensor_f32(name, device)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in self.tensors.values() {
            *m.entry(format!("{:?}", e.dtype)).or_default() += 1;
        }
        m
    }
    fn location(&self) -> &Path {
        self.path()
    }
    fn stored(&self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Cow<'_, [u8]>)> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path().display()))?;
        check_shape(self, name, &e.shape, shape)?;
        Ok((e.dtype, Cow::Borrowed(self.raw_bytes(e))))
    }
}

/// Weights of a Hugging Face directory: `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`, memory-mapped.
pub struct SafetensorsWeights {
    dir: PathBuf,
    inner: candle_core::safetensors::MmapedSafetensors,
    files: Vec<PathBuf>,
}

impl SafetensorsWeights {
    /// Opens the weights of a model directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json in this directory",
                dir.display()
            );
        };
        for f in &files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are opened read-only and softprompt never writes model files.
        let inner = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| anyhow!("{}: cannot read safetensors: {e}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            inner,
            files,
        })
    }
}

/// Shard file names listed in an index file.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: field `weight_map` is missing", index.display()))?;
    let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Validates a safetensors header and data size before memory-mapping, so a truncated or
/// corrupted file is reported by name.
fn check_safetensors_header(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of a model file softprompt never writes.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    safetensors::SafeTensors::deserialize(&bytes)
        .map(|_| ())
        .map_err(|e| anyhow!("{}: corrupted or truncated safetensors file: {e}", path.display()))
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self
            .inner
            .load(name, device)
            .map_err(|e| anyhow!("{}: cannot load tensor `{name}`: {e}", self.dir.display()))?;
        Ok(t.to_dtype(DType::F32)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, view) in self.inner.tensors() {
            *m.entry(format!("{:?}", view.dtype())).or_default() += 1;
        }
        m
    }
    fn location(&self) -> &Path {
        self.files.first().map(|p| p.as_path()).unwrap_or(&self.dir)
    }
    fn stored(&self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Cow<'_, [u8]>)> {
        let view = self
            .inner
            .get(name)
            .map_err(|e| anyhow!("{}: cannot load tensor `{name}`: {e}", self.dir.display()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F16 => GgmlDType::F16,
            safetensors::Dtype::BF16 => GgmlDType::BF16,
            safetensors::Dtype::F32 => GgmlDType::F32,
            _ => return f32_bytes(self, name, shape),
        };
        check_shape(self, name, view.shape(), shape)?;
        Ok((dtype, Cow::Borrowed(view.data())))
    }
}

/// Weights held in memory (tests, tiny random models, converted checkpoints).
pub struct MemoryWeights {
    /// Name → tensor.
    pub tensors: std::collections::HashMap<String, Tensor>,
    /// Pseudo-location used in messages.
    pub origin: PathBuf,
}

impl WeightSource for MemoryWeights {
    fn tensor(&self, name: &str, _device: &Device) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.origin.display()))
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.tensors.values() {
            *m.entry(format!("{:?}", t.dtype()).to_uppercase()).or_default() += 1;
        }
        m
    }
    fn location(&self) -> &Path {
        &self.origin
    }
}
