//! The training loop: AdamW with warm-up and decay, gradient accumulation and clipping,
//! evaluation every N steps, early stopping, the best checkpoint kept as a PEFT adapter, a
//! resumable training state, `metrics.jsonl` and a loss/accuracy plot.
//!
//! Reproducibility: the initialisation and the data order are functions of the seed and the
//! step number only (each epoch's order is a permutation seeded by `seed + epoch`), so two runs
//! with the same seed are identical bit for bit on the CPU, and a resumed run continues exactly
//! where an uninterrupted one would be.

pub mod config;
pub mod optim;
pub mod plot;
pub mod state;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::adapter::{self, MethodConfig, PeftConfig, TaskType};
use crate::backbone::{self, Backbone, BackboneInput, LoadedModel};
use crate::data::{read_jsonl, DataSet};
use crate::infer::evaluate::{EvalResult, Scorer};
use crate::model_source;
use crate::prompt::encoder::EncoderSpec;
use crate::prompt::init::{initial_prompt, InitSource, PromptInit};
use crate::prompt::SoftPrompt;
use crate::task::{lm_loss, make_batch, prompt_gradient, splice_embeddings, ClassifierHead, Example, Task, TaskKind};
use crate::template::Template;
pub use config::{EncoderKind, InitKind, Method, TrainConfig};
use optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig};

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

/// Everything prepared for training: model, task, encoded data.
pub struct Prepared {
    /// Configuration.
    pub cfg: TrainConfig,
    /// Loaded model and tokenizer.
    pub model: LoadedModel,
    /// The task (template with virtual tokens).
    pub task: Task,
    /// Encoded training rows.
    pub train: Vec<Example>,
    /// Encoded dev rows.
    pub dev: Vec<Example>,
    /// Encoded test rows.
    pub test: Vec<Example>,
    /// Raw test set (for the baseline).
    test_set: Option<DataSet>,
    truncated_train: usize,
}

fn read_set(path: &Path, limit: Option<usize>) -> Result<DataSet> {
    let mut ds = read_jsonl(path)?;
    if let Some(n) = limit {
        ds.records.truncate(n);
    }
    Ok(ds)
}

/// The template of a run: without any virtual token, `[soft:N]` is prepended (prompt tuning).
pub fn run_template(cfg: &TrainConfig) -> Result<Template> {
    let t = Template::parse(&cfg.template).context("option `template`")?;
    let t = if t.num_virtual_tokens() == 0 {
        Template::parse(&format!("[soft:{}]{}", cfg.num_virtual_tokens, cfg.template)).context("option `template`")?
    } else {
        t
    };
    t.with_target(&cfg.target_field).context("option `template`")
}

/// Loads the model and data and encodes every row.
pub fn prepare(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<Prepared> {
    check_output_dir(&cfg.output)?;
    let location = model_source::resolve(&cfg.model)?;
    let model = backbone::load(&location, &Device::Cpu)?;
    let info = model.backbone.info();
    match (cfg.task, info.arch.is_causal()) {
        (TaskKind::SeqCls, true) => bail!(
            "task `seq-cls` needs an encoder model (e.g. minilm-l6); {} is causal",
            cfg.model
        ),
        (TaskKind::Classify | TaskKind::Generate, false) => {
            bail!(
                "task `{:?}` needs a causal language model; {} is an encoder (use task = \"seq-cls\")",
                cfg.task,
                cfg.model
            )
        }
        _ => {}
    }
    let train_set = read_set(&cfg.train, None)?;
    let dev_set = cfg.dev.as_deref().map(|p| read_set(p, cfg.dev_rows)).transpose()?;
    let test_set = cfg.test.as_deref().map(|p| read_set(p, cfg.test_rows)).transpose()?;
    let all: Vec<&DataSet> = [Some(&train_set), dev_set.as_ref(), test_set.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let labels = Task::labels_from(&all, &cfg.target_field)?;
    let task = Task::new(
        cfg.task,
        run_template(cfg)?,
        labels,
        &cfg.verbalizer,
        &model.tokenizer,
        cfg.max_len,
    )?;
    let encode = |ds: &DataSet| task.encode_set(ds, &model.tokenizer);
    let train = encode(&train_set)?;
    if train.truncated > 0 {
        obs.message(&format!(
            "warning: {} of {} training rows were longer than max_len {} and had their fields truncated",
            train.truncated,
            train.examples.len(),
            cfg.max_len
        ));
    }
    let dev = dev_set
        .as_ref()
        .map(encode)
        .transpose()?
        .map(|s| s.examples)
        .unwrap_or_default();
    let test = test_set
        .as_ref()
        .map(encode)
        .transpose()?
        .map(|s| s.examples)
        .unwrap_or_default();
    Ok(Prepared {
        cfg: cfg.clone(),
        model,
        task,
        truncated_train: train.truncated,
        train: train.examples,
        dev,
        test,
        test_set,
    })
}

/// Refuses an output directory that cannot be created or written, before any work is done.
fn check_output_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("output directory {} cannot be created", dir.display()))?;
    let probe = dir.join(".softprompt-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("output directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
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
    let scorer = Scorer {
        backbone: p.model.backbone.as_ref(),
        tokenizer: &p.model.tokenizer,
        task: &task,
        prompt: None,
        head: None,
    };
    Ok(Some(scorer.evaluate(&examples, p.cfg.eval_batch, p.cfg.exact_match)?))
}

/// The learnable state of a run.
pub struct Learner {
    /// The soft prompt.
    pub prompt: SoftPrompt,
    /// Classification head (SeqCls).
    pub head: Option<ClassifierHead>,
    /// Optimiser.
    pub optimizer: AdamW,
    /// How the prompt was initialised (recorded in the PEFT config).
    pub init: PromptInit,
}

impl Learner {
    /// Every trainable parameter with its saved name.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.prompt.vars();
        if let Some(h) = &self.head {
            v.push((HEAD_WEIGHT.into(), h.weight.clone()));
            v.push((HEAD_BIAS.into(), h.bias.clone()));
        }
        v
    }
}

/// PEFT's names of the sequence-classification head.
pub const HEAD_WEIGHT: &str = adapter::CLASSIFIER_WEIGHT;
/// See [`HEAD_WEIGHT`].
pub const HEAD_BIAS: &str = adapter::CLASSIFIER_BIAS;

fn prompt_init(cfg: &TrainConfig, task: &Task) -> Result<PromptInit> {
    Ok(match cfg.init {
        InitKind::Random => PromptInit::Random,
        InitKind::RandomNormal => PromptInit::RandomNormal,
        InitKind::Vocab => PromptInit::Vocab,
        InitKind::Labels => {
            let prefix = task.template.target().map(|t| t.prefix.clone()).unwrap_or_default();
            PromptInit::Labels((0..task.labels.len()).map(|i| task.target_text(&prefix, i)).collect())
        }
        InitKind::Text => PromptInit::Text(
            cfg.init_text
                .clone()
                .context("init = \"text\" needs option `init_text`")?,
        ),
        InitKind::From => {
            let dir = cfg
                .init_from
                .as_deref()
                .context("init = \"from\" needs option `init_from` (an adapter directory)")?;
            PromptInit::FromTensor(adapter::load_peft(dir)?.prompt_embeddings)
        }
    })
}

fn encoder_spec(cfg: &TrainConfig) -> Option<EncoderSpec> {
    match cfg.method {
        Method::PromptTuning => None,
        Method::PTuning => Some(match cfg.encoder {
            EncoderKind::Mlp => EncoderSpec::Mlp {
                hidden: cfg.encoder_hidden,
            },
            EncoderKind::Lstm => EncoderSpec::Lstm {
                hidden: cfg.encoder_hidden,
                num_layers: cfg.encoder_layers,
                dropout: cfg.encoder_dropout,
            },
        }),
    }
}

/// A fresh learner: initial prompt, encoder and head drawn from the seed.
pub fn new_learner(p: &Prepared) -> Result<Learner> {
    let cfg = &p.cfg;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let bb = p.model.backbone.as_ref();
    let init = prompt_init(cfg, &p.task)?;
    let n = p.task.template.num_virtual_tokens();
    let start = initial_prompt(
        &init,
        n,
        bb.info().hidden,
        InitSource::model(bb.embedding_table(), &p.model.tokenizer),
        &mut rng,
    )?;
    let prompt = SoftPrompt::new(&start, encoder_spec(cfg).as_ref(), &mut rng)?;
    let head = if cfg.task == TaskKind::SeqCls {
        let c = p.task.labels.len();
        let d = bb.info().hidden;
        // transformers initialises classifier weights N(0, 0.02) and biases 0.
        let w = seeded_normal(&mut rng, 0.02, (c, d))?;
        Some(ClassifierHead {
            weight: Var::from_tensor(&w)?,
            bias: Var::zeros(c, DType::F32, &Device::Cpu)?,
        })
    } else {
        None
    };
    let optimizer = AdamW::new(AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    });
    Ok(Learner {
        prompt,
        head,
        optimizer,
        init,
    })
}

fn seeded_normal(rng: &mut rand::rngs::StdRng, std: f32, shape: (usize, usize)) -> Result<Tensor> {
    use rand_distr::Distribution;
    let dist = rand_distr::Normal::new(0f32, std)?;
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The rows of micro-batch `micro` of step `step` (1-based): a pure function of the seed.
struct DataOrder {
    seed: u64,
    n: usize,
    perms: HashMap<usize, Vec<usize>>,
}

impl DataOrder {
    fn rows(&mut self, step: usize, micro: usize, accumulation: usize, batch: usize) -> Vec<usize> {
        let start = ((step - 1) * accumulation + micro) * batch;
        (start..start + batch)
            .map(|pos| {
                let epoch = pos / self.n;
                let (seed, n) = (self.seed, self.n);
                let perm = self.perms.entry(epoch).or_insert_with(|| {
                    let mut p: Vec<usize> = (0..n).collect();
                    p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                        seed.wrapping_add(epoch as u64 + 1),
                    ));
                    p
                });
                perm[pos % n]
            })
            .collect()
    }
}

/// Total optimiser steps of a run.
pub fn total_steps(cfg: &TrainConfig, train_rows: usize) -> Result<usize> {
    if let Some(s) = cfg.steps {
        return Ok(s);
    }
    let per_step = (cfg.batch * cfg.accumulation).max(1);
    let epochs = cfg.epochs.unwrap_or(1.0);
    let steps = (epochs * train_rows as f64 / per_step as f64).ceil() as usize;
    if steps == 0 {
        bail!("nothing to train: 0 steps (set `steps` or `epochs`)");
    }
    Ok(steps)
}

/// One optimiser step's loss and gradients (averaged over the micro-batches).
fn compute_gradients(
    p: &Prepared,
    learner: &Learner,
    order: &mut DataOrder,
    step: usize,
) -> Result<(f32, BTreeMap<String, Tensor>)> {
    let cfg = &p.cfg;
    let bb: &dyn Backbone = p.model.backbone.as_ref();
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut add = |name: &str, g: Tensor| -> Result<()> {
        let g = (g / cfg.accumulation as f64)?;
        let sum = match grads.remove(name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(name.to_string(), sum);
        Ok(())
    };
    let mut loss_sum = 0f32;
    for micro in 0..cfg.accumulation {
        let rows: Vec<&Example> = order
            .rows(step, micro, cfg.accumulation, cfg.batch)
            .into_iter()
            .map(|i| &p.train[i])
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ ((step as u64) << 16) ^ micro as u64);
        let prompt = learner.prompt.forward_train(&mut rng)?;
        let seq_cls = cfg.task == TaskKind::SeqCls;
        let batch = make_batch(&rows, !seq_cls, &Device::Cpu)?;
        let embeds = splice_embeddings(bb, &batch, Some(&prompt.detach()))?;
        let (hidden, tape) = bb.forward_train(&BackboneInput {
            embeds: &embeds,
            mask: &batch.mask,
            token_types: None,
        })?;
        let (loss, d_hidden) = match &learner.head {
            Some(head) => {
                let gold: Vec<u32> = rows.iter().map(|e| e.gold as u32).collect();
                let (loss, d_hidden, dw, db) = head.loss(bb, &hidden, &gold)?;
                add(HEAD_WEIGHT, dw)?;
                add(HEAD_BIAS, db)?;
                (loss, d_hidden)
            }
            None => lm_loss(bb, &batch, &hidden)?,
        };
        let d_embeds = bb.backward(&tape, &d_hidden)?;
        let d_prompt = prompt_gradient(&batch, &d_embeds, learner.prompt.num_virtual_tokens())?;
        // Through the (small) prompt encoder with candle's autograd.
        let store = (&prompt * d_prompt.detach())?.sum_all()?.backward()?;
        for (name, var) in learner.prompt.vars() {
            if let Some(g) = store.get(var.as_tensor()) {
                add(&name, g.clone())?;
            }
        }
        loss_sum += loss / cfg.accumulation as f32;
    }
    Ok((loss_sum, grads))
}

fn all_finite(params: &[(String, Var)]) -> Result<bool> {
    for (_, v) in params {
        let s = v
            .as_tensor()
            .abs()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !s.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes the learner as a PEFT adapter into `dir`.
pub fn save_adapter(p: &Prepared, learner: &Learner, dir: &Path) -> Result<()> {
    let info = p.model.backbone.info();
    let task_type = if p.cfg.task == TaskKind::SeqCls {
        TaskType::SeqCls
    } else {
        TaskType::CausalLm
    };
    let mut config = PeftConfig::for_prompt(&learner.prompt, &learner.init, task_type, info);
    config.base_model_name_or_path = Some(p.cfg.model.clone());
    if let MethodConfig::PromptTuning {
        tokenizer_name_or_path: Some(t),
        ..
    } = &mut config.method
    {
        *t = p.cfg.model.clone();
    }
    let extra: Vec<(String, Tensor)> = match &learner.head {
        Some(h) => vec![
            (HEAD_WEIGHT.into(), h.weight.as_tensor().clone()),
            (HEAD_BIAS.into(), h.bias.as_tensor().clone()),
        ],
        None => Vec::new(),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    adapter::save_peft(dir, &config, &learner.prompt.forward()?, &extra)?;
    state::save_task_file(dir, &p.task, &p.cfg)?;
    state::save_prompt_params(dir, learner)
}

/// Runs a whole training job: baseline, training with evaluation, best adapter, test score.
pub fn train(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainReport> {
    let p = prepare(cfg, obs)?;
    let baseline_test = match &cfg.baseline_template {
        Some(t) => {
            let r = evaluate_baseline(&p, t)?;
            if let Some(r) = &r {
                obs.message(&format!(
                    "zero-shot baseline on test ({} rows): accuracy {:.1}%",
                    r.n,
                    100.0 * r.accuracy
                ));
            }
            r
        }
        None => None,
    };
    let mut learner = new_learner(&p)?;
    let total = total_steps(cfg, p.train.len())?;
    let out = &cfg.output;
    let last_dir = out.join("checkpoint-last");
    let mut progress = state::Progress::default();
    if cfg.resume {
        progress = state::load_state(&last_dir, &mut learner)?;
        obs.message(&format!(
            "resumed from {} at step {}",
            last_dir.display(),
            progress.step
        ));
    }
    let mut order = DataOrder {
        seed: cfg.seed,
        n: p.train.len(),
        perms: HashMap::new(),
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(cfg.resume)
        .write(true)
        .truncate(!cfg.resume)
        .open(out.join("metrics.jsonl"))
        .with_context(|| format!("cannot write {}", out.join("metrics.jsonl").display()))?;
    obs.start(total, progress.step);
    let started = Instant::now();
    let mut stopped_early = false;
    let examples_per_step = (cfg.batch * cfg.accumulation) as f64;
    while progress.step < total {
        let step = progress.step + 1;
        let t0 = Instant::now();
        let (loss, mut grads) = compute_gradients(&p, &learner, &mut order, step)?;
        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {step}; training stopped. The last good checkpoint is kept in {} (and the best adapter in {})",
                last_dir.display(),
                out.display()
            );
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.clip).with_context(|| {
            format!(
                "step {step}: training stopped; the last good checkpoint is in {}",
                last_dir.display()
            )
        })?;
        let lr = learning_rate(cfg.lr, cfg.schedule, step, cfg.warmup, total);
        learner.optimizer.update(&learner.params(), &grads, lr)?;
        if !all_finite(&learner.params())? {
            bail!(
                "parameters became non-finite at step {step} (learning rate {lr:e}); training stopped. \
                 The last good checkpoint is kept in {} (and the best adapter in {})",
                last_dir.display(),
                out.display()
            );
        }
        progress.step = step;
        let eps = examples_per_step / t0.elapsed().as_secs_f64().max(1e-9);
        obs.step(step, loss, lr, eps);
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "examples_per_s": eps})
        )?;
        progress.losses.push((step, loss));
        let eval_now = (cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == total;
        if eval_now {
            let improved = if p.dev.is_empty() {
                true
            } else {
                let prompt = learner.prompt.forward()?;
                let scorer = Scorer {
                    backbone: p.model.backbone.as_ref(),
                    tokenizer: &p.model.tokenizer,
                    task: &p.task,
                    prompt: Some(&prompt),
                    head: learner.head.as_ref(),
                };
                let r = scorer.evaluate(&p.dev, cfg.eval_batch, false)?;
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": step, "dev_accuracy": r.accuracy, "dev_rows": r.n})
                )?;
                progress.dev.push((step, r.accuracy));
                let better = progress.best.is_none_or(|(b, _)| r.accuracy > b);
                obs.message(&format!(
                    "step {step}: dev accuracy {:.1}% ({} rows){}",
                    100.0 * r.accuracy,
                    r.n,
                    if better { ", best so far" } else { "" }
                ));
                if better {
                    progress.best = Some((r.accuracy, step));
                    progress.evals_since_best = 0;
                } else {
                    progress.evals_since_best += 1;
                }
                better
            };
            if improved {
                save_adapter(&p, &learner, out)?;
            }
            state::save_state(&last_dir, &learner, &progress, &p)?;
            plot::write_plot(&out.join("training.png"), &progress.losses, &progress.dev)?;
            if cfg.patience.is_some_and(|pat| progress.evals_since_best >= pat) {
                obs.message(&format!(
                    "early stopping at step {step}: no dev improvement in {} evaluations",
                    progress.evals_since_best
                ));
                stopped_early = true;
                break;
            }
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    // Test with the best adapter.
    let test = if p.test.is_empty() {
        None
    } else {
        let best = adapter::load_peft(out)?;
        let prompt = best.input_prompt()?.clone();
        let head = ClassifierHead::from_adapter(&best)?;
        let scorer = Scorer {
            backbone: p.model.backbone.as_ref(),
            tokenizer: &p.model.tokenizer,
            task: &p.task,
            prompt: Some(&prompt),
            head: head.as_ref(),
        };
        let r = scorer.evaluate(&p.test, cfg.eval_batch, cfg.exact_match)?;
        obs.message(&format!(
            "trained prompt on test ({} rows): accuracy {:.1}%",
            r.n,
            100.0 * r.accuracy
        ));
        Some(r)
    };
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
