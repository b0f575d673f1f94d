//! softprompt's own files beside the PEFT adapter:
//! - `softprompt.json` + `softprompt_prompt.safetensors` in the adapter directory: the template,
//!   task, labels and verbaliser, and the prompt's raw parameters (the p-tuning encoder too,
//!   which PEFT never saves), so `eval`/`predict` and prompt transfer need nothing else;
//! - `checkpoint-last/`: everything needed to resume a run exactly: parameters, AdamW moments,
//!   the step, the best dev score, the loss history. (The data order and dropout masks are
//!   functions of the seed and the step, so no RNG state needs saving.)

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::TrainConfig;
use crate::io::{read_safetensors, write_bytes, write_safetensors};
use crate::task::Task;

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

/// Task description saved next to an adapter.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskFile {
    /// Template source (with its soft tokens).
    pub template: String,
    /// Target field.
    pub target_field: String,
    /// Task kind.
    pub task: crate::task::TaskKind,
    /// Labels or candidate targets (of task 0 for a multitask adapter).
    pub labels: Vec<String>,
    /// A multitask adapter's labels of every task, by task id (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_labels: Vec<Vec<String>>,
    /// Label → verbaliser word.
    pub verbalizer: std::collections::BTreeMap<String, String>,
    /// Model the adapter was trained on.
    pub model: String,
    /// Method and encoder, for prompt transfer and resuming.
    pub config: TrainConfig,
}

/// Name of the task file in an adapter directory.
pub const TASK_FILE: &str = "softprompt.json";
/// Name of the raw prompt parameters file in an adapter directory.
pub const PROMPT_FILE: &str = "softprompt_prompt.safetensors";

/// Writes `softprompt.json` next to an adapter; `tasks` are the run's tasks by task id (one,
/// unless multitask).
pub fn save_task_file(dir: &Path, tasks: &[&Task], cfg: &TrainConfig) -> Result<()> {
    let Some(task) = tasks.first() else {
        bail!("cannot write {}: the run has no task", dir.join(TASK_FILE).display());
    };
    let file = TaskFile {
        template: task.template.source().to_string(),
        target_field: cfg.target_field.clone(),
        task: cfg.task,
        labels: task.labels.clone(),
        task_labels: if tasks.len() > 1 {
            tasks.iter().map(|t| t.labels.clone()).collect()
        } else {
            Vec::new()
        },
        verbalizer: cfg.verbalizer.clone(),
        model: cfg.model.clone(),
        config: cfg.clone(),
    };
    write_bytes(&dir.join(TASK_FILE), serde_json::to_string_pretty(&file)?.as_bytes())
}

/// Reads `softprompt.json` of an adapter directory.
pub fn load_task_file(dir: &Path) -> Result<TaskFile> {
    let path = dir.join(TASK_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid softprompt task file", path.display()))
}

/// Saves the raw prompt parameters (encoder and classification head included) next to an
/// adapter.
pub fn save_prompt_params(dir: &Path, params: &[(String, Tensor)]) -> Result<()> {
    write_safetensors(&dir.join(PROMPT_FILE), params, None)
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
    write_safetensors(&dir.join("state.safetensors"), &tensors, None)?;
    let json = serde_json::json!({
        "progress": progress,
        "optimizer_step": optimizer_step,
        "config": cfg,
    });
    write_bytes(&dir.join("state.json"), serde_json::to_string_pretty(&json)?.as_bytes())
}

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
    let tensors = read_safetensors(&dir.join("state.safetensors"))?;
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
