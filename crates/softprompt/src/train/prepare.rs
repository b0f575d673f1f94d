//! Step 1 of a run: load the model on the configured device, read and encode the data.

use anyhow::{bail, Context, Result};
use std::path::Path;

use super::Observer;
use crate::backbone::{self, LoadedModel, Model};
use crate::config::TrainConfig;
use crate::data::{read_jsonl, DataSet};
use crate::model_source;
use crate::task::{Example, Task, TaskKind};
use crate::template::Template;

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
    pub(crate) test_set: Option<DataSet>,
    /// Training rows whose fields were truncated.
    pub(crate) truncated_train: usize,
}

fn read_set(path: &Path, limit: Option<usize>) -> Result<DataSet> {
    let mut ds = read_jsonl(path)?;
    if let Some(n) = limit {
        ds.records.truncate(n);
    }
    Ok(ds)
}

/// The template of a run: without any virtual token, `[soft:N]` is prepended (prompt tuning).
/// A key/value prefix (prefix tuning, Cartridges) enters every attention layer instead, so its
/// template must have no virtual tokens.
pub fn run_template(cfg: &TrainConfig) -> Result<Template> {
    let t = Template::parse(&cfg.template).context("option `template`")?;
    if cfg.method.is_kv_prefix() && t.num_virtual_tokens() > 0 {
        bail!(
            "option `template`: method `{}` learns keys and values before the input in every layer; remove the [soft:..] tokens (`num_virtual_tokens` sets the prefix length)",
            serde_json::to_value(cfg.method)?.as_str().unwrap_or_default()
        );
    }
    let t = if t.num_virtual_tokens() == 0 && !cfg.method.is_kv_prefix() {
        Template::parse(&format!("[soft:{}]{}", cfg.num_virtual_tokens, cfg.template)).context("option `template`")?
    } else {
        t
    };
    t.with_target(&cfg.target_field).context("option `template`")
}

/// Refuses a task the model cannot run.
fn check_task(cfg: &TrainConfig, model: &Model) -> Result<()> {
    match (cfg.task, model) {
        (TaskKind::SeqCls, Model::Causal(_)) => bail!(
            "task `seq-cls` needs an encoder model (e.g. minilm-l6); {} is causal",
            cfg.model
        ),
        (TaskKind::Classify | TaskKind::Generate, Model::Encoder(_)) => bail!(
            "task `{:?}` needs a causal language model; {} is an encoder (use task = \"seq-cls\")",
            cfg.task,
            cfg.model
        ),
        _ => Ok(()),
    }
}

/// Loads the model (on the device of option `device`) and the data, and encodes every row.
pub fn prepare(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<Prepared> {
    let device = cfg.device()?;
    check_output_dir(&cfg.output)?;
    let location = model_source::resolve(&cfg.model)?;
    let model = backbone::load(&location, &device)?;
    check_task(cfg, &model.backbone)?;
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
    let encode_opt = |ds: &Option<DataSet>| -> Result<Vec<Example>> {
        Ok(ds
            .as_ref()
            .map(encode)
            .transpose()?
            .map(|s| s.examples)
            .unwrap_or_default())
    };
    let dev = encode_opt(&dev_set)?;
    let test = encode_opt(&test_set)?;
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
