//! `softprompt train`: one training run with a progress bar; prints the run's summary as JSON.
//! Under `mpirun`/`srun` (feature `mpi`) every rank trains its share of each batch; rank 0 alone
//! shows the progress, writes the run and prints the summary.

use anyhow::Result;
use softprompt::train::{self, Quiet};

use crate::progress::Bar;
use crate::ranks::Ranks;
use crate::train_config::{config, TrainArgs};

/// Arguments of `train`: the training options, and the threads of this process.
#[derive(clap::Args)]
pub struct TrainCmdArgs {
    /// The training options.
    #[command(flatten)]
    pub options: TrainArgs,
    /// Compute threads of this process (of each rank under mpirun or srun) [default: the cores
    /// it was given: all, or those the launcher bound it to].
    #[arg(long, value_parser = crate::args::whole("--threads", 1, "compute threads of this process"))]
    pub threads: Option<usize>,
}

/// Runs `train`.
pub fn train_cmd(cmd: TrainCmdArgs) -> Result<()> {
    let TrainCmdArgs { options: args, threads } = cmd;
    let ranks = Ranks::start()?;
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| ranks.fail(anyhow::anyhow!("--threads {n}: {e}")))?;
    }
    let cfg = config(&args).map_err(|e| ranks.fail(e))?;
    let mut bar = Bar::default();
    let obs: &mut dyn train::Observer = if ranks.rank() == 0 { &mut bar } else { &mut Quiet };
    let report = train::train_with(&cfg, obs, ranks.comm()).map_err(|e| ranks.fail(e))?;
    bar.clear();
    if ranks.rank() != 0 {
        return Ok(());
    }
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
