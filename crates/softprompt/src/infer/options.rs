//! [`ScoreOptions`]: how a data set is scored with the frozen model — the one set of options
//! behind `eval`, `predict`, `eval --templates` and the server's classifier. What an adapter's
//! `softprompt.json` stores (template, target field, task kind, verbaliser) fills the options
//! left unset.

use anyhow::{bail, Result};
use std::collections::BTreeMap;

use crate::task::{check_verbalizer, TaskKind};

/// The longest sequence scoring allows unless told otherwise, in tokens. Training's default is
/// 256 (`TrainConfig::max_len`) because a training step keeps every position's activations for
/// the backward pass; scoring keeps none, so longer inputs cost only their forward pass, and a
/// row cut to fit would be scored as a different text (truncating a review changes its score).
pub const SCORE_MAX_LEN: usize = 512;

/// Rows per forward pass when scoring a data set, unless told otherwise.
pub const SCORE_BATCH: usize = 16;

/// How rows are scored: the task (when the adapter does not describe it, or to override it)
/// and the scoring itself. [`Default`] is what an adapter's own files ask for, with
/// [`SCORE_MAX_LEN`] and [`SCORE_BATCH`].
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Template; for a plain PEFT adapter `[soft:N]` is prepended when it has no soft tokens.
    pub template: Option<String>,
    /// Target field (default `label`).
    pub target_field: Option<String>,
    /// Task kind (default: classify on causal models, seq-cls on encoders).
    pub task: Option<TaskKind>,
    /// Label → verbaliser word.
    pub verbalizer: BTreeMap<String, String>,
    /// Longest sequence, in tokens; longer rows have their fields truncated.
    pub max_len: usize,
    /// Let `template` replace the template an adapter was trained with (`--force-template`).
    pub force_template: bool,
    /// The task id of a multitask adapter (`--task-id`): its prompt and, when the adapter's
    /// `softprompt.json` has them, its labels. Refused for the other adapters.
    pub task_id: Option<usize>,
    /// Rows per forward pass.
    pub batch: usize,
    /// Also generate greedily and report exact match.
    pub exact_match: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            template: None,
            target_field: None,
            task: None,
            verbalizer: BTreeMap::new(),
            max_len: SCORE_MAX_LEN,
            force_template: false,
            task_id: None,
            batch: SCORE_BATCH,
            exact_match: false,
        }
    }
}

impl ScoreOptions {
    /// Refuses options that cannot work, before any model is needed; messages name the flags.
    pub fn check(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("--batch 0: the rows per batch must be at least 1");
        }
        if self.max_len == 0 {
            bail!("--max-len 0: the longest sequence must be at least 1 token");
        }
        check_verbalizer(&self.verbalizer, "--verbalizer")?;
        if self.force_template && self.template.is_none() {
            bail!("--force-template needs --template");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_impossible_options_name_their_flag() {
        ScoreOptions::default().check().unwrap();
        let e = |o: ScoreOptions| format!("{:#}", o.check().unwrap_err());
        let d = ScoreOptions::default;
        assert!(e(ScoreOptions { batch: 0, ..d() }).contains("--batch 0"));
        assert!(e(ScoreOptions { max_len: 0, ..d() }).contains("--max-len 0"));
        assert!(e(ScoreOptions {
            force_template: true,
            ..d()
        })
        .contains("--force-template needs --template"));
        let words = |pairs: &[(&str, &str)]| pairs.iter().map(|(l, w)| (l.to_string(), w.to_string())).collect();
        let two = ScoreOptions {
            verbalizer: words(&[("negative", " good"), ("positive", " good")]),
            ..d()
        };
        assert!(e(two).contains("--verbalizer: labels `negative` and `positive` both map to the word ` good`"));
    }
}
