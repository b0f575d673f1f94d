//! Classifying single inputs with an adapter trained for classification (its `softprompt.json`
//! names a `classify` or `seq-cls` task and its labels): each input's fields go through the
//! adapter's template and [`Scorer`] scores every label; the scores become probabilities over
//! the labels (a softmax of the label words' full log-probabilities, or of the head's logits).

use anyhow::{bail, Context, Result};
use std::path::Path;

use super::evaluate::Scorer;
use super::sampling::log_softmax_at;
use super::session::{self, ScoreOptions, Session};
use crate::adapter::run_files::{AdapterTask, TASK_FILE};
use crate::backbone::LoadedModel;
use crate::data::Row;
use crate::task::{Example, TaskKind};
use crate::tokenizer::TextTokenizer;

/// Rows scored per forward pass.
const BATCH: usize = 8;

/// An adapter ready to classify inputs.
pub struct Classifier {
    session: Session,
}

/// One input's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Classification {
    /// The most probable label.
    pub label: String,
    /// The probability of each label, in [`Classifier::labels`] order (they sum to 1).
    pub probabilities: Vec<f32>,
}

impl Classifier {
    /// The classifier of the adapter in `dir` (its own task, with the default
    /// [`ScoreOptions`]), or `None` when the adapter was not trained for
    /// classification (no `softprompt.json`, a `generate` task, or no labels). Broken files are
    /// errors naming them.
    pub fn from_adapter(model: &LoadedModel, dir: &Path) -> Result<Option<Self>> {
        if !dir.join(TASK_FILE).is_file() {
            return Ok(None);
        }
        // Read without its warnings: `session::open` reads it again and says them once.
        let tf = AdapterTask::read(dir)?;
        if tf.task == TaskKind::Generate || tf.labels.is_empty() {
            return Ok(None);
        }
        let session = session::open(model, Some(dir), &ScoreOptions::default(), &[])
            .with_context(|| format!("classification adapter {}", dir.display()))?;
        Ok(Some(Self { session }))
    }

    /// The labels, in the order of [`Classification::probabilities`].
    pub fn labels(&self) -> &[String] {
        &self.session.task.labels
    }

    /// The task kind (`classify` or `seq-cls`).
    pub fn kind(&self) -> TaskKind {
        self.session.task.kind
    }

    /// The fields an input must have (the template's, the label's excluded), in order.
    pub fn input_fields(&self) -> Vec<String> {
        self.session
            .task
            .template
            .fields()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// A row from a bare text: the template's one input field set to `text`. A template with
    /// several input fields needs them named (an error listing them).
    pub fn row_from_text(&self, text: &str) -> Result<Row> {
        match &self.input_fields()[..] {
            [field] => {
                let mut row = Row::new();
                row.insert(field.clone(), text.into());
                Ok(row)
            }
            fields => bail!(
                "the adapter's template has {} input fields ({}); give each input as an object with them",
                fields.len(),
                fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Encodes `rows` through the adapter's template; a row is named `input[i]` in errors (a
    /// missing field lists the fields the row has).
    pub fn encode(&self, tokenizer: &TextTokenizer, rows: &[Row]) -> Result<Vec<Example>> {
        rows.iter()
            .enumerate()
            .map(|(i, row)| self.session.task.encode_input(row, &format!("input[{i}]"), tokenizer))
            .collect()
    }

    /// Classifies rows encoded by [`Classifier::encode`].
    pub fn classify(&self, model: &LoadedModel, examples: &[Example]) -> Result<Vec<Classification>> {
        let s = &self.session;
        let scorer = Scorer::new(model, &s.task, s.prompt.as_ref(), s.head.as_ref())?
            .with_prefix(s.prefix.as_ref())
            .with_input_update(s.input_update.as_ref())
            .exhaustive();
        let scores = scorer.scores(examples, BATCH)?;
        Ok(scores
            .into_iter()
            .map(|sc| {
                let probabilities: Vec<f32> = (0..sc.len()).map(|i| log_softmax_at(&sc, i).exp()).collect();
                let best = super::score::argmax(&probabilities);
                Classification {
                    label: s.task.labels[best].clone(),
                    probabilities,
                }
            })
            .collect())
    }
}
