//! `softprompt train`: one training run with a progress bar; prints the run's summary as JSON.

use anyhow::Result;
use softprompt::train;

use crate::progress::Bar;
use crate::train_config::{config, TrainArgs};

/// Runs `train`.
pub fn train_cmd(args: TrainArgs) -> Result<()> {
    let cfg = config(&args)?;
    let mut bar = Bar::default();
    let report = train::train(&cfg, &mut bar)?;
    bar.clear();
    let mut summary = serde_json::json!({
        "baseline_test_accuracy": report.baseline_test.as_ref().map(|r| r.accuracy),
        "test_accuracy": report.test.as_ref().map(|r| r.accuracy),
        "test_exact_match": report.test.as_ref().and_then(|r| r.exact_match),
        "test_rows": report.test.as_ref().map(|r| r.n),
        "best_dev_accuracy": report.best_dev.map(|b| b.0),
        "best_step": report.best_dev.map(|b| b.1),
        "steps": report.steps,
        "steps_run": report.steps_run,
        "train_seconds": report.train_seconds,
        "seconds_per_step": report.train_seconds / report.steps_run.max(1) as f64,
        "truncated_train_rows": report.truncated_train_rows,
        "stopped_early": report.stopped_early,
        "adapter": report.adapter_dir,
        "plot": report.adapter_dir.join("training.png"),
    });
    // A multitask run's per-task metrics (their mean is the accuracy above).
    for (key, r) in [
        ("baseline_test_tasks", &report.baseline_test),
        ("test_tasks", &report.test),
    ] {
        if let Some(r) = r.as_ref().filter(|r| !r.tasks.is_empty()) {
            summary[key] = serde_json::to_value(&r.tasks)?;
        }
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
