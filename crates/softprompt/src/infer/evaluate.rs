//! Scoring a data set: accuracy of verbaliser / LAMA-style candidate ranking on causal models,
//! accuracy of a classification head on encoders, and greedy exact match.

use anyhow::Result;
use candle_core::{DType, IndexOp, Tensor, D};

use crate::backbone::{lm_logits, Backbone, BackboneInput, KvCache};
use crate::task::{argmax, make_batch, score_candidates, splice_embeddings, ClassifierHead, Example, Task, TaskKind};
use crate::tokenizer::TextTokenizer;

/// One row's prediction.
#[derive(Debug, Clone, serde::Serialize)]
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
}

/// What is being evaluated: the model, the task and the learned parts.
pub struct Scorer<'a> {
    /// Frozen model.
    pub backbone: &'a dyn Backbone,
    /// Its tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The task.
    pub task: &'a Task,
    /// Prompt matrix `[p, hidden]` (None for a hand-written template without virtual tokens).
    pub prompt: Option<&'a Tensor>,
    /// Classification head (SeqCls).
    pub head: Option<&'a ClassifierHead>,
}

impl Scorer<'_> {
    /// Scores `examples` in batches of `batch_size`; `exact_match` adds greedy generation.
    pub fn evaluate(&self, examples: &[Example], batch_size: usize, exact_match: bool) -> Result<EvalResult> {
        let prefix = self
            .task
            .template
            .target()
            .map(|t| t.prefix.clone())
            .unwrap_or_default();
        let candidates = self.task.candidate_ids(self.tokenizer, &prefix)?;
        let single_token = candidates.iter().all(|c| c.len() == 1);
        let mut predictions = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let scores = match self.task.kind {
                TaskKind::SeqCls => self.head_scores(&refs)?,
                _ if single_token => self.first_token_scores(&refs, &candidates)?,
                _ => refs
                    .iter()
                    .map(|e| self.candidate_scores(e, &candidates))
                    .collect::<Result<_>>()?,
            };
            for (e, s) in chunk.iter().zip(scores) {
                let generated = if exact_match {
                    Some(self.generate(e, &candidates)?)
                } else {
                    None
                };
                predictions.push(Prediction {
                    origin: e.origin.clone(),
                    predicted: self.task.labels[argmax(&s)].clone(),
                    gold: self.task.labels[e.gold].clone(),
                    generated,
                    scores: s,
                });
            }
        }
        let n = predictions.len();
        let correct = predictions.iter().filter(|p| p.predicted == p.gold).count();
        let exact = exact_match.then(|| {
            let hits = predictions
                .iter()
                .filter(|p| p.generated.as_deref().is_some_and(|g| matches_exactly(g, &p.gold)))
                .count();
            hits as f64 / n.max(1) as f64
        });
        Ok(EvalResult {
            n,
            accuracy: correct as f64 / n.max(1) as f64,
            exact_match: exact,
            predictions,
        })
    }

    fn hidden(&self, refs: &[&Example]) -> Result<(Tensor, crate::task::Batch)> {
        let device = self.backbone.embedding_table().device();
        let batch = make_batch(refs, false, device)?;
        let embeds = splice_embeddings(self.backbone, &batch, self.prompt)?;
        let shared = shared_prefix_len(refs);
        let (b, t) = batch.shape;
        if !self.backbone.info().arch.is_causal() || shared < MIN_SHARED_PREFIX || shared >= t {
            let input = BackboneInput {
                embeds: &embeds,
                mask: &batch.mask,
                token_types: None,
            };
            return Ok((self.backbone.forward(&input)?, batch));
        }
        // The leading positions every row shares (a prepended soft prompt) do not depend on
        // the rows in a causal model: run them once and hand their keys/values to the batch.
        let prefix = embeds.i(0)?.narrow(0, 0, shared)?.unsqueeze(0)?;
        let ones = Tensor::ones((1, shared), DType::U32, device)?;
        let mut single = KvCache::default();
        let head = self.backbone.forward_cached(
            &BackboneInput {
                embeds: &prefix,
                mask: &ones,
                token_types: None,
            },
            &mut single,
        )?;
        let mut cache = single.repeat(b)?;
        let rest = embeds.narrow(1, shared, t - shared)?;
        let rest_mask = batch.mask.narrow(1, shared, t - shared)?;
        let tail = self.backbone.forward_cached(
            &BackboneInput {
                embeds: &rest,
                mask: &rest_mask,
                token_types: None,
            },
            &mut cache,
        )?;
        let head = head.broadcast_as((b, shared, head.dim(2)?))?;
        Ok((Tensor::cat(&[&head, &tail], 1)?, batch))
    }

    fn head_scores(&self, refs: &[&Example]) -> Result<Vec<Vec<f32>>> {
        let head = self
            .head
            .ok_or_else(|| anyhow::anyhow!("sequence classification needs a classifier head"))?;
        let (hidden, _) = self.hidden(refs)?;
        Ok(head.logits(self.backbone, &hidden)?.to_vec2()?)
    }

    /// All candidates are one token: one batched forward, the head applied at each row's last
    /// prompt position only.
    fn first_token_scores(&self, refs: &[&Example], candidates: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let (hidden, batch) = self.hidden(refs)?;
        let rows: Vec<Tensor> = batch
            .last_prompt
            .iter()
            .enumerate()
            .map(|(r, &p)| hidden.i((r, p)))
            .collect::<candle_core::Result<_>>()?;
        let rows = Tensor::stack(&rows, 0)?;
        let lp = candle_nn::ops::log_softmax(&lm_logits(self.backbone, &rows)?, D::Minus1)?;
        let ids: Vec<u32> = candidates.iter().map(|c| c[0]).collect();
        let idx = Tensor::new(ids.as_slice(), lp.device())?;
        Ok(lp.index_select(&idx, 1)?.to_vec2()?)
    }

    fn prompt_embeds(&self, e: &Example) -> Result<Tensor> {
        let device = self.backbone.embedding_table().device();
        let batch = make_batch(&[e], false, device)?;
        splice_embeddings(self.backbone, &batch, self.prompt)
    }

    fn candidate_scores(&self, e: &Example, candidates: &[Vec<u32>]) -> Result<Vec<f32>> {
        score_candidates(self.backbone, &self.prompt_embeds(e)?, candidates)
    }

    fn generate(&self, e: &Example, candidates: &[Vec<u32>]) -> Result<String> {
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(1);
        let stop: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        let ids = crate::infer::generate::greedy(self.backbone, &self.prompt_embeds(e)?, longest + 2, &stop)?;
        self.tokenizer.decode(&ids, true)
    }
}

/// Shortest shared prefix worth computing once for a whole batch.
const MIN_SHARED_PREFIX: usize = 2;

/// Number of leading tokens identical in every example.
fn shared_prefix_len(refs: &[&Example]) -> usize {
    let first = &refs[0].prompt;
    (0..first.len())
        .take_while(|&i| refs.iter().all(|e| e.prompt.get(i) == Some(&first[i])))
        .count()
}

/// Greedy exact match: the generation, trimmed, starts with the gold text and the next
/// character (if any) does not continue a word.
pub fn matches_exactly(generated: &str, gold: &str) -> bool {
    let g = generated.trim_start();
    g.strip_prefix(gold.trim())
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()))
}
