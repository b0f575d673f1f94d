//! `checkpoint-last/`: everything needed to resume a run exactly: the parameters, AdamW's
//! moments, the step, the best dev score, the loss history and the options the run was started
//! with. (The data order and dropout masks are functions of the seed and the step, so no RNG
//! state needs saving.)

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::TrainConfig;
use crate::io::{read_safetensors, write_bytes, write_safetensors};

/// Counters and history of a run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Optimiser steps done.
    pub step: usize,
    /// Best dev accuracy and its step.
    pub best: Option<(f64, usize)>,
    /// Evaluations since the best one.
    pub evals_since_best: usize,
    /// Training loss per step.
    pub losses: Vec<(usize, f32)>,
    /// Dev accuracy per evaluation.
    pub dev: Vec<(usize, f64)>,
}

/// What `checkpoint-last/` holds: everything needed to resume a run exactly.
pub struct Checkpoint {
    /// Every trainable parameter by its saved name.
    pub params: HashMap<String, Tensor>,
    /// AdamW's first and second moments by parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// AdamW's update count.
    pub optimizer_step: usize,
    /// Counters and history.
    pub progress: Progress,
}

/// Saves a checkpoint into `dir` (created if needed): `state.safetensors` (parameters, then
/// `adamw.m.*` / `adamw.v.*`) and `state.json` (progress, optimizer step, configuration).
pub fn save_checkpoint(
    dir: &Path,
    params: Vec<(String, Tensor)>,
    moments: &BTreeMap<String, (Tensor, Tensor)>,
    optimizer_step: usize,
    progress: &Progress,
    cfg: &TrainConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = params;
    for (name, (m, v)) in moments {
        tensors.push((format!("adamw.m.{name}"), m.clone()));
        tensors.push((format!("adamw.v.{name}"), v.clone()));
    }
    // The counters go into the tensors' own file too: it is replaced in one rename, so a run
    // killed between writing it and `state.json` still resumes with counters that match.
    let counters = serde_json::json!({"progress": progress, "optimizer_step": optimizer_step});
    let metadata = HashMap::from([(COUNTERS_KEY.to_string(), counters.to_string())]);
    write_safetensors(&dir.join("state.safetensors"), &tensors, Some(metadata))?;
    let json = serde_json::json!({
        "progress": progress,
        "optimizer_step": optimizer_step,
        "config": cfg,
    });
    write_bytes(&dir.join("state.json"), serde_json::to_string_pretty(&json)?.as_bytes())
}

/// The metadata key of `state.safetensors` holding the counters (`progress`, `optimizer_step`)
/// that go with its tensors.
const COUNTERS_KEY: &str = "softprompt.counters";

/// Reads the checkpoint in `dir`.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let json_path = dir.join("state.json");
    let text = std::fs::read_to_string(&json_path).with_context(|| {
        format!(
            "cannot resume: {} is missing (was the run started with this output directory?)",
            json_path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", json_path.display()))?;
    let progress: Progress = serde_json::from_value(v["progress"].clone())
        .with_context(|| format!("{}: field `progress`", json_path.display()))?;
    let optimizer_step = v["optimizer_step"]
        .as_u64()
        .with_context(|| format!("{}: field `optimizer_step` is missing", json_path.display()))?
        as usize;
    let tensors_path = dir.join("state.safetensors");
    let tensors = read_safetensors(&tensors_path)?;
    // The counters saved with the tensors win over `state.json`'s (see `save_checkpoint`);
    // checkpoints written before they were saved there have only the latter.
    let (progress, optimizer_step) = match crate::io::read_safetensors_metadata(&tensors_path)?.get(COUNTERS_KEY) {
        Some(text) => {
            let v: serde_json::Value = serde_json::from_str(text)
                .with_context(|| format!("{}: metadata `{COUNTERS_KEY}` is not JSON", tensors_path.display()))?;
            let progress: Progress = serde_json::from_value(v["progress"].clone())
                .with_context(|| format!("{}: metadata `{COUNTERS_KEY}`: `progress`", tensors_path.display()))?;
            let step = v["optimizer_step"].as_u64().with_context(|| {
                format!(
                    "{}: metadata `{COUNTERS_KEY}`: `optimizer_step` is missing",
                    tensors_path.display()
                )
            })? as usize;
            (progress, step)
        }
        None => (progress, optimizer_step),
    };
    let params = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("adamw."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let mut moments = BTreeMap::new();
    for (k, m) in &tensors {
        if let Some(name) = k.strip_prefix("adamw.m.") {
            let Some(vv) = tensors.get(&format!("adamw.v.{name}")) else {
                bail!("{}: `adamw.v.{name}` is missing", dir.display());
            };
            moments.insert(name.to_string(), (m.clone(), vv.clone()));
        }
    }
    Ok(Checkpoint {
        params,
        moments,
        optimizer_step,
        progress,
    })
}
