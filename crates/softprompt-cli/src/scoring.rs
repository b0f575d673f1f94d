//! Scoring a JSONL set as `eval` and `predict` do: the rows read, the model loaded, the task
//! opened from the adapter and/or the options (each task of a multitask adapter on its own
//! rows), every row scored with a progress bar.

use anyhow::Result;
use softprompt::data::DataSet;
use softprompt::infer::by_task;
use softprompt::infer::evaluate::{EvalResult, Scorer};
use softprompt::infer::session;

use crate::args::ScoreArgs;
use crate::progress::rows_bar;

/// Scores `--data` (its first `--rows` rows) as `args` say; returns the result and the rows.
pub fn score(args: &ScoreArgs) -> Result<(EvalResult, DataSet)> {
    args.check()?;
    let data = args.read_data()?;
    let model = args.model.load()?;
    let opts = args.options();
    let multitask = match args.adapter.as_deref() {
        Some(dir) => softprompt::adapter::load_peft(dir)?.is_multitask().then_some(dir),
        None => None,
    };
    if let Some(dir) = multitask {
        let bar = rows_bar(data.len());
        let r = by_task::evaluate_by_task(&model, dir, &opts, &data, &mut |done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        return Ok((r, data));
    }
    let s = session::open(&model, args.adapter.as_deref(), &opts, &[&data])?;
    let examples = s.task.encode_set(&data, &model.tokenizer)?;
    if examples.truncated > 0 {
        eprintln!(
            "warning: {} rows were longer than --max-len {} and had their fields truncated",
            examples.truncated, opts.max_len
        );
    }
    let scorer = Scorer::new(&model, &s.task, s.prompt.as_ref(), s.head.as_ref())?
        .with_prefix(s.prefix.as_ref())
        .with_input_update(s.input_update.as_ref());
    let bar = rows_bar(examples.examples.len());
    let r = scorer.evaluate_with_progress(&examples.examples, opts.batch, opts.exact_match, &mut |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok((r, data))
}
