//! Tasks: how rows become training targets and how predictions are scored.
//!
//! - [`TaskKind::Generate`]: causal LM with targets. The loss covers only the target tokens
//!   (HF's -100 rule for prompt and input positions) and the vocabulary head is applied only at
//!   those positions. Evaluation: LAMA-style accuracy@1 of the gold target among all distinct
//!   targets (`candidates`), ranked by the log-probability of their tokens, and greedy exact match.
//! - [`TaskKind::Classify`]: classification with a verbaliser on a causal LM. Each label maps to
//!   a word; training is the LM loss on that word, the score of a label is its word's
//!   log-probability (all sub-tokens), and accuracy is measured.
//! - [`TaskKind::SeqCls`]: sequence classification on an encoder: pooler on position 0 and a
//!   trained linear head, saved PEFT-style as `base_model.classifier.*`.
//!
//! Joining prompt and target: whitespace that the template put right before the target slot
//! is moved in front of the target text (so `Sentiment: {label}` scores " positive"); when there
//! is none and the target does not start with whitespace, one space is put in front (BPE
//! vocabularies hold words with their leading space, e.g. " Tokyo").

use anyhow::{bail, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use std::collections::BTreeSet;

use crate::backbone::{lm_logits, Backbone, BackboneInput, KvCache};
use crate::data::{field_text, DataSet};
use crate::template::{SpecialTokens, Template, Token};
use crate::tokenizer::TextTokenizer;

/// Which task a run trains and evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Causal LM on target text; accuracy@1 among all targets and greedy exact match.
    Generate,
    /// Verbaliser classification on a causal LM.
    Classify,
    /// Classification head on an encoder (BERT/MiniLM).
    SeqCls,
}

/// A task bound to a template and a tokenizer.
pub struct Task {
    /// The task kind.
    pub kind: TaskKind,
    /// The template, with its target slot set.
    pub template: Template,
    /// Class labels (Classify, SeqCls) or all distinct targets (Generate).
    pub labels: Vec<String>,
    /// Text scored for each label (Classify: the verbaliser word; Generate: the target itself).
    pub label_words: Vec<String>,
    special: SpecialTokens,
    max_len: usize,
}

/// One encoded row.
#[derive(Debug, Clone)]
pub struct Example {
    /// `FILE:LINE` of the row.
    pub origin: String,
    /// Prompt tokens (ids and virtual tokens).
    pub prompt: Vec<Token>,
    /// Target token ids (empty for SeqCls).
    pub target: Vec<u32>,
    /// Index of the gold label / target among `Task::labels`.
    pub gold: usize,
    /// Whether the row's fields were truncated to fit the context.
    pub truncated: bool,
}

/// The encoded rows of a data set and how many were truncated.
pub struct EncodedSet {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Rows whose fields were truncated (see `Template::encode`).
    pub truncated: usize,
}

impl Task {
    /// Builds a task. `labels` come from the data (distinct target values, sorted) unless given;
    /// `verbalizer` maps label → word for Classify (default: the label itself).
    pub fn new(
        kind: TaskKind,
        template: Template,
        labels: Vec<String>,
        verbalizer: &std::collections::BTreeMap<String, String>,
        tokenizer: &TextTokenizer,
        max_len: usize,
    ) -> Result<Self> {
        if labels.is_empty() {
            bail!("the task has no labels or targets");
        }
        let mut label_words = Vec::with_capacity(labels.len());
        for label in &labels {
            let word = match verbalizer.get(label) {
                Some(w) => w.clone(),
                // Without a verbaliser every label is its own word.
                None if verbalizer.is_empty() || kind != TaskKind::Classify => label.clone(),
                None => {
                    let covered: Vec<&str> = verbalizer.keys().map(String::as_str).collect();
                    bail!(
                        "label `{label}` has no verbaliser word (verbaliser covers: {})",
                        covered.join(", ")
                    );
                }
            };
            label_words.push(word);
        }
        Ok(Self {
            kind,
            template,
            labels,
            label_words,
            special: SpecialTokens::of(tokenizer)?,
            max_len,
        })
    }

    /// Distinct values of the target field over data sets, sorted.
    pub fn labels_from(sets: &[&DataSet], field: &str) -> Result<Vec<String>> {
        let mut set = BTreeSet::new();
        for ds in sets {
            for (origin, row) in ds.rows() {
                set.insert(field_text(row, field, &origin)?);
            }
        }
        Ok(set.into_iter().collect())
    }

    /// The text scored for label `i` after a prompt whose template moved `prefix` to the target
    /// (see the module documentation for the joining rule).
    pub fn target_text(&self, prefix: &str, i: usize) -> String {
        let word = &self.label_words[i];
        if !prefix.is_empty() || word.starts_with(char::is_whitespace) || self.kind == TaskKind::SeqCls {
            format!("{prefix}{word}")
        } else {
            format!(" {word}")
        }
    }

    /// Encodes every row; a gold label outside `labels` is an error naming the row.
    pub fn encode_set(&self, ds: &DataSet, tokenizer: &TextTokenizer) -> Result<EncodedSet> {
        let target_field = self
            .template
            .target()
            .map(|t| t.field.clone())
            .unwrap_or_else(|| "label".into());
        let reserve = self.max_target_tokens(tokenizer)?;
        let mut examples = Vec::with_capacity(ds.len());
        let mut truncated = 0;
        for (origin, row) in ds.rows() {
            let gold_text = field_text(row, &target_field, &origin)?;
            let Some(gold) = self.labels.iter().position(|l| *l == gold_text) else {
                bail!(
                    "{origin}: `{target_field}` is `{gold_text}`, which is not one of the labels ({})",
                    preview(&self.labels)
                );
            };
            let enc = self
                .template
                .encode(row, &origin, tokenizer, &self.special, self.max_len, reserve)?;
            truncated += enc.truncated as usize;
            let target = if self.kind == TaskKind::SeqCls {
                Vec::new()
            } else {
                tokenizer.encode(&self.target_text(&enc.target_prefix, gold), false)?
            };
            examples.push(Example {
                origin,
                prompt: enc.tokens,
                target,
                gold,
                truncated: enc.truncated,
            });
        }
        Ok(EncodedSet { examples, truncated })
    }

    fn max_target_tokens(&self, tokenizer: &TextTokenizer) -> Result<usize> {
        if self.kind == TaskKind::SeqCls {
            return Ok(0);
        }
        let mut m = 0;
        for i in 0..self.labels.len() {
            m = m.max(tokenizer.encode(&self.target_text(" ", i), false)?.len());
        }
        Ok(m)
    }

    /// Token ids of every label's text after a prompt with target prefix `prefix`.
    pub fn candidate_ids(&self, tokenizer: &TextTokenizer, prefix: &str) -> Result<Vec<Vec<u32>>> {
        (0..self.labels.len())
            .map(|i| tokenizer.encode(&self.target_text(prefix, i), false))
            .collect()
    }
}

fn preview(labels: &[String]) -> String {
    let shown: Vec<&str> = labels.iter().take(8).map(String::as_str).collect();
    if labels.len() > 8 {
        format!("{}, … {} in all", shown.join(", "), labels.len())
    } else {
        shown.join(", ")
    }
}

/// A padded batch ready for the backbone.
pub struct Batch {
    /// `[B, T]` ids; virtual-token positions hold 0.
    pub ids: Tensor,
    /// `[B, T]` 1 for real positions.
    pub mask: Tensor,
    /// Flat positions (`b·T + t`) of virtual tokens and their virtual-token indices.
    pub soft_positions: Vec<u32>,
    /// Virtual-token index at each of `soft_positions`.
    pub soft_index: Vec<u32>,
    /// Flat positions whose output predicts a target token, and that token.
    pub loss_positions: Vec<u32>,
    /// Target token at each loss position.
    pub loss_targets: Vec<u32>,
    /// Per row: the position of the last prompt token.
    pub last_prompt: Vec<usize>,
    /// Batch size and padded length.
    pub shape: (usize, usize),
}

/// Pads examples into a batch; with `with_targets` the target tokens follow the prompt and their
/// prediction positions are recorded.
pub fn make_batch(examples: &[&Example], with_targets: bool, device: &Device) -> Result<Batch> {
    let lens: Vec<usize> = examples
        .iter()
        .map(|e| e.prompt.len() + if with_targets { e.target.len() } else { 0 })
        .collect();
    let b = examples.len();
    let t = lens.iter().copied().max().unwrap_or(0);
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut batch = Batch {
        ids: Tensor::zeros((1, 1), DType::U32, device)?,
        mask: Tensor::zeros((1, 1), DType::U32, device)?,
        soft_positions: Vec::new(),
        soft_index: Vec::new(),
        loss_positions: Vec::new(),
        loss_targets: Vec::new(),
        last_prompt: Vec::with_capacity(b),
        shape: (b, t),
    };
    for (r, e) in examples.iter().enumerate() {
        for (i, tok) in e.prompt.iter().enumerate() {
            let flat = r * t + i;
            mask[flat] = 1;
            match *tok {
                Token::Id(id) => ids[flat] = id,
                Token::Soft(v) => {
                    batch.soft_positions.push(flat as u32);
                    batch.soft_index.push(v as u32);
                }
            }
        }
        let p = e.prompt.len();
        batch.last_prompt.push(p - 1);
        if with_targets {
            for (j, &id) in e.target.iter().enumerate() {
                ids[r * t + p + j] = id;
                mask[r * t + p + j] = 1;
                batch.loss_positions.push((r * t + p + j - 1) as u32);
                batch.loss_targets.push(id);
            }
        }
    }
    batch.ids = Tensor::from_vec(ids, (b, t), device)?;
    batch.mask = Tensor::from_vec(mask, (b, t), device)?;
    Ok(batch)
}

/// Word embeddings of the batch with the prompt rows `prompt` (`[p, hidden]`) spliced in at
/// the virtual-token positions.
pub fn splice_embeddings(backbone: &dyn Backbone, batch: &Batch, prompt: Option<&Tensor>) -> Result<Tensor> {
    let (b, t) = batch.shape;
    let d = backbone.info().hidden;
    let words = backbone.embed(&batch.ids)?;
    if batch.soft_positions.is_empty() {
        return Ok(words);
    }
    let Some(prompt) = prompt else {
        bail!("the template has virtual tokens but no prompt was given")
    };
    let n = b * t;
    let mut index: Vec<u32> = (0..n as u32).collect();
    for (&pos, &v) in batch.soft_positions.iter().zip(&batch.soft_index) {
        index[pos as usize] = n as u32 + v;
    }
    let table = Tensor::cat(&[&words.reshape((n, d))?, prompt], 0)?;
    let index = Tensor::from_vec(index, n, words.device())?;
    Ok(table.index_select(&index, 0)?.reshape((b, t, d))?)
}

/// d(loss)/d(prompt) `[p, hidden]` from d(loss)/d(input embeddings): the sum over every position
/// that holds each virtual token.
pub fn prompt_gradient(batch: &Batch, d_embeds: &Tensor, num_virtual: usize) -> Result<Tensor> {
    let (b, t, d) = d_embeds.dims3()?;
    let device = d_embeds.device();
    let zeros = Tensor::zeros((num_virtual, d), d_embeds.dtype(), device)?;
    if batch.soft_positions.is_empty() {
        return Ok(zeros);
    }
    let pos = Tensor::new(batch.soft_positions.as_slice(), device)?;
    let rows = d_embeds.reshape((b * t, d))?.index_select(&pos, 0)?;
    let idx = Tensor::new(batch.soft_index.as_slice(), device)?;
    Ok(zeros.index_add(&idx, &rows, 0)?)
}

/// Causal-LM loss (mean cross-entropy over the target tokens) and d(loss)/d(hidden) `[B,T,D]`.
/// The vocabulary head runs only at the loss positions.
pub fn lm_loss(backbone: &dyn Backbone, batch: &Batch, hidden: &Tensor) -> Result<(f32, Tensor)> {
    let (b, t, d) = hidden.dims3()?;
    let device = hidden.device();
    let n = batch.loss_positions.len();
    if n == 0 {
        bail!("the batch has no target tokens");
    }
    let pos = Tensor::new(batch.loss_positions.as_slice(), device)?;
    let rows = hidden.reshape((b * t, d))?.index_select(&pos, 0)?;
    let logits = lm_logits(backbone, &rows)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::new(batch.loss_targets.as_slice(), device)?.unsqueeze(1)?;
    let picked = log_probs.gather(&targets, 1)?;
    let loss = -(picked.sum_all()?.to_scalar::<f32>()? / n as f32);
    // d(loss)/d(logits) = (softmax − onehot) / n
    let onehot = Tensor::zeros(logits.shape(), DType::F32, device)?.scatter_add(
        &targets,
        &Tensor::ones((n, 1), DType::F32, device)?,
        1,
    )?;
    let dlogits = ((log_probs.exp()? - onehot)? / n as f64)?;
    let head = backbone.lm_head().expect("lm_logits succeeded");
    let d_rows = dlogits.matmul(head)?;
    let d_hidden = Tensor::zeros((b * t, d), DType::F32, device)?.index_add(&pos, &d_rows, 0)?;
    Ok((loss, d_hidden.reshape((b, t, d))?))
}

/// A linear classification head `logits = pooled·Wᵀ + b` on an encoder's pooler.
pub struct ClassifierHead {
    /// `[classes, hidden]`.
    pub weight: candle_core::Var,
    /// `[classes]`.
    pub bias: candle_core::Var,
}

impl ClassifierHead {
    /// The head saved in a PEFT sequence-classification adapter, if it has one.
    pub fn from_adapter(adapter: &crate::adapter::PeftAdapter) -> Result<Option<Self>> {
        let Some((w, b)) = adapter.classifier() else {
            return Ok(None);
        };
        Ok(Some(Self {
            weight: candle_core::Var::from_tensor(w)?,
            bias: candle_core::Var::from_tensor(b)?,
        }))
    }

    /// Logits `[B, classes]` from hidden states `[B, T, D]`.
    pub fn logits(&self, backbone: &dyn Backbone, hidden: &Tensor) -> Result<Tensor> {
        let pooled = backbone.pool(hidden)?;
        Ok(pooled
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    /// Mean cross-entropy over the batch; returns loss, d(loss)/d(hidden), dW, db.
    pub fn loss(
        &self,
        backbone: &dyn Backbone,
        hidden: &Tensor,
        gold: &[u32],
    ) -> Result<(f32, Tensor, Tensor, Tensor)> {
        let device = hidden.device();
        let pooled = backbone.pool(hidden)?;
        let logits = pooled
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?;
        let n = gold.len();
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(gold, device)?.unsqueeze(1)?;
        let loss = -(log_probs.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? / n as f32);
        let onehot = Tensor::zeros(logits.shape(), DType::F32, device)?.scatter_add(
            &targets,
            &Tensor::ones((n, 1), DType::F32, device)?,
            1,
        )?;
        let dlogits = ((log_probs.exp()? - onehot)? / n as f64)?;
        let dw = dlogits.t()?.matmul(&pooled)?;
        let db = dlogits.sum(0)?;
        let d_pooled = dlogits.matmul(self.weight.as_tensor())?;
        let d_hidden = backbone.pool_backward(hidden, &d_pooled)?;
        Ok((loss, d_hidden, dw, db))
    }
}

/// Log-probability of each candidate's tokens after one prompt (`[1, T, D]` embeddings). The
/// prompt's keys and values are computed once and shared by all candidates.
///
/// Exact branch and bound: a candidate's score is at most its first token's log-probability,
/// so candidates are scored fully in order of that bound and the search stops once no remaining
/// bound can beat the best full score. Candidates left unscored report their bound (they cannot
/// be the argmax).
pub fn score_candidates(backbone: &dyn Backbone, prompt: &Tensor, candidates: &[Vec<u32>]) -> Result<Vec<f32>> {
    let device = prompt.device();
    let t = prompt.dim(1)?;
    let mut cache = KvCache::default();
    let mask = Tensor::ones((1, t), DType::U32, device)?;
    let hidden = backbone.forward_cached(
        &BackboneInput {
            embeds: prompt,
            mask: &mask,
            token_types: None,
        },
        &mut cache,
    )?;
    let first = candle_nn::ops::log_softmax(&lm_logits(backbone, &hidden.i((0, t - 1))?.unsqueeze(0)?)?, D::Minus1)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let mut scores: Vec<f32> = candidates
        .iter()
        .map(|c| c.first().map_or(f32::NEG_INFINITY, |&id| first[id as usize]))
        .collect();
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut best = f32::NEG_INFINITY;
    const CHUNK: usize = 8;
    let mut i = 0;
    while i < order.len() && scores[order[i]] > best {
        let chunk: Vec<usize> = order[i..(i + CHUNK).min(order.len())].to_vec();
        i += chunk.len();
        let multi: Vec<usize> = chunk.iter().copied().filter(|&c| candidates[c].len() > 1).collect();
        if !multi.is_empty() {
            let rest = continuation_log_probs(
                backbone,
                &cache,
                &multi.iter().map(|&c| &candidates[c][..]).collect::<Vec<_>>(),
            )?;
            for (&c, r) in multi.iter().zip(rest) {
                scores[c] += r;
            }
        }
        best = chunk.iter().map(|&c| scores[c]).fold(best, f32::max);
    }
    Ok(scores)
}

/// Sum of log p(c[1..] | prompt, c[0]) for each candidate, continuing a batch-1 prompt cache.
fn continuation_log_probs(backbone: &dyn Backbone, cache: &KvCache, cands: &[&[u32]]) -> Result<Vec<f32>> {
    let device = backbone.embedding_table().device();
    let c = cands.len();
    let l = cands.iter().map(|x| x.len() - 1).max().unwrap_or(0);
    let mut ids = vec![0u32; c * l];
    let mut m = vec![0u32; c * l];
    for (r, cand) in cands.iter().enumerate() {
        for (j, &id) in cand[..cand.len() - 1].iter().enumerate() {
            ids[r * l + j] = id;
            m[r * l + j] = 1;
        }
    }
    let mut shared = cache.repeat(c)?;
    let ids_t = Tensor::from_vec(ids, (c, l), device)?;
    let mask_t = Tensor::from_vec(m, (c, l), device)?;
    let embeds = backbone.embed(&ids_t)?;
    let h = backbone.forward_cached(
        &BackboneInput {
            embeds: &embeds,
            mask: &mask_t,
            token_types: None,
        },
        &mut shared,
    )?;
    let d = h.dim(2)?;
    let mut out = Vec::with_capacity(c);
    for (r, cand) in cands.iter().enumerate() {
        let rows = h.i(r)?.narrow(0, 0, cand.len() - 1)?.reshape((cand.len() - 1, d))?;
        let lp = candle_nn::ops::log_softmax(&lm_logits(backbone, &rows)?, D::Minus1)?;
        let next = Tensor::new(&cand[1..], device)?.unsqueeze(1)?;
        out.push(lp.gather(&next, 1)?.sum_all()?.to_scalar::<f32>()?);
    }
    Ok(out)
}

/// Index of the largest score.
pub fn argmax(scores: &[f32]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |(bi, bs), (i, &s)| if s > bs { (i, s) } else { (bi, bs) },
        )
        .0
}
