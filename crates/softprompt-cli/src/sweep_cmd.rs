//! `softprompt sweep`: one training run per cell of a grid, with a progress bar over cells.

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use softprompt::sweep::{Axis, Cell, CellResult, CellStart, Grid, Sweep, SweepObserver};
use softprompt::train::Observer;

use crate::train_cmds::{config, Bar, TrainArgs};

/// Arguments of `sweep`: the grid, the seeds, and every `train` option as the base of each cell.
#[derive(Args)]
pub struct SweepArgs {
    /// KEY=V1,V2,… : a training option and its values (repeatable; the cells are the product of
    /// all axes). Values are numbers, words or text; for values with commas give a JSON array,
    /// e.g. --grid 'template=["a, {text} {label}", "b {text} {label}"]'.
    #[arg(long = "grid", required = true, value_name = "KEY=V1,V2,…")]
    grid: Vec<String>,
    /// Runs per cell, with seeds `seed`, `seed + 1`, … (mean ± standard deviation in results.md).
    #[arg(long, default_value_t = 1)]
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

/// A bar over the cells (done / total, time left) above the running cell's step bar.
struct CellsBar {
    cells: ProgressBar,
    run: Bar,
}

impl CellsBar {
    fn new(total: usize) -> CellsBar {
        let multi = MultiProgress::new();
        let cells = multi.add(ProgressBar::new(total as u64));
        cells.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} cells  {msg}  [{elapsed_precise} < {eta_precise}]")
                .expect("valid template"),
        );
        CellsBar {
            cells,
            run: Bar {
                bar: None,
                multi: Some(multi),
            },
        }
    }
}

impl CellsBar {
    /// A line above the bars, or on stderr when they are hidden (not a terminal, e.g. a log).
    fn say(&self, text: &str) {
        if self.cells.is_hidden() {
            eprintln!("{text}");
        } else {
            self.cells.println(text);
        }
    }
}

impl SweepObserver for CellsBar {
    fn cell_start(&mut self, index: usize, total: usize, cell: &Cell, how: CellStart) {
        let what = match how {
            CellStart::Finished => "finished earlier".to_string(),
            CellStart::Resume(step) => format!("resuming at step {step}"),
            CellStart::ScoreOnly => "trained earlier; scoring".to_string(),
            CellStart::Fresh => "training".to_string(),
        };
        self.cells.set_position(index as u64);
        self.cells.set_message(format!("{}: {what}", cell.name));
        if self.cells.is_hidden() {
            eprintln!("cell {}/{total} {}: {what}", index + 1, cell.name);
        }
        if how == CellStart::Finished {
            // Finished cells take no time: leave them out of the time-left estimate.
            self.cells.reset_eta();
        }
    }
    fn cell_done(&mut self, index: usize, _total: usize, cell: &Cell, result: &CellResult) {
        if let Some(b) = self.run.bar.take() {
            b.finish_and_clear();
        }
        self.cells.set_position(index as u64 + 1);
        self.cells
            .println(format!("{}: {} {:.1}%", cell.name, result.metric, 100.0 * result.value));
    }
    fn cell_failed(&mut self, index: usize, _total: usize, cell: &Cell, error: &anyhow::Error) {
        if let Some(b) = self.run.bar.take() {
            b.finish_and_clear();
        }
        self.cells.set_position(index as u64 + 1);
        self.say(&format!("{}: FAILED: {error:#}", cell.name));
    }
    fn run_observer(&mut self) -> &mut dyn Observer {
        &mut self.run
    }
}
