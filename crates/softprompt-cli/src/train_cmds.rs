//! Training and scoring commands: train, eval, predict.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::session::{self, TaskOptions};
use softprompt::task::TaskKind;
use softprompt::train::{self, TrainConfig};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Parses `label=word` (the word may start with a space, e.g. `positive= positive`).
fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected LABEL=WORD, got `{s}`"))
}

/// Arguments of `train`; every option can also come from `--config FILE.toml` (flags win).
#[derive(Args, Serialize, Default)]
pub struct TrainArgs {
    /// TOML file with any of the options below (same names, snake_case).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// MODEL (GGUF file, HF directory, smollm2-135m, minilm-l6, hf:org/name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Training JSONL.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    train: Option<PathBuf>,
    /// Dev JSONL (evaluation, best checkpoint, early stopping).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dev: Option<PathBuf>,
    /// Test JSONL (zero-shot baseline and final score).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    test: Option<PathBuf>,
    /// Template, e.g. "[soft:4] Review: {text} [soft:2] Sentiment: {label}".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
    /// Hand-written template scored on the test set before training.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_template: Option<String>,
    /// Field holding the target.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_field: Option<String>,
    /// generate | classify | seq-cls.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    /// LABEL=WORD verbaliser entries (repeatable).
    #[arg(long, value_parser = parse_pair)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    verbalizer: Vec<(String, String)>,
    /// prompt-tuning | p-tuning.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    /// Virtual tokens prepended when the template has none.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_virtual_tokens: Option<usize>,
    /// mlp | lstm (p-tuning).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder: Option<String>,
    /// P-tuning encoder hidden size.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder_hidden: Option<usize>,
    /// LSTM layers.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder_layers: Option<usize>,
    /// LSTM dropout.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    encoder_dropout: Option<f64>,
    /// random | random-normal | vocab | labels | text | from.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<String>,
    /// Text for --init text.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    init_text: Option<String>,
    /// Adapter directory for --init from.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    init_from: Option<PathBuf>,
    /// Peak learning rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup: Option<usize>,
    /// constant | linear | cosine.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<String>,
    /// Optimiser steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    /// Epochs (when --steps is not given).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    epochs: Option<f64>,
    /// Rows per micro-batch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// Micro-batches per step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    accumulation: Option<usize>,
    /// Gradient-norm clipping (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    clip: Option<f64>,
    /// Evaluate on dev every N steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<usize>,
    /// Use the first N dev rows.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_rows: Option<usize>,
    /// Use the first N test rows.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    test_rows: Option<usize>,
    /// Early-stopping patience (evaluations).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    patience: Option<usize>,
    /// Seed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Output directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<PathBuf>,
    /// Longest sequence; longer rows get their fields truncated.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_len: Option<usize>,
    /// Report greedy exact match too.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    exact_match: bool,
    /// Continue from OUTPUT/checkpoint-last.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resume: bool,
}

fn as_map<S: serde::Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    let m: BTreeMap<&str, &str> = v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    m.serialize(s)
}

/// Merges the TOML file (if any) with the flags (flags win) into a configuration.
fn config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut table = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("{} is not valid TOML", path.display()))?
        }
        None => toml::Table::new(),
    };
    let flags = toml::Table::try_from(args).context("cannot read the flags")?;
    for (k, v) in flags {
        table.insert(k, v);
    }
    let origin = args
        .config
        .as_ref()
        .map_or("the flags".to_string(), |p| format!("{} and the flags", p.display()));
    toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("invalid training options in {origin}"))
}

struct Bar {
    bar: Option<ProgressBar>,
}

impl train::Observer for Bar {
    fn start(&mut self, total: usize, done: usize) {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .expect("valid template"),
        );
        bar.set_position(done as u64);
        self.bar = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f32, lr: f64, examples_per_s: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {examples_per_s:.1} ex/s"));
        }
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
}

pub fn train_cmd(args: TrainArgs) -> Result<()> {
    let cfg = config(&args)?;
    let mut bar = Bar { bar: None };
    let report = train::train(&cfg, &mut bar)?;
    if let Some(b) = &bar.bar {
        b.finish_and_clear();
    }
    let summary = serde_json::json!({
        "baseline_test_accuracy": report.baseline_test.as_ref().map(|r| r.accuracy),
        "test_accuracy": report.test.as_ref().map(|r| r.accuracy),
        "test_exact_match": report.test.as_ref().and_then(|r| r.exact_match),
        "test_rows": report.test.as_ref().map(|r| r.n),
        "best_dev_accuracy": report.best_dev.map(|b| b.0),
        "best_step": report.best_dev.map(|b| b.1),
        "steps": report.steps,
        "train_seconds": report.train_seconds,
        "seconds_per_step": report.train_seconds / report.steps.max(1) as f64,
        "truncated_train_rows": report.truncated_train_rows,
        "stopped_early": report.stopped_early,
        "adapter": report.adapter_dir,
        "plot": report.adapter_dir.join("training.png"),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Arguments shared by `eval` and `predict`.
#[derive(Args)]
pub struct ScoreArgs {
    /// MODEL.
    model: String,
    /// JSONL rows to score.
    #[arg(long)]
    data: PathBuf,
    /// Adapter directory (written by `softprompt train` or HF PEFT).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Template (hand-written for a zero-shot baseline, or for a plain PEFT adapter).
    #[arg(long)]
    template: Option<String>,
    /// Field holding the target.
    #[arg(long)]
    target_field: Option<String>,
    /// generate | classify | seq-cls.
    #[arg(long)]
    task: Option<String>,
    /// LABEL=WORD verbaliser entries (repeatable).
    #[arg(long, value_parser = parse_pair)]
    verbalizer: Vec<(String, String)>,
    /// Score only the first N rows.
    #[arg(long)]
    rows: Option<usize>,
    /// Also report greedy exact match.
    #[arg(long)]
    exact_match: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Longest sequence.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
}

fn parse_task(s: &str) -> Result<TaskKind> {
    Ok(match s {
        "generate" => TaskKind::Generate,
        "classify" => TaskKind::Classify,
        "seq-cls" => TaskKind::SeqCls,
        other => bail!("--task `{other}`: expected generate, classify or seq-cls"),
    })
}

fn score(args: &ScoreArgs) -> Result<(softprompt::infer::evaluate::EvalResult, softprompt::data::DataSet)> {
    let model = crate::model_cmds::load(&args.model)?;
    let mut data = read_jsonl(&args.data)?;
    if let Some(n) = args.rows {
        data.records.truncate(n);
    }
    let opts = TaskOptions {
        template: args.template.clone(),
        target_field: args.target_field.clone(),
        task: args.task.as_deref().map(parse_task).transpose()?,
        verbalizer: args.verbalizer.iter().cloned().collect(),
        max_len: args.max_len,
    };
    let s = session::open(&model, args.adapter.as_deref(), &opts, &[&data])?;
    let examples = s.task.encode_set(&data, &model.tokenizer)?;
    if examples.truncated > 0 {
        eprintln!(
            "warning: {} rows were longer than --max-len {} and had their fields truncated",
            examples.truncated, args.max_len
        );
    }
    let scorer = Scorer {
        backbone: model.backbone.as_ref(),
        tokenizer: &model.tokenizer,
        task: &s.task,
        prompt: s.prompt.as_ref(),
        head: s.head.as_ref(),
    };
    Ok((scorer.evaluate(&examples.examples, args.batch, args.exact_match)?, data))
}

pub fn eval_cmd(args: ScoreArgs) -> Result<()> {
    let (r, _) = score(&args)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// Arguments of `predict`.
#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    score: ScoreArgs,
    /// Output JSONL (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn predict_cmd(args: PredictArgs) -> Result<()> {
    let (r, data) = score(&args.score)?;
    let mut out = Vec::new();
    for (rec, p) in data.records.iter().zip(&r.predictions) {
        let mut row = rec.row.clone();
        row.insert("prediction".into(), serde_json::json!(p.predicted));
        row.insert("scores".into(), serde_json::json!(p.scores));
        if let Some(g) = &p.generated {
            row.insert("generated".into(), serde_json::json!(g));
        }
        writeln!(out, "{}", serde_json::Value::Object(row))?;
    }
    match &args.output {
        Some(path) => softprompt::io::write_bytes(path, &out)?,
        None => std::io::stdout().write_all(&out)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(argv: &[&str]) -> TrainArgs {
        Wrapper::try_parse_from(std::iter::once("train").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flags_override_the_toml_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("softprompt-cli-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            "lr = 0.5\nsteps = 7\nmethod = \"p-tuning\"\nencoder = \"lstm\"\n[verbalizer]\npositive = \" good\"\n",
        )
        .unwrap();
        let cfg = config(&parse(&[
            "--config",
            path.to_str().unwrap(),
            "--lr",
            "0.1",
            "--verbalizer",
            "negative= bad",
        ]))
        .unwrap();
        assert_eq!(cfg.lr, 0.1);
        assert_eq!(cfg.steps, Some(7));
        assert_eq!(cfg.method, train::Method::PTuning);
        assert_eq!(cfg.encoder, train::EncoderKind::Lstm);
        assert_eq!(cfg.batch, TrainConfig::default().batch);
        // A flag given as a table replaces the file's table.
        assert_eq!(cfg.verbalizer.get("negative").map(String::as_str), Some(" bad"));
    }

    #[test]
    fn unknown_or_malformed_options_name_the_file() {
        let dir = std::env::temp_dir().join(format!("softprompt-cli-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "learning_rate = 0.1\n").unwrap();
        let e = format!(
            "{:#}",
            config(&parse(&["--config", path.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
        std::fs::write(&path, "lr = [oops\n").unwrap();
        let e = format!(
            "{:#}",
            config(&parse(&["--config", path.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("bad.toml") && e.contains("not valid TOML"), "{e}");
        let e = format!("{:#}", config(&parse(&["--method", "lora"])).unwrap_err());
        assert!(e.contains("lora"), "{e}");
    }
}
