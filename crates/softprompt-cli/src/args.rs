//! Argument types shared by the commands: the MODEL argument ([`ModelArg`]), the scoring
//! options of `eval` and `predict` ([`ScoreArgs`]) and the `LABEL=WORD` parser.

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use softprompt::backbone::{self, KernelPath, LoadOptions, LoadedModel, WeightStorage};
use softprompt::infer::options::{ScoreOptions, SCORE_BATCH, SCORE_MAX_LEN};
use softprompt::model_source;
use softprompt::task::TaskKind;
use std::path::PathBuf;

/// Parses `label=word` (the word may start with a space, e.g. `positive= positive`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected LABEL=WORD, got `{s}`"))
}

/// MODEL argument shared by the commands.
#[derive(Args)]
pub struct ModelArg {
    /// A GGUF file, a Hugging Face model directory, a fetched default model
    /// (`smollm2-135m`, `minilm-l6`) or `hf:org/name` (with the `hub` feature, online).
    pub model: String,
    /// How to hold the frozen linear weights: `f32` (converted on load, fastest), `file` (as
    /// the file stores them, e.g. GGUF Q4_1: the same numbers in less memory), or converted at
    /// load to `f16`, `bf16` or `q8_0`.
    #[arg(long, value_enum, default_value = "f32")]
    pub weights: WeightStorage,
    /// Which implementation runs the model: `fused` (the hand-written f32 CPU kernels) or
    /// `composed` (candle ops); the same numbers to rounding. Default: fused (composed when
    /// SOFTPROMPT_COMPOSED is set).
    #[arg(long, value_enum)]
    pub kernels: Option<KernelPath>,
}

impl ModelArg {
    /// Loads the model on the CPU.
    pub fn load(&self) -> Result<LoadedModel> {
        let options = LoadOptions {
            storage: self.weights,
            path: self.kernels,
        };
        load_with(&self.model, options)
    }
}

/// Loads MODEL on the CPU with `options` (how the weights are held, which kernels run them).
pub fn load_with(spec: &str, options: impl Into<LoadOptions>) -> Result<LoadedModel> {
    let location = model_source::resolve(spec)?;
    backbone::load_with(&location, &Device::Cpu, options)
}

/// Arguments shared by `eval` and `predict`.
#[derive(Args)]
pub struct ScoreArgs {
    /// The model to score with.
    #[command(flatten)]
    pub model: ModelArg,
    /// JSONL rows to score.
    #[arg(long)]
    pub data: PathBuf,
    /// Adapter directory (written by `softprompt train` or HF PEFT).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Template (hand-written for a zero-shot baseline, or for a plain PEFT adapter).
    #[arg(long)]
    pub template: Option<String>,
    /// Field holding the target.
    #[arg(long)]
    pub target_field: Option<String>,
    /// Task kind (default: classify on causal models, seq-cls on encoders).
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// LABEL=WORD verbaliser entries (repeatable).
    #[arg(long, value_parser = parse_pair)]
    pub verbalizer: Vec<(String, String)>,
    /// Score only the first N rows.
    #[arg(long)]
    pub rows: Option<usize>,
    /// Also report greedy exact match.
    #[arg(long)]
    pub exact_match: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = SCORE_BATCH)]
    pub batch: usize,
    /// Longest sequence, in tokens (longer than training's default: scoring keeps no
    /// activations for a backward pass, and a truncated row is scored as a different text).
    #[arg(long, default_value_t = SCORE_MAX_LEN)]
    pub max_len: usize,
    /// Let --template replace the template the adapter was trained with.
    #[arg(long)]
    pub force_template: bool,
    /// Task id of every row for a multitask adapter (otherwise each row's `task_id` field).
    #[arg(long)]
    pub task_id: Option<usize>,
}

impl ScoreArgs {
    /// Checks the options before the model loads.
    pub fn check(&self) -> Result<()> {
        if self.rows == Some(0) {
            bail!("--rows 0 leaves no rows to score; give --rows N with N ≥ 1, or leave it out to score every row");
        }
        self.options().check()
    }

    /// The library's scoring options for these arguments (the one conversion).
    pub fn options(&self) -> ScoreOptions {
        ScoreOptions {
            template: self.template.clone(),
            target_field: self.target_field.clone(),
            task: self.task,
            verbalizer: self.verbalizer.iter().cloned().collect(),
            max_len: self.max_len,
            force_template: self.force_template,
            task_id: self.task_id,
            batch: self.batch,
            exact_match: self.exact_match,
        }
    }

    /// Reads `--data`, keeping the first `--rows` rows.
    pub fn read_data(&self) -> Result<softprompt::data::DataSet> {
        let mut data = softprompt::data::read_jsonl(&self.data)?;
        if let Some(n) = self.rows {
            data.records.truncate(n);
        }
        Ok(data)
    }
}
