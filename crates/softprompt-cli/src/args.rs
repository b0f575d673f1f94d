//! Argument types shared by the commands: the MODEL argument ([`ModelArg`]), the scoring
//! options of `eval` and `predict` ([`ScoreArgs`]), the `LABEL=WORD` parser, the value parsers
//! of number flags ([`whole`], [`real`]: a value out of range is refused naming the flag and
//! its range) and [`allow_negative_numbers`] (`--steps -1` is a value, not an unknown flag).

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use softprompt::backbone::{self, KernelPath, LoadOptions, LoadedModel, WeightStorage};
use softprompt::config::flags::WholeNumber;
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

/// Lets every option of `cmd` and of its subcommands that takes a value take a negative number
/// (`--steps -1`, `--temperature -1`): the option's own parser or check then refuses it naming
/// the option and its range, where clap would say "unexpected argument '-1' found".
pub fn allow_negative_numbers(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    })
    .mut_subcommands(allow_negative_numbers)
}

/// The value parser of whole-number flag `flag` (as written, `--max-tokens`): at least
/// `least`; `what` (what it counts) ends the message, e.g. "--max-tokens is -5; it must be at
/// least 1 (the most tokens to generate)".
pub fn whole(flag: &'static str, least: u64, what: &'static str) -> WholeNumber<usize> {
    WholeNumber::flag(flag, least, what)
}

/// The value parser of real-number flag `flag`: a number for which `ok` holds, `range` saying
/// which (e.g. "a finite number ≥ 0 (0: greedy)"); otherwise "--temperature is -1; it must be
/// a finite number ≥ 0 (0: greedy)".
pub fn real(flag: &'static str, ok: fn(f32) -> bool, range: &'static str) -> RealNumber {
    RealNumber { flag, ok, range }
}

/// See [`real`].
#[derive(Clone)]
pub struct RealNumber {
    /// The flag as written (`--temperature`).
    flag: &'static str,
    /// Whether a value is in range.
    ok: fn(f32) -> bool,
    /// The range in words.
    range: &'static str,
}

impl RealNumber {
    /// Parses `text`; the error is the message.
    fn parse_text(&self, text: &str) -> Result<f32, String> {
        let (flag, range) = (self.flag, self.range);
        match text.trim().parse::<f32>() {
            Ok(v) if (self.ok)(v) => Ok(v),
            Ok(v) => Err(format!("{flag} is {v}; it must be {range}")),
            Err(_) => Err(format!("{flag} is `{text}`; it must be {range}")),
        }
    }
}

impl clap::builder::TypedValueParser for RealNumber {
    type Value = f32;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<f32, clap::Error> {
        self.parse_text(&value.to_string_lossy())
            .map_err(|m| clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{m}\n")))
    }
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
    /// Template (hand-written for a zero-shot baseline, or for a plain PEFT adapter; default:
    /// the adapter's).
    #[arg(long)]
    pub template: Option<String>,
    /// Field holding the target (default: the adapter's, else `label`).
    #[arg(long)]
    pub target_field: Option<String>,
    /// Task kind (default: the adapter's; without an adapter, classify on causal models and
    /// seq-cls on encoders).
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// LABEL=WORD verbaliser entries (repeatable; default: the adapter's, else each label is its
    /// own word).
    #[arg(long, value_parser = parse_pair)]
    pub verbalizer: Vec<(String, String)>,
    /// Score only the first N rows (default: all).
    #[arg(long, value_parser = whole("--rows", 1, "rows to score; leave it out to score every row"))]
    pub rows: Option<usize>,
    /// Also report greedy exact match.
    #[arg(long)]
    pub exact_match: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = SCORE_BATCH, value_parser = whole("--batch", 1, "rows per batch"))]
    pub batch: usize,
    /// Longest sequence, in tokens (longer than training's default: scoring keeps no
    /// activations for a backward pass, and a truncated row is scored as a different text).
    #[arg(long, default_value_t = SCORE_MAX_LEN, value_parser = whole("--max-len", 1, "the longest sequence, in tokens"))]
    pub max_len: usize,
    /// Let --template replace the template the adapter was trained with.
    #[arg(long)]
    pub force_template: bool,
    /// Task id of every row for a multitask adapter (otherwise each row's `task_id` field).
    #[arg(long, value_parser = whole("--task-id", 0, "a task id of the multitask adapter"))]
    pub task_id: Option<usize>,
}

impl ScoreArgs {
    /// Checks the options before the model loads.
    pub fn check(&self) -> Result<()> {
        if self.rows == Some(0) {
            bail!("--rows is 0; it must be at least 1 (rows to score; leave it out to score every row)");
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
