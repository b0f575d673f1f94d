//! Everything a training run is configured by; read from a TOML file and/or CLI flags.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::optim::Schedule;
use crate::task::TaskKind;

/// Which parameter-efficient method trains the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Lester et al. 2021: the virtual-token matrix itself is learned.
    PromptTuning,
    /// Liu et al. 2021: virtual tokens pass through an MLP or bi-LSTM encoder.
    PTuning,
}

/// P-tuning encoder type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// Linear, ReLU, Linear, ReLU, Linear.
    Mlp,
    /// Bi-directional LSTM, then Linear, ReLU, Linear.
    Lstm,
}

/// How the prompt starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitKind {
    /// Uniform in [-0.5, 0.5] (Lester).
    Random,
    /// N(0, 1) (PEFT's RANDOM).
    RandomNormal,
    /// Embeddings of tokens sampled from the 5,000 most common.
    Vocab,
    /// Class-label word embeddings, the rest sampled vocabulary.
    Labels,
    /// Embeddings of `init_text`'s tokens, truncated or repeated.
    Text,
    /// The prompt of an existing adapter (`init_from`).
    From,
}

/// A training run's configuration. Every field has a default, so a TOML file or the flags need
/// only name what differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// MODEL: GGUF file, HF directory, short name or hf:org/name.
    pub model: String,
    /// Training JSONL.
    pub train: PathBuf,
    /// Development JSONL (evaluation during training, best checkpoint).
    pub dev: Option<PathBuf>,
    /// Test JSONL, scored before (zero-shot) and after training.
    pub test: Option<PathBuf>,
    /// Template with soft tokens (see `template`); without any, `[soft:N]` is prepended.
    pub template: String,
    /// Hand-written template evaluated as the zero-shot baseline on the test set.
    pub baseline_template: Option<String>,
    /// Field holding the target (label or answer).
    pub target_field: String,
    /// Task kind.
    pub task: TaskKind,
    /// Label → verbaliser word (Classify); default: the label itself.
    pub verbalizer: BTreeMap<String, String>,
    /// Prompt tuning or p-tuning.
    pub method: Method,
    /// Virtual tokens to prepend when the template has none.
    pub num_virtual_tokens: usize,
    /// P-tuning encoder.
    pub encoder: EncoderKind,
    /// P-tuning encoder hidden size.
    pub encoder_hidden: usize,
    /// LSTM layers.
    pub encoder_layers: usize,
    /// LSTM dropout between layers.
    pub encoder_dropout: f64,
    /// Initialisation.
    pub init: InitKind,
    /// Text for `init = "text"`.
    pub init_text: Option<String>,
    /// Adapter directory for `init = "from"`.
    pub init_from: Option<PathBuf>,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Optimiser steps (overrides `epochs`).
    pub steps: Option<usize>,
    /// Passes over the training set (when `steps` is not given).
    pub epochs: Option<f64>,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub accumulation: usize,
    /// Gradient-norm clipping (0 = off).
    pub clip: f64,
    /// Evaluate on dev every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Use only the first N dev rows.
    pub dev_rows: Option<usize>,
    /// Use only the first N test rows.
    pub test_rows: Option<usize>,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Output directory.
    pub output: PathBuf,
    /// Longest sequence (prompt + target); longer rows have their fields truncated.
    pub max_len: usize,
    /// Also report greedy exact match (Generate).
    pub exact_match: bool,
    /// Rows per evaluation batch.
    pub eval_batch: usize,
    /// Continue from `output/checkpoint-last`.
    pub resume: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: "smollm2-135m".into(),
            train: PathBuf::from("data/sentiment-movies/train.jsonl"),
            dev: None,
            test: None,
            template: "Review: {text}\\nSentiment: {label}".into(),
            baseline_template: None,
            target_field: "label".into(),
            task: TaskKind::Classify,
            verbalizer: BTreeMap::new(),
            method: Method::PromptTuning,
            num_virtual_tokens: 20,
            encoder: EncoderKind::Mlp,
            encoder_hidden: 128,
            encoder_layers: 2,
            encoder_dropout: 0.0,
            init: InitKind::Vocab,
            init_text: None,
            init_from: None,
            lr: 0.03,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            warmup: 20,
            schedule: Schedule::Linear,
            steps: None,
            epochs: None,
            batch: 8,
            accumulation: 1,
            clip: 1.0,
            eval_every: 50,
            dev_rows: None,
            test_rows: None,
            patience: None,
            seed: 42,
            output: PathBuf::from("runs/out"),
            max_len: 256,
            exact_match: false,
            eval_batch: 16,
            resume: false,
        }
    }
}
