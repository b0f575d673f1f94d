//! Scoring a data set whose rows belong to the tasks of a multitask adapter: each row's task id
//! (a `--task-id` for every row, or the row's own `task_id` field), each task's rows scored
//! with that task's prompt and labels, the results joined (per-task accuracy and the mean, the
//! predictions in file order).

use anyhow::{bail, Result};
use std::path::Path;

use super::evaluate::{EvalResult, Scorer};
use super::session::{self, ScoreOptions};
use crate::backbone::LoadedModel;
use crate::data::DataSet;

/// The field of a row that holds its task id.
pub const TASK_ID_FIELD: &str = "task_id";

/// The task id of every row: `flag` for all of them, or else each row's `task_id` field (an
/// integer in `0..num_tasks`). Errors name the row (`FILE:LINE`) and the field.
pub fn row_task_ids(ds: &DataSet, flag: Option<usize>, num_tasks: usize) -> Result<Vec<usize>> {
    if let Some(t) = flag {
        if t >= num_tasks {
            bail!("--task-id {t} is out of range: the adapter has {num_tasks} tasks (0..{num_tasks})");
        }
        return Ok(vec![t; ds.len()]);
    }
    ds.rows()
        .map(|(origin, row)| {
            let Some(v) = row.get(TASK_ID_FIELD) else {
                bail!(
                    "{origin}: the row has no `{TASK_ID_FIELD}` field; a multitask adapter needs each row's task \
                     (a `{TASK_ID_FIELD}` field, or --task-id N for every row)"
                );
            };
            match v.as_u64() {
                Some(t) if (t as usize) < num_tasks => Ok(t as usize),
                _ => bail!(
                    "{origin}: field `{TASK_ID_FIELD}` is {v}; it must be an integer in 0..{num_tasks} (the adapter's tasks)"
                ),
            }
        })
        .collect()
}

/// The rows of each task, in task-id order: `(task, positions in ds, rows)`.
pub fn split_by_task(ds: &DataSet, ids: &[usize]) -> Vec<(usize, Vec<usize>, DataSet)> {
    let mut tasks: Vec<usize> = ids.to_vec();
    tasks.sort_unstable();
    tasks.dedup();
    tasks
        .into_iter()
        .map(|t| {
            let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == t).collect();
            let records = positions.iter().map(|&i| ds.records[i].clone()).collect();
            let rows = DataSet {
                source: ds.source.clone(),
                records,
            };
            (t, positions, rows)
        })
        .collect()
}

/// Scores `ds` with the multitask adapter in `adapter_dir`: the rows of each task with its
/// prompt and labels ([`session::open`] with its task id; `opts.task_id`, when given, for every
/// row), joined by [`EvalResult::by_task`]. `done` hears the number of rows scored so far.
pub fn evaluate_by_task(
    model: &LoadedModel,
    adapter_dir: &Path,
    opts: &ScoreOptions,
    ds: &DataSet,
    done: &mut dyn FnMut(usize),
) -> Result<EvalResult> {
    let num_tasks = crate::adapter::load_peft(adapter_dir)?.num_tasks();
    let ids = row_task_ids(ds, opts.task_id, num_tasks)?;
    let mut parts = Vec::new();
    let mut scored = 0;
    for (task, positions, rows) in split_by_task(ds, &ids) {
        let task_opts = ScoreOptions {
            task_id: Some(task),
            ..opts.clone()
        };
        let s = session::open(model, Some(adapter_dir), &task_opts, &[&rows])?;
        let examples = s.task.encode_set(&rows, &model.tokenizer)?.examples;
        let r = Scorer::new(model, &s.task, s.prompt.as_ref(), s.head.as_ref())?
            .with_prefix(s.prefix.as_ref())
            .with_input_update(s.input_update.as_ref())
            .evaluate_with_progress(&examples, opts.batch, opts.exact_match, &mut |n| done(scored + n))?;
        scored += examples.len();
        parts.push((task, positions, r));
    }
    EvalResult::by_task(parts)
}
