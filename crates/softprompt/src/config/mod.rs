//! Everything a training run is configured by: the one list of options. The TOML file, the
//! command-line flags (with the `cli` feature, `clap::Args` is derived from [`TrainConfig`],
//! its doc comments are the help and its [`Default`] the defaults) and the training record kept
//! beside an adapter all use these names and types.
//!
//! - `kinds`: the typed choices (`Method`, `InitKind`, `Schedule`, `TaskData`);
//! - `checks`: the checks of the options on their own and of the run's templates, before the
//!   data is read or the model is loaded (with `init = "from"`, `init_from`'s adapter config is
//!   read), and the table of the whole-number options' ranges;
//! - `flags` (with the `cli` feature): the parser of whole-number flags, whose messages name the
//!   option and its range (`--steps -1`).

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

mod checks;
mod cpt;
#[cfg(feature = "cli")]
pub mod flags;
mod kinds;
mod no_effect;

#[cfg(feature = "cli")]
use flags::WholeNumber;

pub use crate::backbone::{KernelPath, WeightStorage};
pub use crate::prompt::cpt::CptLossWeighting;
pub use crate::prompt::encoder::EncoderKind;
pub use crate::prompt::Method;
use crate::prompt::{EncoderSpec, PrefixSpec};
pub use crate::task::TaskKind;
pub use checks::{below_least, check_baseline_template, run_template, whole_number_range, WHOLE_NUMBER_OPTIONS};
pub use kinds::{InitKind, Schedule, TaskData};

/// A training run's configuration. Every field has a default, so a TOML file or the flags need
/// only name what differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// MODEL: GGUF file, HF directory, short name or hf:org/name.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: String,
    /// Training JSONL.
    #[cfg_attr(feature = "cli", arg(long))]
    pub train: PathBuf,
    /// Development JSONL (evaluation during training, best checkpoint).
    #[cfg_attr(feature = "cli", arg(long))]
    pub dev: Option<PathBuf>,
    /// Test JSONL, scored after training with the best adapter (and before it, zero-shot, with
    /// `baseline_template`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub test: Option<PathBuf>,
    /// Template with soft tokens (see `template`); without any, `[soft:N]` is prepended.
    #[cfg_attr(feature = "cli", arg(long))]
    pub template: String,
    /// Hand-written template evaluated as the zero-shot baseline on the test set.
    #[cfg_attr(feature = "cli", arg(long))]
    pub baseline_template: Option<String>,
    /// Field holding the target (label or answer).
    #[cfg_attr(feature = "cli", arg(long))]
    pub target_field: String,
    /// Task kind.
    #[cfg_attr(feature = "cli", arg(long))]
    pub task: TaskKind,
    /// Label → verbaliser word (Classify); default: the label itself.
    #[cfg_attr(feature = "cli", arg(skip))]
    pub verbalizer: BTreeMap<String, String>,
    /// Prompt tuning, p-tuning, prefix tuning, Cartridge, multitask prompt tuning, residual
    /// prompt tuning, DePT, late prompt tuning or CPT.
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: Method,
    /// Virtual tokens to prepend when the template has none; for a key/value prefix
    /// (prefix-tuning, cartridge), the prefix length.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("num_virtual_tokens")))]
    pub num_virtual_tokens: usize,
    /// P-tuning encoder.
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder: EncoderKind,
    /// P-tuning encoder hidden size (also the hidden size of prefix tuning's projection).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("encoder_hidden")))]
    pub encoder_hidden: usize,
    /// Residual prompt tuning: the width of the shared bottleneck MLP (`W_down: d → width`,
    /// `W_up: width → d`). Default 300: the paper's 400 for T5-base (d = 768) is about d/2, and
    /// SmolLM2-135M's d = 576 gives about 300.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("residual_bottleneck")))]
    pub residual_bottleneck: usize,
    /// DePT: the rank `r` of the position-wise update `A·B` of the input embeddings
    /// (`A [max_len, r]`, `B [r, d]`).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("dept_rank")))]
    pub dept_rank: usize,
    /// DePT: the peak learning rate of `A` and `B` (`lr` is the prompt's; same schedule).
    #[cfg_attr(feature = "cli", arg(long))]
    pub dept_lr: f64,
    /// Late prompt tuning: the decoder layer whose input the prompt replaces (0 = the input
    /// embeddings, as prompt tuning). Default: half the model's layers.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("insert_layer")))]
    pub insert_layer: Option<usize>,
    /// Late prompt tuning: keep the frozen lower layers' output of every training row in memory
    /// after its first step, so later epochs run only the layers from `insert_layer` on. Default:
    /// on when the training rows' hidden states fit in 1 GiB.
    #[cfg_attr(feature = "cli", arg(long))]
    pub cache_lower_layers: Option<bool>,
    /// Prefix tuning: pass the prefix through PEFT's projection MLP
    /// (`Linear(kv_dim, encoder_hidden) → tanh → Linear(encoder_hidden, layers·2·kv_dim)`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prefix_projection: bool,
    /// Cartridge: leading virtual tokens kept frozen (an attention sink).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("num_frozen_tokens")))]
    pub num_frozen_tokens: usize,
    /// LSTM layers (p-tuning with the `lstm` encoder; PEFT's MLP always has two).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("encoder_layers")))]
    pub encoder_layers: usize,
    /// LSTM dropout between layers (p-tuning with the `lstm` encoder).
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder_dropout: f64,
    /// Initialisation. Default: `vocab` for an input prompt, `random-normal` for a key/value
    /// prefix (prefix-tuning, cartridge), as in PEFT.
    #[cfg_attr(feature = "cli", arg(long))]
    pub init: InitKind,
    /// Text for `init = "text"` (for a key/value prefix: the keys and values of its first
    /// `num_virtual_tokens` tokens, run through the frozen model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub init_text: Option<String>,
    /// Adapter directory for `init = "from"`; for the multitask source inits the source adapter
    /// directory or its `.safetensors` file (PEFT's `prompt_tuning_init_state_dict_path`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub init_from: Option<PathBuf>,
    /// Source task for `init = "exact-source-task"` (PEFT's `prompt_tuning_init_task`).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("init_task")))]
    pub init_task: usize,
    /// Multitask prompt tuning: one entry per task, in task-id order (`[[tasks]]` tables with
    /// `train` and optional `dev`, `test`; replaces `train`/`dev`/`test`). Repeatable flag:
    /// `--tasks TRAIN[,DEV[,TEST]]`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub tasks: Vec<TaskData>,
    /// Multitask prompt tuning: the rank of each task's factors (PEFT's `num_ranks`).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("num_ranks")))]
    pub num_ranks: usize,
    /// CPT: the training rows (the first N of `train`) rendered with the template into the
    /// context that is the prompt.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("cpt_examples")))]
    pub cpt_examples: usize,
    /// CPT: how the loss weighs the labels (PEFT's `opt_weighted_loss_type`): `none` (all 1) or
    /// `decay` (the query's 1, each earlier context example `cpt_loss_decay_factor` times the
    /// next).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cpt_weighted_loss: CptLossWeighting,
    /// CPT: the factor of `decay` (PEFT's `opt_loss_decay_factor`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cpt_loss_decay_factor: f64,
    /// CPT: the bound on the change of an input token's embedding, times √(hidden/2048) (PEFT's
    /// `opt_projection_epsilon`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cpt_projection_epsilon: f64,
    /// CPT: the bound on the change of a template token's embedding, times √(hidden/2048)
    /// (PEFT's `opt_projection_format_epsilon`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cpt_projection_format_epsilon: f64,
    /// Peak learning rate.
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[cfg_attr(feature = "cli", arg(long))]
    pub weight_decay: f64,
    /// AdamW β₁.
    #[cfg_attr(feature = "cli", arg(long))]
    pub beta1: f64,
    /// AdamW β₂.
    #[cfg_attr(feature = "cli", arg(long))]
    pub beta2: f64,
    /// AdamW ε.
    #[cfg_attr(feature = "cli", arg(long))]
    pub adam_eps: f64,
    /// Linear warm-up steps.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("warmup")))]
    pub warmup: usize,
    /// Schedule after warm-up.
    #[cfg_attr(feature = "cli", arg(long))]
    pub schedule: Schedule,
    /// Optimiser steps (overrides `epochs`). Default: as many as `epochs` passes take.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("steps")))]
    pub steps: Option<usize>,
    /// Passes over the training set when `steps` is not given (default 1): that many times the
    /// rows, over `batch` × `accumulation` rows per step, rounded up.
    #[cfg_attr(feature = "cli", arg(long))]
    pub epochs: Option<f64>,
    /// Rows per micro-batch.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("batch")))]
    pub batch: usize,
    /// Micro-batches per optimiser step.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("accumulation")))]
    pub accumulation: usize,
    /// Gradient-norm clipping (0 = off).
    #[cfg_attr(feature = "cli", arg(long))]
    pub clip: f64,
    /// Evaluate on dev every N steps (0 = only at the end).
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("eval_every")))]
    pub eval_every: usize,
    /// Use only the first N dev rows.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("dev_rows")))]
    pub dev_rows: Option<usize>,
    /// Use only the first N test rows.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("test_rows")))]
    pub test_rows: Option<usize>,
    /// Stop after this many evaluations without improvement.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("patience")))]
    pub patience: Option<usize>,
    /// Seed of initialisation and data order.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<u64>::option("seed")))]
    pub seed: u64,
    /// Output directory.
    #[cfg_attr(feature = "cli", arg(long))]
    pub output: PathBuf,
    /// Longest sequence (prompt + target); longer rows have their fields truncated.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("max_len")))]
    pub max_len: usize,
    /// Also report greedy exact match (Generate).
    #[cfg_attr(feature = "cli", arg(long))]
    pub exact_match: bool,
    /// Rows per evaluation batch.
    #[cfg_attr(feature = "cli", arg(long, value_parser = WholeNumber::<usize>::option("eval_batch")))]
    pub eval_batch: usize,
    /// Continue from `output/checkpoint-last`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub resume: bool,
    /// Replace the run already in `output` (the new run is written beside it and swapped in only
    /// when it succeeds; without this flag an existing adapter is never replaced).
    #[cfg_attr(feature = "cli", arg(long))]
    pub overwrite: bool,
    /// Where to compute: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature).
    #[cfg_attr(feature = "cli", arg(long))]
    pub device: String,
    /// How the frozen linear weights are held: `f32` (converted on load, fastest), `file` (as
    /// the model file stores them, e.g. GGUF Q4_1 or f16, converted tile by tile inside each
    /// product: the same numbers in a fraction of the memory), or converted at load to `f16`,
    /// `bf16` or `q8_0` (Llama family).
    #[cfg_attr(feature = "cli", arg(long))]
    pub weights: WeightStorage,
    /// Which implementation runs the frozen model: `fused` (the hand-written f32 CPU kernels)
    /// or `composed` (candle ops, any device); the same numbers to rounding. Left out: fused
    /// where it runs (f32 on the CPU), else composed; `SOFTPROMPT_COMPOSED=1` makes composed
    /// the default.
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub kernels: Option<KernelPath>,
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
            prefix_projection: false,
            residual_bottleneck: 300,
            dept_rank: 4,
            dept_lr: 1e-4,
            insert_layer: None,
            cache_lower_layers: None,
            num_frozen_tokens: 1,
            encoder_layers: 2,
            encoder_dropout: 0.0,
            init: InitKind::Vocab,
            init_text: None,
            init_from: None,
            init_task: 0,
            tasks: Vec::new(),
            num_ranks: 1,
            cpt_examples: 4,
            cpt_weighted_loss: CptLossWeighting::None,
            cpt_loss_decay_factor: 1.0,
            cpt_projection_epsilon: 0.1,
            cpt_projection_format_epsilon: 0.1,
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
            overwrite: false,
            device: "cpu".into(),
            weights: WeightStorage::F32,
            kernels: None,
        }
    }
}

impl TrainConfig {
    /// The p-tuning encoder this configuration asks for (`None` for the other methods).
    pub fn encoder_spec(&self) -> Option<EncoderSpec> {
        match self.method {
            Method::PromptTuning
            | Method::PrefixTuning
            | Method::Cartridge
            | Method::MultitaskPromptTuning
            | Method::ResidualPromptTuning
            | Method::Dept
            | Method::LatePromptTuning
            | Method::Cpt => None,
            Method::PTuning => Some(EncoderSpec::new(
                self.encoder,
                self.encoder_hidden,
                self.encoder_layers,
                self.encoder_dropout,
            )),
        }
    }

    /// Number of tasks: the sets of `tasks`, or 1 (the rows of `train`).
    pub fn num_tasks(&self) -> usize {
        self.tasks.len().max(1)
    }

    /// The key/value prefix this configuration asks for (`None` for the input-prompt methods).
    pub fn prefix_spec(&self) -> Option<PrefixSpec> {
        match self.method {
            Method::PrefixTuning => Some(PrefixSpec::PrefixTuning {
                projection: self.prefix_projection.then_some(self.encoder_hidden),
            }),
            Method::Cartridge => Some(PrefixSpec::Cartridge {
                num_frozen_tokens: self.num_frozen_tokens,
            }),
            Method::PromptTuning
            | Method::PTuning
            | Method::MultitaskPromptTuning
            | Method::ResidualPromptTuning
            | Method::Dept
            | Method::LatePromptTuning
            | Method::Cpt => None,
        }
    }

    /// The device of option `device`.
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device).context("option `device`")
    }
}

/// How messages name an option: its TOML key and its flag, e.g. ``option `lr` (--lr)``.
pub fn option(name: &str) -> String {
    format!("option `{name}` (--{})", name.replace('_', "-"))
}

/// How a TOML file spells an option's value (`"prefix-tuning"`, `"random-normal"`): its serde
/// name, for messages.
pub fn spelling<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Parses a device name: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device is refused with a
/// clear message when candle was built without CUDA support.
pub fn parse_device(name: &str) -> Result<Device> {
    let ordinal = match name.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown device `{name}`: expected `cpu`, `cuda` or `cuda:N`"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{name}` asked for, but softprompt was built without CUDA support \
             (rebuild with `--features softprompt/cuda` on a machine with the CUDA toolkit)"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let e = format!("{:#}", parse_device("tpu").unwrap_err());
        assert!(e.contains("unknown device `tpu`"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = format!("{:#}", parse_device("cuda:1").unwrap_err());
            assert!(e.contains("without CUDA support"), "{e}");
        }
    }
}
