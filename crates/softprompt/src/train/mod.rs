//! The training loop: AdamW with warm-up and decay, gradient accumulation and clipping,
//! evaluation every N steps, early stopping, the best checkpoint kept as a PEFT adapter, a
//! resumable training state, `metrics.jsonl` and a loss/accuracy plot.
//!
//! [`train`] runs named steps, each usable on its own: [`prepare()`] (model and data),
//! [`new_learner`] (initial parameters), [`step()`] (one optimiser step), [`evaluate_dev`]
//! (dev accuracy and the best-so-far bookkeeping), [`checkpoint()`] (best adapter, resumable
//! state, plot) and [`evaluate_test`] (the best adapter on the test set).
//!
//! Reproducibility: the initialisation and the data order are functions of the seed and the
//! step number only (each epoch's order is a permutation seeded by `seed + epoch`), so two runs
//! with the same seed are identical bit for bit on the CPU, and a resumed run continues exactly
//! where an uninterrupted one would be.

pub mod checkpoint;
pub mod collective;
pub mod cpt;
pub mod dept;
pub mod late_prompt;
pub mod learned;
pub mod learner;
pub mod multitask;
pub mod optim;
pub mod output;
pub mod parallel;
pub mod prefix;
pub mod prepare;
pub mod step;

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::adapter;
use crate::backbone::KvCache;
pub use crate::config::{check_baseline_template, run_template};
pub use crate::config::{EncoderKind, InitKind, Method, TrainConfig};
use crate::infer::evaluate::{EvalResult, Scorer};
use crate::loss::ClassifierHead;
use crate::task::{Example, Task};
pub use checkpoint::Progress;
pub use collective::{Collective, Single};
pub use learner::{new_learner, save_adapter, Learned, LearnedPrompt, Learner, HEAD_BIAS, HEAD_WEIGHT};
pub use output::OutputDir;
pub use prepare::{prepare, Prepared, TaskSplit};
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
#[derive(Debug, Default, Clone, Copy)]
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
    /// Optimiser steps taken in total (a resumed run's earlier steps included).
    pub steps: usize,
    /// Optimiser steps taken by this invocation (fewer than `steps` after `resume`).
    pub steps_run: usize,
    /// Wall-clock seconds of this invocation's training loop.
    pub train_seconds: f64,
    /// Training rows whose fields were truncated to `max_len`.
    pub truncated_train_rows: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Where the adapter was written.
    pub adapter_dir: PathBuf,
}

/// What enters the model besides the input prompt: a key/value prefix (prefix tuning,
/// Cartridges) or DePT's update of the input embeddings.
#[derive(Default, Clone, Copy)]
struct Entry<'a> {
    prefix: Option<&'a KvCache>,
    update: Option<&'a Tensor>,
}

/// Scores every task's `rows` (one list per task id), each task with its own labels and its rows of `prompt`
/// (`[p, d]`, or a multitask prompt's stacked `[tasks·p, d]`); several tasks are joined by
/// [`EvalResult::by_task`]. `task_of` may replace a task's definition (the baseline template).
/// None when no task has rows.
fn evaluate_split(
    p: &Prepared,
    prompt: Option<&Tensor>,
    head: Option<&ClassifierHead>,
    entry: Entry<'_>,
    rows: &[&[Example]],
    exact_match: bool,
    task_of: &dyn Fn(&TaskSplit) -> Result<Option<Task>>,
) -> Result<Option<EvalResult>> {
    let mut parts = Vec::new();
    let mut position = 0;
    for ((id, t), &rows) in p.tasks.iter().enumerate().zip(rows) {
        if rows.is_empty() {
            continue;
        }
        // Late prompt tuning: the key/value prefix stands for the rows' leading virtual tokens.
        let stripped = (prompt.is_none() && entry.prefix.is_some()).then(|| late_prompt::without_virtual_tokens(rows));
        let rows = stripped.as_deref().unwrap_or(rows);
        let own = task_of(t)?;
        let task = own.as_ref().unwrap_or(&t.task);
        let task_prompt = match prompt {
            Some(m) if p.tasks.len() > 1 => {
                let v = m.dim(0)? / p.tasks.len();
                Some(m.narrow(0, id * v, v)?)
            }
            other => other.cloned(),
        };
        let scorer = Scorer::new(&p.model, task, task_prompt.as_ref(), head)?
            .with_prefix(entry.prefix)
            .with_input_update(entry.update);
        let comm = &*p.comm;
        let r = if comm.size() == 1 {
            scorer.evaluate(rows, p.cfg.eval_batch, exact_match)?
        } else {
            // Each rank scores its share of the rows; every rank gets all predictions.
            let mine = &rows[collective::share(rows.len(), comm.rank(), comm.size())];
            let local = match mine.is_empty() {
                true => Vec::new(),
                false => scorer.evaluate(mine, p.cfg.eval_batch, exact_match)?.predictions,
            };
            EvalResult::from_predictions(parallel::gather_predictions(comm, &local)?, exact_match)
        };
        parts.push((id, (position..position + rows.len()).collect(), r));
        position += rows.len();
    }
    match parts.len() {
        0 => Ok(None),
        1 if p.tasks.len() == 1 => Ok(parts.pop().map(|(_, _, r)| r)),
        _ => Ok(Some(EvalResult::by_task(parts)?)),
    }
}

/// Scores a hand-written template (no virtual tokens) on the prepared test set(s).
pub fn evaluate_baseline(p: &Prepared, template: &str) -> Result<Option<EvalResult>> {
    let t = check_baseline_template(template, &p.cfg.target_field)?;
    let baseline = |s: &TaskSplit| -> Result<Option<Task>> {
        Ok(Some(Task::new(
            s.task.kind,
            t.clone(),
            s.task.labels.clone(),
            &p.cfg.verbalizer,
            &p.model.tokenizer,
            p.cfg.max_len,
        )?))
    };
    // The test rows rendered with the baseline template (no virtual tokens).
    let mut test: Vec<Vec<Example>> = Vec::with_capacity(p.tasks.len());
    for s in &p.tasks {
        let rows = match (&s.test_set, baseline(s)?) {
            (Some(set), Some(task)) => task.encode_set(set, &p.model.tokenizer)?.examples,
            _ => Vec::new(),
        };
        test.push(rows);
    }
    let rows: Vec<&[Example]> = test.iter().map(Vec::as_slice).collect();
    evaluate_split(p, None, None, Entry::default(), &rows, p.cfg.exact_match, &baseline)
}

/// Scores the learner on the dev set(s) and updates the best-so-far bookkeeping of `progress`.
/// Returns whether this is the best evaluation so far (always true without a dev set), and the
/// result (None without a dev set; for several tasks the mean of the tasks' accuracies).
pub fn evaluate_dev(p: &Prepared, learner: &Learner, progress: &mut Progress) -> Result<(bool, Option<EvalResult>)> {
    let step = progress.step;
    let (prompt, prefix) = learner.prompt.eval_parts(&*p.model.backbone)?;
    let update = learner.prompt.input_update()?;
    let entry = Entry {
        prefix: prefix.as_ref(),
        update: update.as_ref(),
    };
    let Some(r) = evaluate_split(
        p,
        prompt.as_ref(),
        learner.head.as_ref(),
        entry,
        &p.tasks.iter().map(|t| t.dev.as_slice()).collect::<Vec<_>>(),
        false,
        &|_| Ok(None),
    )?
    else {
        return Ok((true, None));
    };
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
    let out = &p.out_dir;
    if improved {
        save_adapter(p, learner, out)?;
    }
    learner::save_checkpoint(p, learner, progress, &out.join("checkpoint-last"))?;
    crate::plot::training_chart(&out.join("training.png"), &progress.losses, &progress.dev)
}

/// Scores the best adapter of the run (read back from the run's folder) on the test set(s).
pub fn evaluate_test(p: &Prepared) -> Result<Option<EvalResult>> {
    if p.tasks.iter().all(|t| t.test.is_empty()) {
        return Ok(None);
    }
    let best = adapter::load_peft(&p.out_dir)?;
    let device = p.model.backbone.device();
    let prefix = crate::infer::late_prompt::adapter_prefix(&*p.model.backbone, &best)?;
    let prefix = prefix.map(|c| c.to_device(device)).transpose()?;
    let prompt = match (&prefix, best.is_multitask()) {
        (Some(_), _) => None,
        (None, true) => Some(best.to_soft_prompt()?.forward()?.to_device(device)?),
        (None, false) => Some(best.input_prompt()?.to_device(device)?),
    };
    let head = ClassifierHead::from_adapter(&best)?;
    let update = best.input_update()?.map(|u| u.to_device(device)).transpose()?;
    let entry = Entry {
        prefix: prefix.as_ref(),
        update: update.as_ref(),
    };
    evaluate_split(
        p,
        prompt.as_ref(),
        head.as_ref(),
        entry,
        &p.tasks.iter().map(|t| t.test.as_slice()).collect::<Vec<_>>(),
        p.cfg.exact_match,
        &|_| Ok(None),
    )
}

/// ` (task 0 70.0%, task 1 90.0%; mean)` for a multitask result, nothing otherwise.
fn per_task(r: &EvalResult) -> String {
    if r.tasks.is_empty() {
        return String::new();
    }
    let each: Vec<String> = r
        .tasks
        .iter()
        .map(|t| format!("task {} {:.1}%", t.task, 100.0 * t.accuracy))
        .collect();
    format!(" ({}; the mean over tasks)", each.join(", "))
}

/// Runs a whole training job: baseline, training with evaluation, best adapter, test score.
///
/// Nothing is lost: the options are checked before anything is read; a folder that holds a run
/// is only continued (`resume`) or replaced (`overwrite`, written beside it and swapped in at the
/// end) when asked; a run that fails leaves what was there before unchanged (see
/// [`OutputDir`]).
pub fn train(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainReport> {
    train_with(cfg, obs, std::rc::Rc::new(Single))
}

/// [`train`] as one of the processes of `comm` (data parallelism, see [`parallel`]): every
/// rank loads the model and data and takes its share of each batch and evaluation; the ranks
/// take the same optimiser steps. Only rank 0 claims, writes and commits the output folder;
/// the options, model files and data must be the same on every rank (checked at start).
pub fn train_with(cfg: &TrainConfig, obs: &mut dyn Observer, comm: std::rc::Rc<dyn Collective>) -> Result<TrainReport> {
    cfg.validate()?;
    if comm.rank() != 0 {
        let scratch = parallel::Scratch::new(comm.rank())?;
        return run(cfg, scratch.path(), obs, &mut false, comm.clone(), Some(&scratch));
    }
    for w in cfg.options_without_effect() {
        obs.message(&format!("warning: {w}"));
    }
    let out = OutputDir::claim(cfg)?;
    let mut training = false;
    match run(cfg, out.work(), obs, &mut training, comm, None) {
        Ok(report) => {
            out.commit()?;
            Ok(report)
        }
        Err(e) => Err(out.abandon(e, training)),
    }
}

/// The job of [`train`], writing into `work` (rank 0; the other ranks of `comm` write nothing
/// and receive rank 0's files in `scratch`); sets `training` once the training loop starts.
fn run(
    cfg: &TrainConfig,
    work: &Path,
    obs: &mut dyn Observer,
    training: &mut bool,
    comm: std::rc::Rc<dyn Collective>,
    scratch: Option<&parallel::Scratch>,
) -> Result<TrainReport> {
    let mut p = prepare(cfg, obs)?;
    p.out_dir = work.to_path_buf();
    p.comm = comm.clone();
    let comm = &*comm;
    let writer = comm.rank() == 0;
    if comm.size() > 1 {
        collective::check_same(comm, "options, model files or data", &parallel::inputs_digest(&p)?)?;
    }
    let baseline_test = match &cfg.baseline_template {
        Some(t) => evaluate_baseline(&p, t)?,
        None => None,
    };
    if let Some(r) = &baseline_test {
        obs.message(&format!(
            "zero-shot baseline on test ({} rows): accuracy {:.1}%{}",
            r.n,
            100.0 * r.accuracy,
            per_task(r)
        ));
    }
    let mut learner = new_learner(&p)?;
    let total = total_steps(cfg, p.train.len())?;
    let mut progress = Progress::default();
    if cfg.resume {
        let last_dir = work.join(output::CHECKPOINT_DIR);
        let files = ["state.json", "state.safetensors"];
        let read_from = parallel::mirror(comm, &last_dir, &files, scratch, output::CHECKPOINT_DIR)?;
        progress = learner.restore(checkpoint::load_checkpoint(&read_from)?, &last_dir)?;
        if progress.step >= total {
            bail!(
                "nothing to resume: the checkpoint in {} is at step {}, and this run has {total} \
                 steps; raise {} to train further",
                last_dir.display(),
                progress.step,
                crate::config::option("steps")
            );
        }
        obs.message(&format!(
            "resumed from {} at step {}",
            last_dir.display(),
            progress.step
        ));
    }
    let mut order = p.data_order();
    let mut metrics = match writer {
        true => Some(output::open_metrics(work, cfg.resume.then_some(progress.step))?),
        false => None,
    };
    let mut log = |line: serde_json::Value| -> Result<()> {
        if let Some(m) = metrics.as_mut() {
            writeln!(m, "{line}")?;
        }
        Ok(())
    };
    obs.start(total, progress.step);
    *training = true;
    let first_step = progress.step;
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
        let line =
            serde_json::json!({"step": n, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "examples_per_s": eps});
        log(line)?;
        progress.losses.push((n, s.loss));
        if !((cfg.eval_every > 0 && n % cfg.eval_every == 0) || n == total) {
            continue;
        }
        let (improved, dev) = evaluate_dev(&p, &learner, &mut progress)?;
        if let Some(r) = dev {
            let mut line = serde_json::json!({"step": n, "dev_accuracy": r.accuracy, "dev_rows": r.n});
            if !r.tasks.is_empty() {
                line["dev_tasks"] = serde_json::to_value(&r.tasks)?;
            }
            log(line)?;
            obs.message(&format!(
                "step {n}: dev accuracy {:.1}% ({} rows){}{}",
                100.0 * r.accuracy,
                r.n,
                per_task(&r),
                if improved { ", best so far" } else { "" }
            ));
        }
        if writer {
            checkpoint(&p, &learner, &progress, improved)?;
        }
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
    *training = false;
    // The best adapter is in rank 0's folder; the other ranks test a copy of it.
    let adapter_files = [
        adapter::ADAPTER_CONFIG,
        adapter::ADAPTER_WEIGHTS,
        adapter::run_files::TASK_FILE,
        adapter::run_files::PROMPT_FILE,
    ];
    p.out_dir = parallel::mirror(comm, work, &adapter_files, scratch, "best")?;
    let test = evaluate_test(&p)?;
    comm.barrier()?;
    if let Some(r) = &test {
        obs.message(&format!(
            "trained prompt on test ({} rows): accuracy {:.1}%{}",
            r.n,
            100.0 * r.accuracy,
            per_task(r)
        ));
    }
    Ok(TrainReport {
        baseline_test,
        test,
        best_dev: progress.best,
        steps: progress.step,
        steps_run: progress.step - first_step,
        train_seconds,
        truncated_train_rows: p.truncated_train,
        stopped_early,
        adapter_dir: cfg.output.clone(),
    })
}
