//! CPT (context-aware prompt tuning, PEFT's `CPT`) in training: the context built from training
//! rows, the learned prompt `E + Δ` ([`CptPrompt`]) and its loss over the query's and the
//! context's labels ([`cpt_loss`]). The arithmetic of the token types (what learns, the bounds,
//! the loss weights) is [`crate::prompt::cpt`].
//!
//! The context is `cpt_examples` training rows (the first of `train`), each rendered with the
//! run's template as PEFT's CPT example does it: every template text before the last input field
//! is type `4i+1`, each field value `4i+2`, the text after the last field `4i+3`, the target
//! (label word) `4i+4`, then a newline of type 0; each piece is tokenized on its own, with the
//! spaces that end a piece moved to the start of the next (`"Review:"`, `" great film"`).
//! The run's template becomes `[soft:P]` + template, `P` the context's length, so batching,
//! splicing, evaluation and every reader treat the context as a prompt-tuning prompt.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use std::collections::HashMap;

use super::learned::LearnedPrompt;
use super::Prepared;
use crate::adapter::{MethodConfig, PeftConfig, TaskType};
use crate::backbone::{Backbone, BackboneInput, CausalLm, KvCache, Tape};
use crate::batch::{prompt_gradient, splice_embeddings, Batch};
use crate::config::{option, TrainConfig};
use crate::data::{field_text, DataSet};
use crate::loss::lm_loss_at;
use crate::prompt::cpt::{CptConfig, CPT_DELTA, CPT_EMBEDDING};
use crate::prompt::PromptInit;
use crate::task::{Example, Task};
use crate::template::{Segment, Template};
use crate::tokenizer::TextTokenizer;

/// What separates the context's examples (and the last from the query), type 0.
pub const CPT_SEPARATOR: &str = "\n";

/// The run's template for a context of `p` tokens: `[soft:p]` before option `template`.
pub fn run_template(cfg: &TrainConfig, p: usize) -> Result<Template> {
    Template::parse(&format!("[soft:{p}]{}", cfg.template))
        .and_then(|t| t.with_target(&cfg.target_field))
        .with_context(|| option("template"))
}

/// The context of a CPT run: the first `cpt_examples` rows of `train` rendered by `task` (whose
/// template has no virtual tokens), with the options' loss weighting and bounds.
pub fn build_context(cfg: &TrainConfig, task: &Task, train: &DataSet, tokenizer: &TextTokenizer) -> Result<CptConfig> {
    let k = cfg.cpt_examples;
    if train.records.len() < k {
        bail!(
            "{} is {k}, but {} has {} rows; the context takes the first {k}",
            option("cpt_examples"),
            train.source.display(),
            train.records.len()
        );
    }
    let template = &task.template;
    let target = template
        .target()
        .context("method \"cpt\": the template has no target slot")?;
    let last_field = template
        .segments()
        .iter()
        .rposition(|s| matches!(s, Segment::Field { .. }));
    let (mut token_ids, mut types) = (Vec::new(), Vec::new());
    for (i, (origin, row)) in train.rows().take(k).enumerate() {
        let mut pieces: Vec<(String, u32)> = Vec::new();
        for (si, s) in template.segments().iter().enumerate() {
            match s {
                Segment::Text(t) => pieces.push((t.clone(), if Some(si) < last_field { 1 } else { 3 })),
                Segment::Field { name, .. } => pieces.push((field_text(row, name, &origin)?, 2)),
                Segment::Soft { .. } => bail!("method \"cpt\": the template has [soft:..] tokens"),
            }
        }
        let value = field_text(row, &target.field, &origin)?;
        let gold = task.labels.iter().position(|l| *l == value).with_context(|| {
            format!(
                "{origin}: `{}` is `{value}`, which is not one of the labels",
                target.field
            )
        })?;
        pieces.push((task.target_text(&target.prefix, gold), 4));
        pieces.push((CPT_SEPARATOR.to_string(), 0));
        move_trailing_spaces(&mut pieces);
        for (text, t) in pieces {
            let ids = tokenizer.encode(&text, false).with_context(|| origin.clone())?;
            let t = if t == 0 { 0 } else { t + 4 * i as u32 };
            types.extend(std::iter::repeat_n(t, ids.len()));
            token_ids.extend(ids);
        }
    }
    let cpt = CptConfig {
        mask: vec![1; token_ids.len()],
        token_ids,
        types,
        weighted_loss: cfg.cpt_weighted_loss,
        decay_factor: cfg.cpt_loss_decay_factor,
        projection_epsilon: cfg.cpt_projection_epsilon,
        projection_format_epsilon: cfg.cpt_projection_format_epsilon,
    };
    cpt.check()?;
    if cpt.len() >= cfg.max_len {
        bail!(
            "the CPT context ({} = {k} rows) is {} tokens, but {} is {}; max_len counts the \
             context, the input and the target together: raise it",
            option("cpt_examples"),
            cpt.len(),
            option("max_len"),
            cfg.max_len
        );
    }
    Ok(cpt)
}

/// Moves the spaces that end a piece to the start of the next (a BPE vocabulary attaches a
/// space to the word after it).
fn move_trailing_spaces(pieces: &mut [(String, u32)]) {
    for i in 0..pieces.len().saturating_sub(1) {
        let kept = pieces[i].0.trim_end_matches(' ').len();
        if kept < pieces[i].0.len() {
            let spaces = pieces[i].0.split_off(kept);
            pieces[i + 1].0.insert_str(0, &spaces);
        }
    }
}

/// The loss of a CPT micro-batch whose rows start with the context (virtual tokens `0..p` at
/// positions `0..p`): PEFT's mean over the query's target tokens and, in every row, the
/// context's label tokens (each predicted from the position before), weighted as
/// [`CptConfig::loss_weights`] says; and d(loss)/d(hidden states).
pub fn cpt_loss(lm: &dyn CausalLm, batch: &Batch, hidden: &Tensor, cpt: &CptConfig) -> Result<(f32, Tensor)> {
    let (b, t) = batch.shape;
    let p = cpt.len();
    let leads = batch.soft_positions.len() == b * p
        && batch
            .soft_positions
            .iter()
            .zip(&batch.soft_index)
            .enumerate()
            .all(|(k, (&pos, &v))| pos as usize == (k / p) * t + k % p && v as usize == k % p);
    if !leads {
        bail!("CPT's loss needs the context's {p} virtual tokens at the start of every row");
    }
    let (context, query) = cpt.loss_weights();
    let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..b {
        for &(j, id, w) in &context {
            positions.push((r * t + j - 1) as u32);
            targets.push(id);
            weights.push(w);
        }
    }
    if let Some(w) = query {
        positions.extend_from_slice(&batch.loss_positions);
        targets.extend_from_slice(&batch.loss_targets);
        weights.extend(std::iter::repeat_n(w, batch.loss_positions.len()));
    }
    lm_loss_at(lm, hidden, &positions, &targets, Some(&weights))
}

/// The number of positions [`cpt_loss`] averages over for `rows`: each row's context labels,
/// and its target tokens when the query's labels count (several processes share a micro-batch
/// by it).
pub fn loss_positions(cpt: &CptConfig, rows: &[&Example]) -> usize {
    let (context, query) = cpt.loss_weights();
    let targets: usize = rows.iter().map(|e| e.target.len()).sum();
    rows.len() * context.len() + if query.is_some() { targets } else { 0 }
}

/// CPT's learned prompt: the context's frozen word embeddings `E [p, d]` plus the offset `Δ`,
/// which only template and input tokens learn and which is projected within its bounds after
/// every step.
#[derive(Debug, Clone)]
pub struct CptPrompt {
    cpt: CptConfig,
    base: Tensor,
    delta: Var,
    /// `[p, 1]`: 1 for the tokens that learn, 0 for the others.
    trainable: Tensor,
    tokenizer: Option<String>,
}

impl CptPrompt {
    /// The prompt of context `cpt` from the model's word-embedding table (`[vocab, d]`), `Δ` at
    /// zero. `tokenizer` is recorded as PEFT's `tokenizer_name_or_path`.
    pub fn new(cpt: CptConfig, table: &Tensor, tokenizer: Option<String>) -> Result<Self> {
        cpt.check()?;
        let vocab = table.dim(0)?;
        if let Some(&bad) = cpt.token_ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("CPT context token {bad} is outside the model's vocabulary of {vocab}");
        }
        let ids = Tensor::new(cpt.token_ids.as_slice(), table.device())?;
        let base = table.index_select(&ids, 0)?;
        let delta = Var::from_tensor(&base.zeros_like()?)?;
        let mask: Vec<f32> = cpt.trainable().iter().map(|&t| t as u8 as f32).collect();
        let trainable = Tensor::from_vec(mask, (cpt.len(), 1), table.device())?.to_dtype(base.dtype())?;
        Ok(Self {
            cpt,
            base,
            delta,
            trainable,
            tokenizer,
        })
    }

    /// The context and its options.
    pub fn config(&self) -> &CptConfig {
        &self.cpt
    }

    /// The current offset `Δ`.
    pub fn delta(&self) -> Tensor {
        self.delta.as_detached_tensor()
    }
}

impl LearnedPrompt for CptPrompt {
    fn forward(&self) -> Result<Tensor> {
        Ok(self.base.add(self.delta.as_tensor())?)
    }
    fn forward_train(&self, _rng: &mut StdRng) -> Result<Tensor> {
        LearnedPrompt::forward(self)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        vec![(CPT_DELTA.to_string(), self.delta.clone())]
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (CPT_EMBEDDING.to_string(), self.base.copy()?),
            (CPT_DELTA.to_string(), self.delta.as_detached_tensor().copy()?),
        ])
    }
    fn set_from(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let delta = tensors
            .get(CPT_DELTA)
            .with_context(|| format!("tensor `{CPT_DELTA}` is missing (needed to restore CPT's offset)"))?;
        if delta.dims() != self.base.dims() {
            bail!(
                "tensor `{CPT_DELTA}` has shape {:?}, expected {:?}",
                delta.dims(),
                self.base.dims()
            );
        }
        if let Some(base) = tensors.get(CPT_EMBEDDING) {
            if base.dims() != self.base.dims() {
                bail!(
                    "tensor `{CPT_EMBEDDING}` has shape {:?}, expected {:?}",
                    base.dims(),
                    self.base.dims()
                );
            }
            self.base = base.to_dtype(self.base.dtype())?.to_device(self.base.device())?;
        }
        self.delta
            .set(&delta.to_dtype(self.base.dtype())?.to_device(self.base.device())?)?;
        Ok(())
    }
    fn device(&self) -> Device {
        self.base.device().clone()
    }
    fn model_forward(&self, model: &dyn Backbone, batch: &Batch, learned: &Tensor) -> Result<(Tensor, Tape)> {
        let embeds = splice_embeddings(model, batch, Some(learned))?;
        model.forward_train(&BackboneInput::new(&embeds, &batch.mask))
    }
    fn gradient(&self, model: &dyn Backbone, batch: &Batch, tape: &Tape, d_hidden: &Tensor) -> Result<Tensor> {
        let d_embeds = model.backward(tape, d_hidden)?;
        // PEFT's hook on Δ's gradient: label and separator tokens do not learn.
        Ok(prompt_gradient(batch, &d_embeds, self.cpt.len())?.broadcast_mul(&self.trainable)?)
    }
    fn eval_parts(&self, _model: &dyn Backbone) -> Result<(Option<Tensor>, Option<KvCache>)> {
        Ok((Some(LearnedPrompt::forward(self)?.detach()), None))
    }
    fn lm_loss(&self, lm: &dyn CausalLm, batch: &Batch, hidden: &Tensor) -> Result<(f32, Tensor)> {
        cpt_loss(lm, batch, hidden, &self.cpt)
    }
    fn after_step(&self) -> Result<()> {
        Ok(self.delta.set(&self.cpt.project(self.delta.as_tensor())?)?)
    }
    fn peft_config(&self, p: &Prepared, _init: &PromptInit, task_type: TaskType) -> Result<PeftConfig> {
        if task_type != TaskType::CausalLm {
            bail!("PEFT's CPT is CAUSAL_LM only");
        }
        let method = MethodConfig::Cpt {
            cpt: self.cpt.clone(),
            tokenizer_name_or_path: self.tokenizer.clone(),
        };
        Ok(PeftConfig::new(
            method,
            task_type,
            self.cpt.len(),
            p.model.backbone.info(),
        ))
    }
    fn peft_tensors(&self) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        Ok((LearnedPrompt::forward(self)?.detach(), Vec::new()))
    }
}
