//! The training loop: AdamW with warm-up and decay, gradient accumulation and clipping,
//! evaluation every N steps, early stopping, the best checkpoint kept as a PEFT adapter, a
//! resumable training state, `metrics.jsonl` and a loss/accuracy plot.
//!
//! [`train`] runs named steps, each usable on its own: [`prepare`] (model and data),
//! [`new_learner`] (initial parameters), [`step()`] (one optimiser step), [`evaluate_dev`]
//! (dev accuracy and the best-so-far bookkeeping), [`checkpoint`] (best adapter, resumable
//! state, plot) and [`evaluate_test`] (the best adapter on the test set).
//!
//! Reproducibility: the initialisation and the data order are functions of the seed and the
//! step number only (each epoch's order is a permutation seeded by `seed + epoch`), so two runs
//! with the same seed are identical bit for bit on the CPU, and a resumed run continues exactly
//! where an uninterrupted one would be.

pub mod learner;
pub mod optim;
pub mod plot;
pub mod prefix;
pub mod prepare;
pub mod step;

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::adapter::{self, run_files};
pub use crate::config::{EncoderKind, InitKind, Method, TrainConfig};
use crate::infer::evaluate::{EvalResult, Scorer};
use crate::loss::ClassifierHead;
use crate::task::Task;
use crate::template::Template;
pub use learner::{new_learner, save_adapter, Learned, Learner, HEAD_BIAS, HEAD_WEIGHT};
pub use prepare::{prepare, run_template, Prepared};
pub use run_files::Progress;
pub use step::{step, total_steps, DataOrder, StepResult};

/// Receives progress; the CLI draws a progress bar, tests ignore it.
pub trait Observer {
    /// Training starts (`total` steps, starting after `done`).
    fn start(&mut self, total: usize, done: usize) {
        let _ = (total, done);
    }
    /// One optimiser step finished.
    fn step(&mut self, step: usize, loss: f32, lr: f64, examples_per_s: f64) {
        let _ = (step, loss, lr, examples_per_s);
    }
    /// A line of news (evaluation results, warnings).
    fn message(&mut self, text: &str) {
        let _ = text;
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// Zero-shot accuracy of the baseline template on the test set.
    pub baseline_test: Option<EvalResult>,
    /// Test metrics of the best checkpoint.
    pub test: Option<EvalResult>,
    /// Best dev accuracy and its step.
    pub best_dev: Option<(f64, usize)>,
    /// Optimiser steps taken in total.
    pub steps: usize,
    /// Wall-clock seconds of the training loop.
    pub train_seconds: f64,
    /// Training rows whose fields were truncated to `max_len`.
    pub truncated_train_rows: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Where the adapter was written.
    pub adapter_dir: PathBuf,
}

/// Scores a hand-written template (no virtual tokens) on the prepared test set.
pub fn evaluate_baseline(p: &Prepared, template: &str) -> Result<Option<EvalResult>> {
    let Some(test_set) = &p.test_set else { return Ok(None) };
    let t = Template::parse(template)
        .context("option `baseline_template`")?
        .with_target(&p.cfg.target_field)?;
    if t.num_virtual_tokens() > 0 {
        bail!("option `baseline_template` must be hand-written (no [soft:..] tokens)");
    }
    let task = Task::new(
        p.task.kind,
        t,
        p.task.labels.clone(),
        &p.cfg.verbalizer,
        &p.model.tokenizer,
        p.cfg.max_len,
    )?;
    let examples = task.encode_set(test_set, &p.model.tokenizer)?.examples;
    let scorer = Scorer::new(&p.model, &task, None, None)?;
    Ok(Some(scorer.evaluate(&examples, p.cfg.eval_batch, p.cfg.exact_match)?))
}

/// Scores the learner on the dev set and updates the best-so-far bookkeeping of `progress`.
/// Returns whether this is the best evaluation so far (always true without a dev set), and the
/// result (None without a dev set).
pub fn evaluate_dev(p: &Prepared, learner: &Learner, progress: &mut Progress) -> Result<(bool, Option<EvalResult>)> {
    if p.dev.is_empty() {
        return Ok((true, None));
    }
    let step = progress.step;
    let (prompt, prefix) = learner.prompt.eval_parts()?;
    let r = Scorer::new(&p.model, &p.task, prompt.as_ref(), learner.head.as_ref())?
        .with_prefix(prefix.as_ref())
        .evaluate(&p.dev, p.cfg.eval_batch, false)?;
    progress.dev.push((step, r.accuracy));
    let better = progress.best.is_none_or(|(b, _)| r.accuracy > b);
    if better {
        progress.best = Some((r.accuracy, step));
        progress.evals_since_best = 0;
    } else {
        progress.evals_since_best += 1;
    }
    Ok((better, Some(r)))
}

/// Writes what an evaluation leaves behind: the adapter when it `improved`, the resumable
/// state in `OUTPUT/checkpoint-last`, and the plot.
pub fn checkpoint(p: &Prepared, learner: &Learner, progress: &Progress, improved: bool) -> Result<()> {
    let out = &p.cfg.output;
    if improved {
        save_adapter(p, learner, out)?;
    }
    learner::save_checkpoint(p, learner, progress, &out.join("checkpoint-last"))?;
    plot::write_plot(&out.join("training.png"), &progress.losses, &progress.dev)
}

/// Scores the best adapter of the run (read back from `OUTPUT`) on the test set.
pub fn evaluate_test(p: &Prepared) -> Result<Option<EvalResult>> {
    if p.test.is_empty() {
        return Ok(None);
    }
    let best = adapter::load_peft(&p.cfg.output)?;
    let device = p.model.backbone.device();
    let prefix = best.prefix_cache(p.model.backbone.info())?;
    let prefix = prefix.map(|c| c.to_device(device)).transpose()?;
    let prompt = match prefix {
        Some(_) => None,
        None => Some(best.input_prompt()?.to_device(device)?),
    };
    let head = ClassifierHead::from_adapter(&best)?;
    let scorer = Scorer::new(&p.model, &p.task, prompt.as_ref(), head.as_ref())?.with_prefix(prefix.as_ref());
    Ok(Some(scorer.evaluate(&p.test, p.cfg.eval_batch, p.cfg.exact_match)?))
}

/// Runs a whole training job: baseline, training with evaluation, best adapter, test score.
pub fn train(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainReport> {
    let p = prepare(cfg, obs)?;
    let baseline_test = match &cfg.baseline_template {
        Some(t) => evaluate_baseline(&p, t)?,
        None => None,
    };
    if let Some(r) = &baseline_test {
        obs.message(&format!(
            "zero-shot baseline on test ({} rows): accuracy {:.1}%",
            r.n,
            100.0 * r.accuracy
        ));
    }
    let mut learner = new_learner(&p)?;
    let total = total_steps(cfg, p.train.len())?;
    let out = &cfg.output;
    let mut progress = Progress::default();
    if cfg.resume {
        let last_dir = out.join("checkpoint-last");
        progress = learner.restore(run_files::load_checkpoint(&last_dir)?, &last_dir)?;
        obs.message(&format!(
            "resumed from {} at step {}",
            last_dir.display(),
            progress.step
        ));
    }
    let mut order = DataOrder::new(cfg.seed, p.train.len());
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(cfg.resume)
        .write(true)
        .truncate(!cfg.resume)
        .open(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    obs.start(total, progress.step);
    let started = Instant::now();
    let mut stopped_early = false;
    let examples_per_step = (cfg.batch * cfg.accumulation) as f64;
    while progress.step < total {
        let n = progress.step + 1;
        let t0 = Instant::now();
        let s = step(&p, &mut learner, &mut order, n, total)?;
        progress.step = n;
        let eps = examples_per_step / t0.elapsed().as_secs_f64().max(1e-9);
        obs.step(n, s.loss, s.lr, eps);
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": n, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "examples_per_s": eps})
        )?;
        progress.losses.push((n, s.loss));
        if !((cfg.eval_every > 0 && n % cfg.eval_every == 0) || n == total) {
            continue;
        }
        let (improved, dev) = evaluate_dev(&p, &learner, &mut progress)?;
        if let Some(r) = dev {
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": n, "dev_accuracy": r.accuracy, "dev_rows": r.n})
            )?;
            obs.message(&format!(
                "step {n}: dev accuracy {:.1}% ({} rows){}",
                100.0 * r.accuracy,
                r.n,
                if improved { ", best so far" } else { "" }
            ));
        }
        checkpoint(&p, &learner, &progress, improved)?;
        if cfg.patience.is_some_and(|pat| progress.evals_since_best >= pat) {
            obs.message(&format!(
                "early stopping at step {n}: no dev improvement in {} evaluations",
                progress.evals_since_best
            ));
            stopped_early = true;
            break;
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let test = evaluate_test(&p)?;
    if let Some(r) = &test {
        obs.message(&format!(
            "trained prompt on test ({} rows): accuracy {:.1}%",
            r.n,
            100.0 * r.accuracy
        ));
    }
    Ok(TrainReport {
        baseline_test,
        test,
        best_dev: progress.best,
        steps: progress.step,
        train_seconds,
        truncated_train_rows: p.truncated_train,
        stopped_early,
        adapter_dir: out.clone(),
    })
}
