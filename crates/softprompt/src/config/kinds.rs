//! The typed choices among the training options.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::prompt::Method;

/// How the prompt starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum InitKind {
    /// Uniform in [-0.5, 0.5] (Lester).
    Random,
    /// N(0, 1) (PEFT's RANDOM; the default of a key/value prefix).
    RandomNormal,
    /// Zeros (PEFT's `init_weights = "zero"` of prefix tuning; with `prefix_projection`, the
    /// projection's last layer).
    Zero,
    /// Embeddings of tokens sampled from the 5,000 most common (the default of an input
    /// prompt).
    Vocab,
    /// Class-label word embeddings, the rest sampled vocabulary.
    Labels,
    /// Embeddings of `init_text`'s tokens, truncated or repeated.
    Text,
    /// The prompt of an existing adapter (`init_from`).
    From,
    /// Multitask: the shared prompt of the source adapter `init_from`, each task's factors the
    /// mean of the source tasks' (PEFT's AVERAGE_SOURCE_TASKS; one task).
    AverageSourceTasks,
    /// Multitask: the shared prompt and the factors of task `init_task` of the source adapter
    /// `init_from` (PEFT's EXACT_SOURCE_TASK; one task).
    ExactSourceTask,
    /// Multitask: only the shared prompt of the source adapter `init_from`; fresh factors
    /// (PEFT's ONLY_SOURCE_SHARED).
    OnlySourceShared,
}

impl InitKind {
    /// The init a run of `method` starts from when option `init` is not given: `random-normal`
    /// for a key/value prefix (prefix tuning, Cartridges: PEFT's default, since a prefix has no
    /// vocabulary to sample), `vocab` for an input prompt.
    pub fn default_for(method: Method) -> Self {
        if method.is_kv_prefix() {
            InitKind::RandomNormal
        } else {
            InitKind::Vocab
        }
    }

    /// Whether the init applies to a key/value prefix (the vocabulary and label inits fill
    /// input-embedding rows, which a prefix does not have).
    pub fn applies_to_kv_prefix(self) -> bool {
        matches!(
            self,
            InitKind::Random | InitKind::RandomNormal | InitKind::Zero | InitKind::Text | InitKind::From
        )
    }

    /// The name as in the TOML file and on the command line (`random-normal`).
    pub fn name(self) -> String {
        super::spelling(&self)
    }

    /// Whether the init reads a multitask source adapter (the three PEFT source-task inits).
    pub fn is_source_task(self) -> bool {
        matches!(
            self,
            InitKind::AverageSourceTasks | InitKind::ExactSourceTask | InitKind::OnlySourceShared
        )
    }
}

/// One task's data sets of a multitask run (TOML: a `[[tasks]]` table; flag:
/// `--tasks TRAIN[,DEV[,TEST]]`). Its rows get the task id of its position in `tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskData {
    /// Training JSONL.
    pub train: PathBuf,
    /// Development JSONL.
    #[serde(default)]
    pub dev: Option<PathBuf>,
    /// Test JSONL.
    #[serde(default)]
    pub test: Option<PathBuf>,
}

impl std::str::FromStr for TaskData {
    type Err = String;
    /// `TRAIN[,DEV[,TEST]]`; an empty DEV (`a.jsonl,,c.jsonl`) is left out.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let path = |i: usize| parts.get(i).filter(|p| !p.is_empty()).map(PathBuf::from);
        match (parts.len(), path(0)) {
            (1..=3, Some(train)) => Ok(Self {
                train,
                dev: path(1),
                test: path(2),
            }),
            _ => Err(format!(
                "expected TRAIN.jsonl[,DEV.jsonl[,TEST.jsonl]] (one task's files), got `{s}`"
            )),
        }
    }
}

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to zero at the last step (transformers' `linear`).
    Linear,
    /// Cosine decay to zero at the last step.
    Cosine,
}
