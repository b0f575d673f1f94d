//! `softprompt sweep`: one training run per cell of a grid, with a progress bar over cells.

use anyhow::{bail, Result};
use clap::Args;
use softprompt::sweep::{Axis, Grid, Sweep};

use crate::progress::CellsBar;
use crate::train_config::{config, TrainArgs};

/// Arguments of `sweep`: the grid, the seeds, and every `train` option as the base of each cell.
#[derive(Args)]
pub struct SweepArgs {
    /// KEY=V1,V2,… : a training option and its values (repeatable; the cells are the product of
    /// all axes). Values are numbers, words or text; for values with commas give a JSON array,
    /// e.g. --grid 'template=["a, {text} {label}", "b {text} {label}"]'.
    #[arg(long = "grid", required = true, value_name = "KEY=V1,V2,…")]
    grid: Vec<String>,
    /// Runs per cell, with seeds `seed`, `seed + 1`, … (mean ± standard deviation in results.md).
    #[arg(long, default_value_t = 1, value_parser = crate::args::whole("--seeds", 1, "runs per cell"))]
    seeds: usize,
    /// The base options of every cell (`--config BASE.toml` and any `train` flag; `--output` is
    /// the sweep's folder and must be given).
    #[command(flatten)]
    options: TrainArgs,
}

/// Runs the sweep and prints its table.
pub fn sweep_cmd(args: SweepArgs) -> Result<()> {
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
    let base = config(&args.options)?;
    let axes = args.grid.iter().map(|g| Axis::parse(g)).collect::<Result<Vec<_>>>()?;
    let grid = Grid::new(axes, args.seeds, &base)?;
    let output = base.output.clone();
    let sweep = Sweep::new(base, grid, output.clone())?;
    let mut obs = CellsBar::new(sweep.cells().len());
    let results = sweep.run(&mut obs)?;
    obs.cells.finish_and_clear();
    print!("{}", std::fs::read_to_string(output.join("results.md"))?);
    eprintln!(
        "{} cells; results in {}/results.jsonl, results.md and plot-*.png",
        results.len(),
        output.display()
    );
    Ok(())
}
