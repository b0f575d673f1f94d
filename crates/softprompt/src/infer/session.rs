//! Everything needed to score rows with a trained adapter (or a hand-written template): the
//! task rebuilt from the adapter's `softprompt.json` (or from explicit options for a plain PEFT
//! adapter), the prompt matrix and the classification head.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::Path;

use crate::adapter::run_files::{load_task_file, TASK_FILE};
use crate::adapter::{self, TaskType};
use crate::backbone::{KvCache, LoadedModel, Model};
use crate::data::DataSet;
use crate::loss::ClassifierHead;
use crate::task::{Task, TaskKind};
use crate::template::Template;

pub use super::options::ScoreOptions;

/// A task ready to score rows.
pub struct Session {
    /// The task.
    pub task: Task,
    /// The prompt matrix, when an adapter is used.
    pub prompt: Option<Tensor>,
    /// Classification head (SeqCls adapters).
    pub head: Option<ClassifierHead>,
    /// The one-row key/value prefix of a prefix-tuning or Cartridge adapter (give it to
    /// `Scorer::with_prefix`).
    pub prefix: Option<KvCache>,
    /// DePT's update of the input embeddings `[max_len, hidden]` (give it to
    /// `Scorer::with_input_update`).
    pub input_update: Option<Tensor>,
}

/// Builds a session from an adapter directory and/or options (checked first:
/// [`ScoreOptions::check`]); labels not stored in the adapter are collected from `sets`.
pub fn open(
    model: &LoadedModel,
    adapter_dir: Option<&Path>,
    opts: &ScoreOptions,
    sets: &[&DataSet],
) -> Result<Session> {
    opts.check()?;
    let info = model.backbone.info();
    let mut opts = opts.clone();
    let mut labels: Vec<String> = Vec::new();
    let mut prefix = None;
    let mut input_update = None;
    let (prompt, head) = match adapter_dir {
        Some(dir) => {
            let a = adapter::load_peft(dir)?;
            adapter::check_compatible(&a.config, info)?;
            if dir.join(TASK_FILE).is_file() {
                let tf = load_task_file(dir)?;
                if let Some(t) = &opts.template {
                    if *t != tf.template && !opts.force_template {
                        bail!(
                            "the adapter {} was trained with its own template `{}`; --template `{t}` \
                             would replace it. Leave --template out to use the adapter's, or add \
                             --force-template to score with yours",
                            dir.display(),
                            tf.template
                        );
                    }
                }
                opts.template = opts.template.or(Some(tf.template));
                opts.target_field = opts.target_field.or(Some(tf.target_field));
                opts.task = opts.task.or(Some(tf.task));
                if opts.verbalizer.is_empty() {
                    opts.verbalizer = tf.verbalizer;
                }
                labels = match opts.task_id {
                    Some(t) if !tf.task_labels.is_empty() => tf.task_labels.get(t).cloned().with_context(|| {
                        format!(
                            "task id {t} is out of range: {} has labels for {} tasks (0..{})",
                            dir.join(TASK_FILE).display(),
                            tf.task_labels.len(),
                            tf.task_labels.len()
                        )
                    })?,
                    _ => tf.labels,
                };
            }
            if opts.task.is_none() {
                opts.task = Some(if a.config.task_type == Some(TaskType::SeqCls) {
                    TaskKind::SeqCls
                } else {
                    TaskKind::Classify
                });
            }
            let head = ClassifierHead::from_adapter(&a)?;
            let src = opts
                .template
                .clone()
                .context("this adapter has no softprompt.json; give the template with --template")?;
            let mut t = Template::parse(&src).context("template")?;
            let prefix_cache = super::late_prompt::adapter_prefix(&*model.backbone, &a)?;
            if let (Some(layer), Some(cache)) = (a.late_prompt_layer()?, &prefix_cache) {
                // The adapter's keys and values stand for the template's leading `[soft:p]`.
                if t.num_virtual_tokens() > 0 {
                    let rest = t
                        .without_leading_soft()
                        .filter(|_| t.num_virtual_tokens() == cache.len())
                        .with_context(|| {
                            format!(
                                "{} is a late-prompt-tuning adapter (its {} virtual tokens enter at layer {layer}); \
                                 the template `{src}` must start with `[soft:{}]` and have no other virtual tokens",
                                dir.display(),
                                cache.len(),
                                cache.len()
                            )
                        })?;
                    t = Template::parse(&rest).context("template")?;
                    opts.template = Some(rest);
                }
            }
            if let Some(cache) = prefix_cache {
                if let Some(t) = opts.task_id {
                    bail!(
                        "task id {t} was given, but {} is a {} adapter (task ids are for MULTITASK_PROMPT_TUNING adapters)",
                        dir.display(),
                        a.config.peft_type().as_str()
                    );
                }
                if t.num_virtual_tokens() > 0 {
                    bail!(
                        "a {} adapter puts its keys and values before the input in every layer; the template must have no [soft:..] tokens",
                        a.config.peft_type().as_str()
                    );
                }
                prefix = Some(cache.to_device(model.backbone.device())?);
                (None, head)
            } else {
                let prompt = a.input_prompt_for(opts.task_id)?.to_device(model.backbone.device())?;
                input_update = a
                    .input_update()?
                    .map(|u| u.to_device(model.backbone.device()))
                    .transpose()?;
                if t.num_virtual_tokens() == 0 {
                    opts.template = Some(format!("[soft:{}]{src}", prompt.dim(0)?));
                }
                (Some(prompt), head)
            }
        }
        None if opts.task_id.is_some() => {
            bail!("--task-id selects a multitask adapter's prompt; give the adapter (--adapter)")
        }
        None => (None, None),
    };
    let kind = opts.task.unwrap_or(match model.backbone {
        Model::Causal(_) => TaskKind::Classify,
        Model::Encoder(_) => TaskKind::SeqCls,
    });
    if kind == TaskKind::SeqCls && head.is_none() {
        bail!("sequence classification needs an adapter with a classifier head (base_model.classifier.*)");
    }
    let target_field = opts.target_field.clone().unwrap_or_else(|| "label".into());
    let src = opts
        .template
        .clone()
        .context("give a template (--template) or an adapter (--adapter)")?;
    let template = Template::parse(&src).context("template")?.with_target(&target_field)?;
    if let Some(p) = &prompt {
        if template.num_virtual_tokens() != p.dim(0)? {
            bail!(
                "the template has {} virtual tokens but the adapter's prompt has {}",
                template.num_virtual_tokens(),
                p.dim(0)?
            );
        }
    } else if template.num_virtual_tokens() > 0 {
        bail!("the template has [soft:..] tokens; give the adapter that learned them (--adapter)");
    }
    if labels.is_empty() {
        labels = Task::labels_from(sets, &target_field)?;
    }
    let task = Task::new(kind, template, labels, &opts.verbalizer, &model.tokenizer, opts.max_len)?;
    Ok(Session {
        task,
        prompt,
        head,
        prefix,
        input_update,
    })
}
