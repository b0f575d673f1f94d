//! Scoring a data set: accuracy of verbaliser / LAMA-style candidate ranking on causal models,
//! accuracy of a classification head on encoders, and greedy exact match.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

use super::score::{argmax, score_all_candidates_after, score_candidates_after};
use crate::backbone::{inference_logits, BackboneInput, CausalLm, Encoder, KvCache, LoadedModel, Model};
use crate::batch::{add_input_update, make_batch, splice_embeddings, Batch};
use crate::loss::ClassifierHead;
use crate::task::{Example, Task, TaskKind};
use crate::tokenizer::TextTokenizer;

/// One row's prediction.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    /// `FILE:LINE` of the row.
    pub origin: String,
    /// Predicted label (or target).
    pub predicted: String,
    /// Gold label.
    pub gold: String,
    /// Greedy generation, when exact match was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
    /// Score of every label (log-probability, or logit for heads).
    pub scores: Vec<f32>,
}

/// Metrics over a data set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalResult {
    /// Rows scored.
    pub n: usize,
    /// Accuracy (accuracy@1 among all candidates for Generate).
    pub accuracy: f64,
    /// Greedy exact match, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Per-row predictions.
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
    /// A multitask evaluation's metrics per task (empty otherwise); `accuracy` and
    /// `exact_match` are then their means over the tasks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskMetrics>,
}

/// One task's metrics in a multitask evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskMetrics {
    /// Task id.
    pub task: usize,
    /// Rows scored.
    pub n: usize,
    /// Accuracy.
    pub accuracy: f64,
    /// Greedy exact match, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
}

impl EvalResult {
    /// The metrics of `predictions` (exact match when `exact_match`: the rows' greedy
    /// generations against their gold targets).
    pub fn from_predictions(predictions: Vec<Prediction>, exact_match: bool) -> Self {
        let n = predictions.len();
        let correct = predictions.iter().filter(|p| p.predicted == p.gold).count();
        let exact = exact_match.then(|| {
            let hits = predictions
                .iter()
                .filter(|p| p.generated.as_deref().is_some_and(|g| matches_exactly(g, &p.gold)))
                .count();
            hits as f64 / n.max(1) as f64
        });
        EvalResult {
            n,
            accuracy: correct as f64 / n.max(1) as f64,
            exact_match: exact,
            predictions,
            tasks: Vec::new(),
        }
    }

    /// Joins the results of several tasks: `parts` holds each task id, the data-set positions of
    /// its rows and its result. Accuracy and exact match are the means over the tasks (each task
    /// counts the same, whatever its size); predictions go back to the positions given.
    pub fn by_task(parts: Vec<(usize, Vec<usize>, EvalResult)>) -> Result<Self> {
        if parts.is_empty() {
            bail!("no rows to score");
        }
        let k = parts.len() as f64;
        let n: usize = parts.iter().map(|(_, _, r)| r.n).sum();
        let mut slots: Vec<Option<Prediction>> = vec![None; n];
        let mut tasks = Vec::with_capacity(parts.len());
        for (task, positions, r) in parts {
            if positions.len() != r.predictions.len() {
                bail!(
                    "task {task}: {} positions for {} predictions",
                    positions.len(),
                    r.predictions.len()
                );
            }
            for (pos, pred) in positions.into_iter().zip(r.predictions) {
                let slot = slots
                    .get_mut(pos)
                    .with_context(|| format!("task {task}: row position {pos} is outside the {n} rows"))?;
                *slot = Some(pred);
            }
            tasks.push(TaskMetrics {
                task,
                n: r.n,
                accuracy: r.accuracy,
                exact_match: r.exact_match,
            });
        }
        let predictions = slots
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.with_context(|| format!("no prediction for row position {i}")))
            .collect::<Result<_>>()?;
        let exact: Option<Vec<f64>> = tasks.iter().map(|t| t.exact_match).collect();
        Ok(Self {
            n,
            accuracy: tasks.iter().map(|t| t.accuracy).sum::<f64>() / k,
            exact_match: exact.map(|e| e.iter().sum::<f64>() / k),
            predictions,
            tasks,
        })
    }
}

/// How a row's label scores are read off the model: the language model's log-probabilities of
/// each label's tokens (causal models), or a classification head on the pooler (encoders).
#[derive(Clone, Copy)]
enum Reader<'a> {
    Lm(&'a dyn CausalLm),
    Head(&'a dyn Encoder, &'a ClassifierHead),
}

/// What is being evaluated: the model, the task and the learned parts.
pub struct Scorer<'a> {
    model: &'a Model,
    reader: Reader<'a>,
    tokenizer: &'a TextTokenizer,
    task: &'a Task,
    prompt: Option<&'a Tensor>,
    prefix: Option<&'a KvCache>,
    update: Option<&'a Tensor>,
    exhaustive: bool,
}

impl<'a> Scorer<'a> {
    /// A scorer for `task` on `model` with the prompt matrix `[p, hidden]` (None for a
    /// hand-written template) and, for sequence classification, the classification head.
    /// Refuses a task the model cannot run (SeqCls needs an encoder and a head; the others a
    /// causal language model).
    pub fn new(
        model: &'a LoadedModel,
        task: &'a Task,
        prompt: Option<&'a Tensor>,
        head: Option<&'a ClassifierHead>,
    ) -> Result<Self> {
        let reader = match (task.kind, &model.backbone) {
            (TaskKind::SeqCls, Model::Encoder(enc)) => Reader::Head(
                enc.as_ref(),
                head.context("sequence classification needs a classifier head")?,
            ),
            (TaskKind::SeqCls, Model::Causal(_)) => bail!(
                "task `seq-cls` needs an encoder model; {} is causal",
                model.backbone.info().source.display()
            ),
            (_, Model::Causal(lm)) => Reader::Lm(lm.as_ref()),
            (kind, Model::Encoder(_)) => bail!(
                "task `{kind:?}` needs a causal language model; {} is an encoder",
                model.backbone.info().source.display()
            ),
        };
        Ok(Self {
            model: &model.backbone,
            reader,
            tokenizer: &model.tokenizer,
            task,
            prompt,
            prefix: None,
            update: None,
            exhaustive: false,
        })
    }

    /// The same scorer with a one-row key/value prefix (prefix tuning, Cartridges; see
    /// `PeftAdapter::prefix_cache`) before every row: each batch starts from `prefix.repeat(b)`.
    pub fn with_prefix(mut self, prefix: Option<&'a KvCache>) -> Self {
        self.prefix = prefix;
        self
    }

    /// The same scorer with DePT's position-wise update `[rows, hidden]` added to each row's
    /// real prompt tokens (see [`add_input_update`]; `None`: no update).
    pub fn with_input_update(mut self, update: Option<&'a Tensor>) -> Self {
        self.update = update;
        self
    }

    /// The input embeddings of a batch: the prompt spliced in, DePT's update added.
    fn embeds(&self, batch: &Batch) -> Result<Tensor> {
        let embeds = splice_embeddings(&**self.model, batch, self.prompt)?;
        match self.update {
            Some(u) => add_input_update(batch, &embeds, u),
            None => Ok(embeds),
        }
    }

    /// The same scorer scoring every label in full: multi-token label words are not cut short
    /// by branch and bound, so the scores give probabilities over the labels (slower when the
    /// words have several tokens; the same when each is one token).
    pub fn exhaustive(mut self) -> Self {
        self.exhaustive = true;
        self
    }

    /// Every label's score for each of `examples` (log-probability, or logit for heads), in
    /// batches of `batch_size`. Only the rows' prompts are read (their gold labels are not).
    pub fn scores(&self, examples: &[Example], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        if batch_size == 0 {
            bail!("the batch size is 0; it must be at least 1");
        }
        let candidates = self.candidates()?;
        let shared = self.shared_prefix(examples)?;
        let mut out = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(batch_size) {
            out.extend(self.chunk_scores(&chunk.iter().collect::<Vec<_>>(), &candidates, shared.as_ref())?);
        }
        Ok(out)
    }

    /// Token ids of every label's text after the template's target prefix.
    fn candidates(&self) -> Result<Vec<Vec<u32>>> {
        let prefix = self
            .task
            .template
            .target()
            .map(|t| t.prefix.clone())
            .unwrap_or_default();
        self.task.candidate_ids(self.tokenizer, &prefix)
    }

    /// The positions every one of `examples` starts with, run once (None for an encoder, or
    /// when the rows share fewer than [`MIN_SHARED_PREFIX`] tokens). Every row keeps at least
    /// one position of its own, so its last position is never inside the shared part.
    fn shared_prefix(&self, examples: &[Example]) -> Result<Option<SharedPrefix>> {
        let (Model::Causal(lm), Some(first)) = (self.model, examples.first()) else {
            return Ok(None);
        };
        let shortest = examples.iter().map(|e| e.prompt.len()).min().unwrap_or(0);
        let len = shared_prefix_len(examples).min(shortest.saturating_sub(1));
        if len < MIN_SHARED_PREFIX {
            return Ok(None);
        }
        let embeds = self.prompt_embeds(first)?.narrow(1, 0, len)?;
        let ones = Tensor::ones((1, len), DType::U32, embeds.device())?;
        let mut cache = self.prefix.cloned().unwrap_or_default();
        lm.forward_cached(&BackboneInput::new(&embeds, &ones), &mut cache)?;
        Ok(Some(SharedPrefix { len, cache }))
    }

    /// The cache a single row continues from and the row's own embeddings after it: after the
    /// shared prefix when there is one, else after the adapter's key/value prefix (if any).
    fn row_after<'s>(&'s self, e: &Example, shared: Option<&'s SharedPrefix>) -> Result<(Option<&'s KvCache>, Tensor)> {
        let embeds = self.prompt_embeds(e)?;
        Ok(match shared {
            Some(s) => (Some(&s.cache), embeds.narrow(1, s.len, embeds.dim(1)? - s.len)?),
            None => (self.prefix, embeds),
        })
    }

    /// The label scores of one batch of rows.
    fn chunk_scores(
        &self,
        refs: &[&Example],
        candidates: &[Vec<u32>],
        shared: Option<&SharedPrefix>,
    ) -> Result<Vec<Vec<f32>>> {
        let single_token = candidates.iter().all(|c| c.len() == 1);
        let score = if self.exhaustive {
            score_all_candidates_after
        } else {
            score_candidates_after
        };
        match self.reader {
            Reader::Head(enc, head) => Ok(head.logits(enc, &self.hidden(refs)?)?.to_vec2()?),
            Reader::Lm(lm) if single_token => self.first_token_scores(lm, refs, candidates, shared),
            Reader::Lm(lm) => refs
                .iter()
                .map(|e| {
                    let (prefix, embeds) = self.row_after(e, shared)?;
                    score(lm, prefix, &embeds, candidates)
                })
                .collect(),
        }
    }

    /// Scores `examples` in batches of `batch_size`; `exact_match` adds greedy generation.
    /// No rows is an error (an accuracy over nothing would mean nothing).
    pub fn evaluate(&self, examples: &[Example], batch_size: usize, exact_match: bool) -> Result<EvalResult> {
        self.evaluate_with_progress(examples, batch_size, exact_match, &mut |_| {})
    }

    /// [`Scorer::evaluate`], calling `done` with the number of rows scored so far after each batch.
    pub fn evaluate_with_progress(
        &self,
        examples: &[Example],
        batch_size: usize,
        exact_match: bool,
        done: &mut dyn FnMut(usize),
    ) -> Result<EvalResult> {
        if examples.is_empty() {
            bail!("no rows to score");
        }
        if batch_size == 0 {
            bail!("the evaluation batch size is 0; it must be at least 1");
        }
        let candidates = self.candidates()?;
        let shared = self.shared_prefix(examples)?;
        let mut predictions = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let scores = self.chunk_scores(&refs, &candidates, shared.as_ref())?;
            for (e, s) in chunk.iter().zip(scores) {
                let generated = match self.reader {
                    Reader::Lm(lm) if exact_match => Some(self.generate(lm, e, &candidates, shared.as_ref())?),
                    _ => None,
                };
                predictions.push(Prediction {
                    origin: e.origin.clone(),
                    predicted: self.task.labels[argmax(&s)].clone(),
                    gold: self.task.labels[e.gold].clone(),
                    generated,
                    scores: s,
                });
            }
            done(predictions.len());
        }
        Ok(EvalResult::from_predictions(predictions, exact_match))
    }

    /// Hidden states `[B, T, D]` of a batch of rows (after the adapter's key/value prefix, if any).
    fn hidden(&self, refs: &[&Example]) -> Result<Tensor> {
        let batch = make_batch(refs, false, self.model.device())?;
        let embeds = self.embeds(&batch)?;
        let input = BackboneInput::new(&embeds, &batch.mask);
        match self.prefix {
            Some(prefix) => self.model.forward_prefixed(&input, prefix),
            None => self.model.forward(&input),
        }
    }

    /// All candidates are one token: one batched forward that continues from the shared
    /// prefix (or the adapter's key/value prefix) and ends at each row's last prompt position,
    /// where the head is applied.
    fn first_token_scores(
        &self,
        lm: &dyn CausalLm,
        refs: &[&Example],
        candidates: &[Vec<u32>],
        shared: Option<&SharedPrefix>,
    ) -> Result<Vec<Vec<f32>>> {
        let batch = make_batch(refs, false, self.model.device())?;
        let embeds = self.embeds(&batch)?;
        let (skip, prefix) = match shared {
            Some(s) => (s.len, Some(&s.cache)),
            None => (0, self.prefix),
        };
        let own = batch.shape.1 - skip;
        let (rest, rest_mask) = (embeds.narrow(1, skip, own)?, batch.mask.narrow(1, skip, own)?);
        // Every row keeps at least one position of its own (see `shared_prefix`).
        let at: Vec<(usize, usize)> = batch.last_prompt.iter().map(|&p| p - skip).enumerate().collect();
        let rows = lm.hidden_at(&BackboneInput::new(&rest, &rest_mask), prefix, &at)?;
        let lp = candle_nn::ops::log_softmax(&inference_logits(lm, &rows)?, D::Minus1)?;
        let ids: Vec<u32> = candidates.iter().map(|c| c[0]).collect();
        let idx = Tensor::new(ids.as_slice(), lp.device())?;
        Ok(lp.index_select(&idx, 1)?.to_vec2()?)
    }

    fn prompt_embeds(&self, e: &Example) -> Result<Tensor> {
        let batch = make_batch(&[e], false, self.model.device())?;
        self.embeds(&batch)
    }

    fn generate(
        &self,
        lm: &dyn CausalLm,
        e: &Example,
        candidates: &[Vec<u32>],
        shared: Option<&SharedPrefix>,
    ) -> Result<String> {
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(1);
        let stop: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        let (prefix, embeds) = self.row_after(e, shared)?;
        let ids = super::generate::greedy_after(lm, prefix, &embeds, longest + 2, &stop)?;
        self.tokenizer.decode(&ids, true)
    }
}

/// Shortest shared prefix worth computing once for a whole evaluation.
const MIN_SHARED_PREFIX: usize = 2;

/// The leading positions every row of an evaluation shares (a prepended soft prompt and the
/// template's fixed text before the first field) run once through a causal model. They do not
/// depend on the rows, so every batch continues from their keys and values.
struct SharedPrefix {
    /// Positions shared.
    len: usize,
    /// Their keys and values (after the adapter's own key/value prefix, if any), one row.
    cache: KvCache,
}

/// Number of leading tokens identical in every example.
fn shared_prefix_len(examples: &[Example]) -> usize {
    let Some(first) = examples.first().map(|e| &e.prompt) else {
        return 0;
    };
    (0..first.len())
        .take_while(|&i| examples.iter().all(|e| e.prompt.get(i) == Some(&first[i])))
        .count()
}

/// Greedy exact match: the generation, trimmed, starts with the gold text and the next
/// character (if any) does not continue a word.
pub fn matches_exactly(generated: &str, gold: &str) -> bool {
    let g = generated.trim_start();
    g.strip_prefix(gold.trim())
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()))
}
