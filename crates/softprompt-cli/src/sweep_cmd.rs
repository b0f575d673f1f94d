//! `softprompt sweep`: one training run per cell of a grid, with a progress bar over cells; a
//! share of the cells per process (`--shard`, Slurm job arrays, MPI ranks); `--report` merges.

use anyhow::{bail, Result};
use clap::Args;
use softprompt::sweep::{Axis, Grid, Merge, Shard, Sweep};
use std::path::{Path, PathBuf};

use crate::progress::CellsBar;
use crate::train_config::{config, TrainArgs};

/// Arguments of `sweep`: the grid, the seeds, and every `train` option as the base of each cell.
#[derive(Args)]
pub struct SweepArgs {
    /// KEY=V1,V2,… : a training option and its values (repeatable; the cells are the product of
    /// all axes). Values are numbers, words or text; for values with commas give a JSON array,
    /// e.g. --grid 'template=["a, {text} {label}", "b {text} {label}"]'.
    #[arg(long = "grid", required_unless_present = "report", value_name = "KEY=V1,V2,…")]
    grid: Vec<String>,
    /// Runs per cell, with seeds `seed`, `seed + 1`, … (mean ± standard deviation in results.md).
    #[arg(long, default_value_t = 1, value_parser = crate::args::whole("--seeds", 1, "runs per cell"))]
    seeds: usize,
    /// Run only shard I of N (counted from 1): the cells whose place in the grid, modulo N, is
    /// I − 1. Every shard writes its cells into the same --output folder; the one that finishes
    /// last writes the summaries. Without it, a Slurm job array's task or an MPI rank
    /// (mpirun/srun) takes its share the same way.
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Only merge: write results.jsonl, results.md and the plots of the sweep in DIR from the
    /// cells its shards finished (an error names the cells still without a result).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["grid", "shard"])]
    report: Option<PathBuf>,
    /// The base options of every cell (`--config BASE.toml` and any `train` flag; `--output` is
    /// the sweep's folder and must be given).
    #[command(flatten)]
    options: TrainArgs,
}

/// Runs the sweep (or this process's shard of it, or only its report) and prints its table.
pub fn sweep_cmd(args: SweepArgs) -> Result<()> {
    if let Some(dir) = &args.report {
        // `given` holds every flag on the command line, the sweep's own included.
        if let Some(other) = args.options.given.iter().find(|g| *g != "report") {
            bail!(
                "--report DIR takes no other option (--{}): the sweep's own options are in \
                 DIR/sweep.json",
                other.replace('_', "-")
            );
        }
        let results = softprompt::sweep::spec::read(dir)?.report()?;
        return print_summary(dir, results.len());
    }
    for owned in ["resume", "overwrite"] {
        if args.options.given.iter().any(|g| g == owned) {
            bail!(
                "--{owned} does not apply to a sweep: run the same sweep command again to resume \
                 it (finished cells are skipped, interrupted ones continue from their checkpoint)"
            );
        }
    }
    if !args.options.given.iter().any(|g| g == "output") {
        bail!("sweep needs --output DIR: the folder that holds one subfolder per cell and the results");
    }
    let shard = match args.shard {
        Some(shard) => shard,
        None => Shard::from_env(|name| std::env::var(name).ok())?.unwrap_or(Shard::WHOLE),
    };
    let base = config(&args.options)?;
    let axes = args.grid.iter().map(|g| Axis::parse(g)).collect::<Result<Vec<_>>>()?;
    let grid = Grid::new(axes, args.seeds, &base)?;
    let output = base.output.clone();
    let sweep = Sweep::new(base, grid, output.clone())?.with_shard(shard);
    let mine = (0..sweep.cells().len()).filter(|&i| shard.takes(i)).count();
    if shard.is_part() {
        eprintln!("shard {shard}: {mine} of the sweep's {} cells", sweep.cells().len());
    }
    let mut obs = CellsBar::new(mine);
    let results = sweep.run(&mut obs)?;
    obs.cells.finish_and_clear();
    if !shard.is_part() {
        return print_summary(&output, results.len());
    }
    match sweep.merge()? {
        Merge::Written(all) => print_summary(&output, all.len()),
        Merge::Unfinished(missing) => {
            eprintln!(
                "shard {shard} done ({} cells); {} cells of other shards have no result yet: the \
                 shard that finishes last writes the summaries, or run `softprompt sweep --report {}`",
                results.len(),
                missing.len(),
                output.display()
            );
            Ok(())
        }
    }
}

/// Prints the sweep's table and where its summaries are.
fn print_summary(dir: &Path, cells: usize) -> Result<()> {
    print!("{}", std::fs::read_to_string(dir.join("results.md"))?);
    eprintln!(
        "{cells} cells; results in {}/results.jsonl, results.md and plot-*.png",
        dir.display()
    );
    Ok(())
}
