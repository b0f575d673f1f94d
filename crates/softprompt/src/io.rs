//! File writing that never leaves a half-written file: write to a temporary sibling, then
//! rename over the destination.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `path` through `fill` into a temporary file in the same directory, then renames it
/// into place. On error the destination is untouched and the temporary file is removed.
pub fn write_atomically(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes bytes to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |w| Ok(w.write_all(bytes)?))
}

/// Writes named f32/f64/u32 tensors as a safetensors file (atomically), with optional
/// string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let contiguous: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| anyhow::anyhow!("cannot serialise {}: {e}", path.display()))?;
    write_bytes(path, &bytes)
}

/// The string metadata of a safetensors file (its `__metadata__`; empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: corrupted or truncated safetensors file: {e}", path.display()))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Reads every tensor of a safetensors file; errors name the file.
pub fn read_safetensors(path: &Path) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let map = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: corrupted or truncated safetensors file: {e}", path.display()))?;
    Ok(map.into_iter().collect())
}
