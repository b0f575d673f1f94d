//! Tasks: what a run learns and how its rows become examples (prompt tokens, target tokens,
//! gold label). Batching lives in [`crate::batch`], losses in [`crate::loss`], scoring in
//! [`crate::infer`].
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
use std::collections::BTreeSet;

use crate::data::{field_text, DataSet, Row};
use crate::template::{SpecialTokens, Template, Token};
use crate::tokenizer::TextTokenizer;

/// Which task a run trains and evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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

/// Checks a verbaliser before any model is loaded: each word non-empty and no two labels with
/// one word (the model could never tell them apart). `name` is how the user gave it, for the
/// messages (`--verbalizer`, or a training configuration's option `verbalizer`). [`Task::new`]
/// checks the words against the tokenizer later.
pub fn check_verbalizer(verbalizer: &std::collections::BTreeMap<String, String>, name: &str) -> Result<()> {
    let mut seen: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for (label, word) in verbalizer {
        if word.trim().is_empty() {
            bail!("{name}: the word for label `{label}` is empty; give each label a word, e.g. `{label}= {label}`");
        }
        if let Some(other) = seen.insert(word.as_str(), label.as_str()) {
            bail!(
                "{name}: labels `{other}` and `{label}` both map to the word `{word}`; each label needs its \
                 own word, or the model cannot tell them apart"
            );
        }
    }
    Ok(())
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
        let task = Self {
            kind,
            template,
            labels,
            label_words,
            special: SpecialTokens::of(tokenizer)?,
            max_len,
        };
        if kind == TaskKind::Classify {
            task.check_label_words(tokenizer)?;
        }
        Ok(task)
    }

    /// Classification reads each label off its word's tokens: a word that tokenizes to nothing,
    /// or two words that start with the same token, could not be told apart.
    fn check_label_words(&self, tokenizer: &TextTokenizer) -> Result<()> {
        let prefix = self.template.target().map(|t| t.prefix.clone()).unwrap_or_default();
        let mut first: Vec<(u32, usize)> = Vec::with_capacity(self.labels.len());
        for i in 0..self.labels.len() {
            if self.label_words[i].trim().is_empty() {
                bail!(
                    "verbaliser: the word of label `{}` is empty; give each label a word, e.g. `{0}= {0}`",
                    self.labels[i]
                );
            }
            let ids = tokenizer.encode(&self.target_text(&prefix, i), false)?;
            let Some(&id) = ids.first() else {
                bail!(
                    "verbaliser: the word `{}` of label `{}` has no tokens",
                    self.label_words[i],
                    self.labels[i]
                );
            };
            if let Some(&(_, j)) = first.iter().find(|(f, _)| *f == id) {
                let piece = tokenizer.decode(&[id], false).unwrap_or_else(|_| id.to_string());
                let hint = if piece.trim().is_empty() && !prefix.is_empty() {
                    format!(
                        " (the template already puts `{prefix}` before the label: drop the words' \
                         leading space)"
                    )
                } else {
                    String::new()
                };
                bail!(
                    "verbaliser: labels `{}` and `{}` have words (`{}`, `{}`) that start with the \
                     same token `{piece}`, so the model could not tell them apart; give each label \
                     a word whose first token differs (--verbalizer LABEL=WORD){hint}",
                    self.labels[j],
                    self.labels[i],
                    self.label_words[j],
                    self.label_words[i]
                );
            }
            first.push((id, i));
        }
        Ok(())
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
            let mut e = self.encode_prompt(row, origin, tokenizer, reserve)?;
            if self.kind != TaskKind::SeqCls {
                e.example.target = tokenizer.encode(&self.target_text(&e.target_prefix, gold), false)?;
            }
            e.example.gold = gold;
            truncated += e.example.truncated as usize;
            examples.push(e.example);
        }
        Ok(EncodedSet { examples, truncated })
    }

    /// Encodes one row without a label, for prediction: only its prompt is filled (`target` is
    /// empty and `gold` is 0, which scoring never reads). `origin` names the row in errors
    /// (a missing field lists the fields the row has).
    pub fn encode_input(&self, row: &Row, origin: &str, tokenizer: &TextTokenizer) -> Result<Example> {
        let reserve = self.max_target_tokens(tokenizer)?;
        Ok(self.encode_prompt(row, origin.to_string(), tokenizer, reserve)?.example)
    }

    /// The prompt part of one row, room for `reserve` target tokens kept.
    fn encode_prompt(&self, row: &Row, origin: String, tokenizer: &TextTokenizer, reserve: usize) -> Result<Encoded> {
        let enc = self
            .template
            .encode(row, &origin, tokenizer, &self.special, self.max_len, reserve)?;
        Ok(Encoded {
            example: Example {
                origin,
                prompt: enc.tokens,
                target: Vec::new(),
                gold: 0,
                truncated: enc.truncated,
            },
            target_prefix: enc.target_prefix,
        })
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

/// Points the virtual tokens of `examples` at task `task`'s rows of a stacked multitask prompt
/// table `[tasks·p, d]` (see [`crate::prompt::multitask`]): `Soft(v)` becomes `Soft(task·p + v)`,
/// so a batch mixing tasks splices each row's own prompt and the gradient of each task's prompt
/// comes from its own rows only. Task 0 leaves the examples unchanged.
pub fn assign_task(examples: &mut [Example], task: usize, num_virtual_tokens: usize) {
    let offset = task * num_virtual_tokens;
    for e in examples {
        for tok in &mut e.prompt {
            if let Token::Soft(v) = tok {
                *v += offset;
            }
        }
    }
}

/// A row's prompt, before its target is known.
struct Encoded {
    example: Example,
    target_prefix: String,
}

fn preview(labels: &[String]) -> String {
    let shown: Vec<&str> = labels.iter().take(8).map(String::as_str).collect();
    if labels.len() > 8 {
        format!("{}, … {} in all", shown.join(", "), labels.len())
    } else {
        shown.join(", ")
    }
}
