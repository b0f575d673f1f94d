//! Training a multitask prompt (PEFT's MULTITASK_PROMPT_TUNING): its start (fresh factors, or
//! from a source multitask adapter as PEFT's source-task inits define it) and its PEFT config.
//! The data side (one set per task, each batch drawing from every task) is
//! [`super::prepare()`]'s and [`super::DataOrder`]'s; the gradient is the prompt-tuning path with
//! the stacked prompt table (see [`crate::prompt::multitask`]).

use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Prepared;
use crate::adapter::peft_config::PromptTuningFields;
use crate::adapter::{MethodConfig, PeftConfig, TaskType, ADAPTER_WEIGHTS};
use crate::config::{option, InitKind, TrainConfig};
use crate::prompt::{SoftPrompt, SourceInit, TaskFactors, PROMPT_EMBEDDINGS};

/// A source multitask adapter as PEFT reads it for the source-task inits: the file and its
/// tensors (`prompt_embeddings`, `prefix_task_cols`, `prefix_task_rows`).
pub struct SourceStateDict {
    /// The safetensors file (`init_from` itself, or `init_from/adapter_model.safetensors`).
    pub path: PathBuf,
    /// Its tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
}

impl SourceStateDict {
    /// Reads option `init_from`: an adapter directory or a `.safetensors` file.
    pub fn read(cfg: &TrainConfig) -> Result<Self> {
        let given = cfg
            .init_from
            .as_deref()
            .with_context(|| format!("the multitask source inits need {}", option("init_from")))?;
        let path = if given.is_dir() {
            given.join(ADAPTER_WEIGHTS)
        } else {
            given.to_path_buf()
        };
        let tensors = crate::io::read_safetensors(&path)
            .with_context(|| format!("{} (the source adapter)", option("init_from")))?;
        Ok(Self { path, tensors })
    }

    /// The source's shared prompt `prompt_embeddings`.
    pub fn shared_prompt(&self) -> Result<Tensor> {
        self.tensors.get(PROMPT_EMBEDDINGS).cloned().with_context(|| {
            format!(
                "{}: the source adapter has no tensor `{PROMPT_EMBEDDINGS}`",
                self.path.display()
            )
        })
    }
}

/// The source-task init option `init` asks for (`None` for the fresh inits).
pub fn source_init(cfg: &TrainConfig) -> Option<SourceInit> {
    match cfg.init {
        InitKind::AverageSourceTasks => Some(SourceInit::AverageSourceTasks),
        InitKind::ExactSourceTask => Some(SourceInit::ExactSourceTask(cfg.init_task)),
        InitKind::OnlySourceShared => Some(SourceInit::OnlySourceShared),
        _ => None,
    }
}

/// The multitask prompt of a run: the shared prompt starts at `start [p, d]` (the resolved
/// option `init`), the factors of every task fresh (`N(0, 0.02)`, drawn after the shared
/// prompt, as PEFT does) or from the source adapter.
pub fn new_prompt(p: &Prepared, start: &Tensor, rng: &mut StdRng) -> Result<SoftPrompt> {
    let cfg = &p.cfg;
    let (v, d) = start.dims2()?;
    let factors = match source_init(cfg) {
        Some(init) => {
            let source = SourceStateDict::read(cfg)?;
            TaskFactors::from_source(init, &source.tensors, cfg.num_tasks(), v, d, cfg.num_ranks, rng)
                .with_context(|| format!("{}", source.path.display()))?
        }
        None => TaskFactors::random(cfg.num_tasks(), v, cfg.num_ranks, d, start.device(), rng)?,
    };
    SoftPrompt::multitask(start, factors.to_device(start.device())?)
}

/// The PEFT `adapter_config.json` of a trained multitask prompt, as PEFT writes it: the init's
/// name (`TEXT` with its text and the model as tokenizer, a source-task init with the source
/// file, other inits as `RANDOM`), `prompt_tuning_init_task`, `num_ranks`, `num_tasks`.
pub fn peft_config(p: &Prepared, prompt: &SoftPrompt, task_type: TaskType) -> Result<PeftConfig> {
    let cfg = &p.cfg;
    let source = source_init(cfg);
    let (name, text) = match (cfg.init, source) {
        (_, Some(s)) => (s.peft_name(), None),
        (InitKind::Text, None) => ("TEXT", cfg.init_text.clone()),
        _ => ("RANDOM", None),
    };
    let state_dict_path = match source {
        Some(_) => Some(absolute(&SourceStateDict::read(cfg)?.path)),
        None => None,
    };
    let factors = prompt.task_factors().context("a multitask prompt has task factors")?;
    let method = MethodConfig::MultitaskPromptTuning {
        prompt: PromptTuningFields {
            prompt_tuning_init: name.to_string(),
            tokenizer_name_or_path: text.as_ref().map(|_| cfg.model.clone()),
            prompt_tuning_init_text: text,
            tokenizer_kwargs: None,
        },
        prompt_tuning_init_state_dict_path: state_dict_path,
        prompt_tuning_init_task: Some(cfg.init_task),
        num_ranks: factors.num_ranks(),
        num_tasks: factors.num_tasks(),
    };
    Ok(PeftConfig::new(
        method,
        task_type,
        prompt.num_virtual_tokens(),
        p.model.backbone.info(),
    ))
}

/// `path` made absolute (PEFT reads the source file again when it loads the adapter).
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}
