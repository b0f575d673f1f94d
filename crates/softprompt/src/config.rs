//! Everything a training run is configured by: the one list of options. The TOML file, the
//! command-line flags (with the `cli` feature, `clap::Args` is derived from [`TrainConfig`],
//! its doc comments are the help and its [`Default`] the defaults) and `softprompt.json` all use
//! these names and types.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub use crate::backbone::WeightStorage;
pub use crate::prompt::encoder::EncoderKind;
use crate::prompt::{EncoderSpec, PrefixSpec};
pub use crate::task::TaskKind;
pub use crate::train::optim::Schedule;

/// Which parameter-efficient method trains the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Lester et al. 2021: the virtual-token matrix itself is learned.
    PromptTuning,
    /// Liu et al. 2021: virtual tokens pass through an MLP or bi-LSTM encoder.
    PTuning,
    /// Li & Liang 2021 (PEFT's PREFIX_TUNING): learned keys and values before the input in every
    /// attention layer, optionally through a projection MLP (`prefix_projection`). On causal
    /// models, and on encoders with `seq-cls` (p-tuning v2, Liu et al. 2022); the template has
    /// no `[soft]` tokens.
    PrefixTuning,
    /// Eyuboglu et al. 2025 (PEFT's CARTRIDGE): the key/value prefix itself is learned, usually
    /// from a text prefill (`init = "text"`); the first `num_frozen_tokens` stay fixed.
    Cartridge,
    /// Wang et al. 2023 (PEFT's MULTITASK_PROMPT_TUNING): a shared prompt times a rank-`num_ranks`
    /// product per task, trained on every set of `tasks` at once (one task id per set).
    MultitaskPromptTuning,
}

impl Method {
    /// Whether the method learns a per-layer key/value prefix (prefix tuning, Cartridges)
    /// rather than an input prompt.
    pub fn is_kv_prefix(self) -> bool {
        matches!(self, Method::PrefixTuning | Method::Cartridge)
    }
}

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
    /// Embeddings of tokens sampled from the 5,000 most common.
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
    /// Test JSONL, scored before (zero-shot) and after training.
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
    /// Prompt tuning, p-tuning, prefix tuning or Cartridge.
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: Method,
    /// Virtual tokens to prepend when the template has none.
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_virtual_tokens: usize,
    /// P-tuning encoder.
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder: EncoderKind,
    /// P-tuning encoder hidden size (also the hidden size of prefix tuning's projection).
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder_hidden: usize,
    /// Prefix tuning: pass the prefix through PEFT's projection MLP
    /// (`Linear(kv_dim, encoder_hidden) → tanh → Linear(encoder_hidden, layers·2·kv_dim)`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prefix_projection: bool,
    /// Cartridge: leading virtual tokens kept frozen (an attention sink).
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_frozen_tokens: usize,
    /// LSTM layers.
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder_layers: usize,
    /// LSTM dropout between layers.
    #[cfg_attr(feature = "cli", arg(long))]
    pub encoder_dropout: f64,
    /// Initialisation.
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
    #[cfg_attr(feature = "cli", arg(long))]
    pub init_task: usize,
    /// Multitask prompt tuning: one entry per task, in task-id order (`[[tasks]]` tables with
    /// `train` and optional `dev`, `test`; replaces `train`/`dev`/`test`). Repeatable flag:
    /// `--tasks TRAIN[,DEV[,TEST]]`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub tasks: Vec<TaskData>,
    /// Multitask prompt tuning: the rank of each task's factors (PEFT's `num_ranks`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_ranks: usize,
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
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup: usize,
    /// Schedule after warm-up.
    #[cfg_attr(feature = "cli", arg(long))]
    pub schedule: Schedule,
    /// Optimiser steps (overrides `epochs`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub steps: Option<usize>,
    /// Passes over the training set (when `steps` is not given).
    #[cfg_attr(feature = "cli", arg(long))]
    pub epochs: Option<f64>,
    /// Rows per micro-batch.
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch: usize,
    /// Micro-batches per optimiser step.
    #[cfg_attr(feature = "cli", arg(long))]
    pub accumulation: usize,
    /// Gradient-norm clipping (0 = off).
    #[cfg_attr(feature = "cli", arg(long))]
    pub clip: f64,
    /// Evaluate on dev every N steps (0 = only at the end).
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_every: usize,
    /// Use only the first N dev rows.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dev_rows: Option<usize>,
    /// Use only the first N test rows.
    #[cfg_attr(feature = "cli", arg(long))]
    pub test_rows: Option<usize>,
    /// Stop after this many evaluations without improvement.
    #[cfg_attr(feature = "cli", arg(long))]
    pub patience: Option<usize>,
    /// Seed of initialisation and data order.
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: u64,
    /// Output directory.
    #[cfg_attr(feature = "cli", arg(long))]
    pub output: PathBuf,
    /// Longest sequence (prompt + target); longer rows have their fields truncated.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_len: usize,
    /// Also report greedy exact match (Generate).
    #[cfg_attr(feature = "cli", arg(long))]
    pub exact_match: bool,
    /// Rows per evaluation batch.
    #[cfg_attr(feature = "cli", arg(long))]
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
            num_frozen_tokens: 1,
            encoder_layers: 2,
            encoder_dropout: 0.0,
            init: InitKind::Vocab,
            init_text: None,
            init_from: None,
            init_task: 0,
            tasks: Vec::new(),
            num_ranks: 1,
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
        }
    }
}

impl TrainConfig {
    /// The p-tuning encoder this configuration asks for (`None` for the other methods).
    pub fn encoder_spec(&self) -> Option<EncoderSpec> {
        match self.method {
            Method::PromptTuning | Method::PrefixTuning | Method::Cartridge | Method::MultitaskPromptTuning => None,
            Method::PTuning => Some(EncoderSpec::new(
                self.encoder,
                self.encoder_hidden,
                self.encoder_layers,
                self.encoder_dropout,
            )),
        }
    }

    /// Checks every option on its own (before any file is read or the model is loaded). Each
    /// message names the option as in the TOML file and as a flag, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let at_least_1 = |name: &str, v: usize, what: &str| -> Result<()> {
            if v == 0 {
                bail!("{} is 0; it must be at least 1 ({what})", option(name));
            }
            Ok(())
        };
        at_least_1("batch", self.batch, "rows per micro-batch")?;
        at_least_1("accumulation", self.accumulation, "micro-batches per optimiser step")?;
        at_least_1("eval_batch", self.eval_batch, "rows per evaluation batch")?;
        at_least_1("max_len", self.max_len, "the longest sequence, in tokens")?;
        if let Some(s) = self.steps {
            at_least_1("steps", s, "optimiser steps")?;
        }
        if let Some(n) = self.dev_rows {
            at_least_1("dev_rows", n, "dev rows to score; leave it out to use them all")?;
        }
        if let Some(n) = self.test_rows {
            at_least_1("test_rows", n, "test rows to score; leave it out to use them all")?;
        }
        if let Some(n) = self.patience {
            at_least_1("patience", n, "evaluations without improvement before stopping")?;
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                bail!(
                    "{} is {e}; it must be a finite number > 0 (passes over the training set)",
                    option("epochs")
                );
            }
        }
        let in_range = |name: &str, v: f64, ok: bool, range: &str| -> Result<()> {
            if !ok {
                bail!("{} is {v}; it must be {range}", option(name));
            }
            Ok(())
        };
        let (lr, wd, eps, clip) = (self.lr, self.weight_decay, self.adam_eps, self.clip);
        in_range(
            "lr",
            lr,
            lr.is_finite() && lr > 0.0,
            "a finite number > 0 (the peak learning rate)",
        )?;
        in_range("weight_decay", wd, wd.is_finite() && wd >= 0.0, "a finite number ≥ 0")?;
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            in_range(name, b, (0.0..1.0).contains(&b), "in [0, 1)")?;
        }
        in_range("adam_eps", eps, eps.is_finite() && eps > 0.0, "a finite number > 0")?;
        in_range(
            "clip",
            clip,
            clip.is_finite() && clip >= 0.0,
            "a finite number ≥ 0 (0 = off)",
        )?;
        if self.method == Method::PTuning {
            at_least_1(
                "encoder_hidden",
                self.encoder_hidden,
                "the p-tuning encoder's hidden size",
            )?;
            at_least_1("encoder_layers", self.encoder_layers, "the p-tuning encoder's layers")?;
            let p = self.encoder_dropout;
            in_range("encoder_dropout", p, (0.0..1.0).contains(&p), "in [0, 1)")?;
        }
        if self.resume && self.overwrite {
            bail!(
                "options `resume` (--resume) and `overwrite` (--overwrite) exclude each other: \
                 --resume continues the run in {0}, --overwrite replaces it",
                self.output.display()
            );
        }
        match self.init {
            InitKind::Text if self.init_text.as_deref().is_none_or(|t| t.trim().is_empty()) => bail!(
                "option `init` is \"text\" but {} is not given (or empty): give the text whose \
                 tokens start the prompt",
                option("init_text")
            ),
            InitKind::From if self.init_from.is_none() => bail!(
                "option `init` is \"from\" but {} is not given: give the adapter directory whose \
                 prompt starts this one",
                option("init_from")
            ),
            _ => {}
        }
        self.check_multitask()?;
        self.check_verbalizer()?;
        crate::train::run_template(self)?;
        if let Some(src) = &self.baseline_template {
            crate::train::check_baseline_template(src, &self.target_field)?;
        }
        Ok(())
    }

    /// Number of tasks: the sets of `tasks`, or 1 (the rows of `train`).
    pub fn num_tasks(&self) -> usize {
        self.tasks.len().max(1)
    }

    /// The options of multitask prompt tuning: `tasks` and the source inits belong to it, its
    /// sets replace `train`/`dev`/`test`, and PEFT's AVERAGE/EXACT source inits start one task.
    fn check_multitask(&self) -> Result<()> {
        let mpt = self.method == Method::MultitaskPromptTuning;
        if !mpt && !self.tasks.is_empty() {
            bail!(
                "{} lists {} task sets, but method is `{}`; the task sets are for method \
                 \"multitask-prompt-tuning\" (--method multitask-prompt-tuning)",
                option("tasks"),
                self.tasks.len(),
                serde_json::to_value(self.method)?.as_str().unwrap_or_default()
            );
        }
        if !mpt && self.init.is_source_task() {
            bail!(
                "option `init` is \"{}\", a multitask source init; it needs method \
                 \"multitask-prompt-tuning\"",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default()
            );
        }
        if !mpt {
            return Ok(());
        }
        if self.num_ranks == 0 {
            bail!(
                "{} is 0; it must be at least 1 (the rank of each task's factors)",
                option("num_ranks")
            );
        }
        if self.task == TaskKind::SeqCls {
            bail!(
                "method \"multitask-prompt-tuning\" runs on causal models here (task \"generate\" or \
                 \"classify\"); task \"seq-cls\" would share one classifier head between tasks"
            );
        }
        let given_split = self.dev.is_some() || self.test.is_some() || self.train != Self::default().train;
        if !self.tasks.is_empty() && given_split {
            bail!(
                "{} lists the data sets of every task; leave out options `train`, `dev` and `test` \
                 (each [[tasks]] table has its own train, dev and test)",
                option("tasks")
            );
        }
        if self.init.is_source_task() && self.init_from.is_none() {
            bail!(
                "option `init` is \"{}\" but {} is not given: give the source multitask adapter \
                 (its directory or its adapter_model.safetensors)",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default(),
                option("init_from")
            );
        }
        if matches!(self.init, InitKind::AverageSourceTasks | InitKind::ExactSourceTask) && self.num_tasks() != 1 {
            bail!(
                "option `init` is \"{}\", which starts one target task (as in PEFT), but {} \
                 lists {} tasks; train one task, or use init \"only-source-shared\"",
                serde_json::to_value(self.init)?.as_str().unwrap_or_default(),
                option("tasks"),
                self.tasks.len()
            );
        }
        Ok(())
    }

    /// Verbaliser words must be non-empty and distinct (two labels with one word could never be
    /// told apart).
    fn check_verbalizer(&self) -> Result<()> {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (label, word) in &self.verbalizer {
            if word.trim().is_empty() {
                bail!(
                    "option `verbalizer` (--verbalizer): the word for label `{label}` is empty; \
                     give each label a word, e.g. `{label}= {label}`"
                );
            }
            if let Some(other) = seen.insert(word.as_str(), label.as_str()) {
                bail!(
                    "option `verbalizer` (--verbalizer): labels `{other}` and `{label}` both map to \
                     the word `{word}`; each label needs its own word, or the model cannot tell \
                     them apart"
                );
            }
        }
        Ok(())
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
            Method::PromptTuning | Method::PTuning | Method::MultitaskPromptTuning => None,
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
