//! Step 1 of a run: load the model on the configured device, read and encode the data (one
//! task, or the sets of every task of a multitask run).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use super::{DataOrder, Observer};
use crate::backbone::{self, LoadedModel, Model, ModelInfo};
use crate::config::{option, run_template, Method, TaskData, TrainConfig};
use crate::data::{field_text, read_jsonl, DataSet};
use crate::model_source;
use crate::task::{assign_task, Example, Task, TaskKind};
use crate::template::Template;

/// Everything prepared for training: model, task(s), encoded data.
pub struct Prepared {
    /// Configuration.
    pub cfg: TrainConfig,
    /// The folder this run writes into: `cfg.output`, or a staging folder beside it that
    /// replaces it at the end (`overwrite`).
    pub out_dir: PathBuf,
    /// Loaded model and tokenizer.
    pub model: LoadedModel,
    /// One entry per task id: one, unless multitask prompt tuning trains several.
    pub tasks: Vec<TaskSplit>,
    /// Encoded training rows of every task, task after task (`TaskSplit::train_rows` each);
    /// a multitask row's virtual tokens index its task's rows of the stacked prompt
    /// ([`crate::task::assign_task`]).
    pub train: Vec<Example>,
    /// Training rows whose fields were truncated.
    pub(crate) truncated_train: usize,
    /// CPT's context (method `cpt`), built from the first training rows.
    pub cpt: Option<crate::prompt::cpt::CptConfig>,
    /// The processes that train together ([`super::collective::Single`] unless
    /// [`super::train_with`] was given others).
    pub(crate) comm: std::rc::Rc<dyn super::Collective>,
}

/// One task of a run: its definition (template, labels) and its encoded dev and test rows.
pub struct TaskSplit {
    /// The task (template with virtual tokens, this task's labels).
    pub task: Task,
    /// Number of this task's rows in [`Prepared::train`].
    pub train_rows: usize,
    /// Encoded dev rows.
    pub dev: Vec<Example>,
    /// Encoded test rows.
    pub test: Vec<Example>,
    /// Raw test set (for the baseline).
    pub(crate) test_set: Option<DataSet>,
}

impl Prepared {
    /// The task of task id 0 (the only one unless multitask).
    pub fn task(&self) -> &Task {
        &self.tasks[0].task
    }

    /// The order of the training rows: a permutation per epoch, or for several tasks each
    /// task's rows in turn (every batch draws from every task).
    pub fn data_order(&self) -> DataOrder {
        let sizes: Vec<usize> = self.tasks.iter().map(|t| t.train_rows).collect();
        DataOrder::tasks(self.cfg.seed, &sizes)
    }
}

/// The data files of one task.
struct TaskFiles {
    train: DataSet,
    dev: Option<DataSet>,
    test: Option<DataSet>,
}

/// Reads the data of every task: the sets of option `tasks`, or `train`/`dev`/`test`.
fn read_tasks(cfg: &TrainConfig) -> Result<Vec<TaskFiles>> {
    let one = TaskData {
        train: cfg.train.clone(),
        dev: cfg.dev.clone(),
        test: cfg.test.clone(),
    };
    let sets = if cfg.tasks.is_empty() {
        std::slice::from_ref(&one)
    } else {
        &cfg.tasks[..]
    };
    sets.iter()
        .map(|t| {
            Ok(TaskFiles {
                train: read_set(&t.train, None)?,
                dev: t.dev.as_deref().map(|p| read_set(p, cfg.dev_rows)).transpose()?,
                test: t.test.as_deref().map(|p| read_set(p, cfg.test_rows)).transpose()?,
            })
        })
        .collect()
}

/// The labels of one task's data (see [`class_labels`] for classification).
fn task_labels(cfg: &TrainConfig, f: &TaskFiles) -> Result<Vec<String>> {
    match cfg.task {
        // Generation ranks every target seen anywhere (a test question may have a new answer).
        TaskKind::Generate => {
            let all: Vec<&DataSet> = [Some(&f.train), f.dev.as_ref(), f.test.as_ref()]
                .into_iter()
                .flatten()
                .collect();
            Task::labels_from(&all, &cfg.target_field)
        }
        TaskKind::Classify | TaskKind::SeqCls => {
            class_labels(cfg, &f.train, &[("dev", f.dev.as_ref()), ("test", f.test.as_ref())])
        }
    }
}

fn read_set(path: &Path, limit: Option<usize>) -> Result<DataSet> {
    let mut ds = read_jsonl(path)?;
    if let Some(n) = limit {
        ds.records.truncate(n);
    }
    Ok(ds)
}

/// For classification, the classes are the labels of the training rows: a label seen only in
/// the dev or test set would be a class without a single training row.
fn class_labels(cfg: &TrainConfig, train: &DataSet, others: &[(&str, Option<&DataSet>)]) -> Result<Vec<String>> {
    let labels = Task::labels_from(&[train], &cfg.target_field)?;
    if let [only] = &labels[..] {
        bail!(
            "every training row of {} has the label `{only}`: a classifier needs rows of at least \
             two labels (field `{}`)",
            train.source.display(),
            cfg.target_field
        );
    }
    for (name, set) in others {
        let Some(set) = set else { continue };
        for (origin, row) in set.rows() {
            let label = field_text(row, &cfg.target_field, &origin)?;
            if labels.binary_search(&label).is_err() {
                bail!(
                    "{origin}: label `{label}` appears in the {name} set but in no training row of \
                     {}; a class without training rows cannot be learned (training labels: {})",
                    train.source.display(),
                    labels.join(", ")
                );
            }
        }
    }
    Ok(labels)
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
        (_, Model::Encoder(_)) if cfg.method == Method::Cartridge => bail!(
            "method `cartridge` runs on causal language models; {} is an encoder (use method = \
             \"prefix-tuning\": p-tuning v2's per-layer keys and values)",
            cfg.model
        ),
        _ => check_prefix_positions(cfg, model.info()),
    }
}

/// A key/value prefix moves the input's positions by its length: refuses a prefix and
/// `max_len` that together exceed the model's positions.
fn check_prefix_positions(cfg: &TrainConfig, info: &ModelInfo) -> Result<()> {
    let v = cfg.num_virtual_tokens;
    if cfg.method.is_kv_prefix() && v + cfg.max_len > info.max_positions {
        bail!(
            "{} ({v}) + {} ({}) exceed the {} positions of {}: the input's positions start after the \
             key/value prefix; lower one of them (e.g. max_len = {})",
            option("num_virtual_tokens"),
            option("max_len"),
            cfg.max_len,
            info.max_positions,
            cfg.model,
            info.max_positions.saturating_sub(v)
        );
    }
    Ok(())
}

/// The options with `batch` at most the number of training rows (a larger micro-batch would
/// hold some rows several times, and a huge one cannot be allocated): said, not silent.
fn batch_within_data(cfg: &TrainConfig, files: &[TaskFiles], obs: &mut dyn Observer) -> TrainConfig {
    let rows: usize = files.iter().map(|f| f.train.records.len()).sum();
    let mut cfg = cfg.clone();
    if rows > 0 && cfg.batch > rows {
        obs.message(&format!(
            "warning: {} is {} but the training data has {rows} rows; each micro-batch takes all {rows}",
            option("batch"),
            cfg.batch
        ));
        cfg.batch = rows;
    }
    cfg
}

/// Checks the options and reads the data, then loads the model (on the device of option
/// `device`) and encodes every row. Writes nothing.
pub fn prepare(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<Prepared> {
    cfg.validate()?;
    let device = cfg.device()?;
    let files = read_tasks(cfg)?;
    let cfg = &batch_within_data(cfg, &files, obs);
    let labels: Vec<Vec<String>> = files.iter().map(|f| task_labels(cfg, f)).collect::<Result<_>>()?;
    let location = model_source::resolve(&cfg.model)?;
    let options = backbone::LoadOptions {
        storage: cfg.weights,
        path: cfg.kernels,
    };
    let model = backbone::load_with(&location, &device, options)?;
    check_task(cfg, &model.backbone)?;
    let multitask = cfg.method == Method::MultitaskPromptTuning;
    let mut tasks = Vec::with_capacity(files.len());
    let mut train = Vec::new();
    let mut truncated_train = 0;
    let mut cpt = None;
    for (id, (f, labels)) in files.into_iter().zip(labels).enumerate() {
        let mut task = Task::new(
            cfg.task,
            run_template(cfg)?,
            labels,
            &cfg.verbalizer,
            &model.tokenizer,
            cfg.max_len,
        )?;
        if cfg.method == Method::Cpt {
            task.template = Template::parse(&cfg.template)?.with_target(&cfg.target_field)?;
            let context = super::cpt::build_context(cfg, &task, &f.train, &model.tokenizer)?;
            task.template = super::cpt::run_template(cfg, context.len())?;
            cpt = Some(context);
        }
        let encode = |ds: &DataSet| task.encode_set(ds, &model.tokenizer);
        let mut rows = encode(&f.train)?;
        if rows.truncated > 0 {
            obs.message(&format!(
                "warning: {} of {} training rows of {} were longer than max_len {} and had their fields truncated",
                rows.truncated,
                rows.examples.len(),
                f.train.source.display(),
                cfg.max_len
            ));
        }
        if multitask {
            assign_task(&mut rows.examples, id, task.template.num_virtual_tokens());
        }
        let encode_opt = |ds: &Option<DataSet>| -> Result<Vec<Example>> {
            Ok(ds
                .as_ref()
                .map(encode)
                .transpose()?
                .map(|s| s.examples)
                .unwrap_or_default())
        };
        let split = TaskSplit {
            train_rows: rows.examples.len(),
            dev: encode_opt(&f.dev)?,
            test: encode_opt(&f.test)?,
            test_set: f.test,
            task,
        };
        truncated_train += rows.truncated;
        train.extend(rows.examples);
        tasks.push(split);
    }
    Ok(Prepared {
        out_dir: cfg.output.clone(),
        cfg: cfg.clone(),
        model,
        tasks,
        train,
        truncated_train,
        cpt,
        comm: std::rc::Rc::new(super::collective::Single),
    })
}
