//! Step 2 of a run, one optimiser step: the rows of the step (a pure function of the seed),
//! loss and gradients over the micro-batches, clipping, the AdamW update.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};

use super::collective::share;
use super::learner::{Learner, HEAD_BIAS, HEAD_WEIGHT};
use super::optim::{clip_grad_norm, learning_rate};
use super::parallel::{normaliser, sum_gradients};
use super::Prepared;
use crate::backbone::profile::{span, Direction};
use crate::backbone::Model;
use crate::batch::make_batch;
use crate::config::TrainConfig;
use crate::task::Example;

/// The rows of micro-batch `micro` of step `step` (1-based): a pure function of the seed (each
/// epoch's order is a permutation seeded by `seed + epoch + 1`). With several tasks
/// ([`DataOrder::tasks`]) the positions take the tasks in turn (position `k` is task
/// `k mod T`), each task running through its own permutations, so every batch of at least `T`
/// rows draws from every task and a small task is repeated rather than left out.
pub struct DataOrder {
    seed: u64,
    sizes: Vec<usize>,
    perms: HashMap<(usize, usize), Vec<usize>>,
}

impl DataOrder {
    /// The order of `n` training rows for `seed`.
    pub fn new(seed: u64, n: usize) -> Self {
        Self::tasks(seed, &[n])
    }

    /// The order of training rows that are the sets of several tasks one after another
    /// (`sizes[t]` rows of task `t`).
    pub fn tasks(seed: u64, sizes: &[usize]) -> Self {
        Self {
            seed,
            sizes: sizes.to_vec(),
            perms: HashMap::new(),
        }
    }

    /// Row indices of micro-batch `micro` of step `step`.
    pub fn rows(&mut self, step: usize, micro: usize, accumulation: usize, batch: usize) -> Vec<usize> {
        let start = ((step - 1) * accumulation + micro) * batch;
        (start..start + batch).map(|pos| self.row_at(pos)).collect()
    }

    fn row_at(&mut self, pos: usize) -> usize {
        let tasks = self.sizes.len();
        let (task, j) = (pos % tasks, pos / tasks);
        let n = self.sizes[task];
        let epoch = j / n;
        let offset: usize = self.sizes[..task].iter().sum();
        // Task 0 keeps the single-set seeds, so one task orders its rows as before.
        let seed = self.seed.wrapping_add(epoch as u64 + 1) ^ ((task as u64) << 48);
        let perm = self.perms.entry((task, epoch)).or_insert_with(|| {
            let mut p: Vec<usize> = (0..n).collect();
            p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            p
        });
        offset + perm[j % n]
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

/// One optimiser step's loss and gradients (averaged over the micro-batches). With several
/// processes ([`Prepared`]'s collective) each takes its share of every micro-batch, weighted by
/// its share of the micro-batch's loss normaliser, and the sums over the ranks are returned.
pub fn compute_gradients(
    p: &Prepared,
    learner: &Learner,
    order: &mut DataOrder,
    step: usize,
) -> Result<(f32, BTreeMap<String, Tensor>)> {
    let cfg = &p.cfg;
    let model = &p.model.backbone;
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let comm = &*p.comm;
    // This rank's share of the current micro-batch's loss normaliser (1 for one process).
    let mut weight = 1f64;
    let mut add = |name: &str, g: Tensor, weight: f64| -> Result<()> {
        let g = if weight == 1.0 { g } else { (g * weight)? };
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
        let all: Vec<&Example> = order
            .rows(step, micro, cfg.accumulation, cfg.batch)
            .into_iter()
            .map(|i| &p.train[i])
            .collect();
        let rows = &all[share(all.len(), comm.rank(), comm.size())];
        if rows.is_empty() {
            continue;
        }
        if comm.size() > 1 {
            let classifier = learner.head.is_some();
            // CPT's loss also averages over every row's context labels.
            let norm = |r: &[&Example]| match &p.cpt {
                Some(c) => super::cpt::loss_positions(c, r),
                None => normaliser(r, classifier),
            };
            weight = norm(rows) as f64 / norm(&all).max(1) as f64;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ ((step as u64) << 16) ^ micro as u64);
        // What is learned, as a graph over its parameters: the prompt `[p, hidden]` spliced into
        // the input, or the flat key/value prefix every attention layer reads.
        let learned = span("prompt", Direction::Forward, || learner.prompt.forward_train(&mut rng))?;
        let batch = span("splice", Direction::Forward, || {
            make_batch(rows, learner.head.is_none(), model.device())
        })?;
        let (hidden, tape) = learner.prompt.model_forward(&**model, &batch, &learned.detach())?;
        let (loss, d_hidden) = span("head+loss", Direction::Forward, || -> Result<_> {
            Ok(match (model, &learner.head) {
                (Model::Encoder(enc), Some(head)) => {
                    let gold: Vec<u32> = rows.iter().map(|e| e.gold as u32).collect();
                    let h = head.loss(enc.as_ref(), &hidden, &gold)?;
                    add(HEAD_WEIGHT, h.d_weight, weight)?;
                    add(HEAD_BIAS, h.d_bias, weight)?;
                    (h.loss, h.d_hidden)
                }
                (Model::Causal(lm), None) => learner.prompt.lm_loss(lm.as_ref(), &batch, &hidden)?,
                _ => bail!("a classification head trains on an encoder, the LM loss on a causal model"),
            })
        })?;
        let d_learned = learner.prompt.gradient(&**model, &batch, &tape, &d_hidden)?;
        span("prompt", Direction::Backward, || -> Result<()> {
            // Through the (small) prompt encoder or prefix projection with candle's autograd.
            let store = (&learned * d_learned.detach())?.sum_all()?.backward()?;
            for (name, var) in learner.prompt.vars() {
                if let Some(g) = store.get(var.as_tensor()) {
                    add(&name, g.clone(), weight)?;
                }
            }
            Ok(())
        })?;
        loss_sum += loss * weight as f32 / cfg.accumulation as f32;
    }
    if comm.size() > 1 {
        sum_gradients(comm, &learner.params(), &mut grads, &mut loss_sum)?;
    }
    Ok((loss_sum, grads))
}

/// The largest magnitude among the learned values (NaN when one is not finite).
fn largest_magnitude(params: &[(String, Var)]) -> Result<f64> {
    let mut largest = 0f64;
    for (_, v) in params {
        let a = v.as_tensor().abs()?;
        let sum = a.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Ok(f64::NAN);
        }
        largest = largest.max(a.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    }
    Ok(largest)
}

/// Learned values larger than this have run away: an embedding-scale prompt holds values of
/// order 0.01–10, and f32 squares (in every RMS/LayerNorm) overflow from about 1.8e19 on.
pub const RUNAWAY_MAGNITUDE: f64 = 1e8;

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepResult {
    /// Mean training loss of the step.
    pub loss: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// One optimiser step (`step` is 1-based, of `total`): gradients, clipping, AdamW. A
/// non-finite loss, gradient or parameter stops training with an error ([`super::train`] adds
/// where the last good checkpoint is).
pub fn step(
    p: &Prepared,
    learner: &mut Learner,
    order: &mut DataOrder,
    step: usize,
    total: usize,
) -> Result<StepResult> {
    let cfg = &p.cfg;
    let (loss, mut grads) = compute_gradients(p, learner, order, step)?;
    if !loss.is_finite() {
        bail!("loss became {loss} at step {step}");
    }
    let grad_norm = clip_grad_norm(&mut grads, cfg.clip).with_context(|| format!("step {step}"))?;
    if grad_norm == 0.0 && loss > 0.0 {
        bail!(
            "the gradient vanished at step {step}: it is exactly 0 while the loss is {loss}, so \
             nothing more can be learned (the learned values are at most {:e} in magnitude; a \
             learning rate too large for the prompt, here {}, does this)",
            largest_magnitude(&learner.params())?,
            cfg.lr
        );
    }
    let lr = learning_rate(cfg.lr, cfg.schedule, step, cfg.warmup, total);
    span("optimiser", Direction::Backward, || {
        let scale = |name: &str| learner.prompt.lr_scale(name, cfg);
        learner.optimizer.update_scaled(&learner.params(), &grads, lr, &scale)?;
        learner.prompt.after_step()
    })?;
    let largest = largest_magnitude(&learner.params())?;
    if !largest.is_finite() {
        bail!("parameters became non-finite at step {step} (learning rate {lr:e})");
    }
    if largest > RUNAWAY_MAGNITUDE {
        bail!(
            "the learned values ran away at step {step}: one reached {largest:e} in magnitude \
             (more than {RUNAWAY_MAGNITUDE:e}) with learning rate {lr:e}; lower the learning rate"
        );
    }
    Ok(StepResult { loss, grad_norm, lr })
}
