//! Sweeps: one training run per cell of a grid over training options (times seeds), each in its
//! own folder, resumable, summarised as `results.jsonl`, `results.md` and plots.
//!
//! A cell is finished when its folder holds `result.json`; a rerun skips it (after checking it
//! was run with the same options). A cell that was interrupted continues from its
//! `checkpoint-last` (and a cell whose training had finished but whose test score was not yet
//! written is only scored). So an interrupted sweep is resumed by running the same command again.
//!
//! Several processes can share one sweep ([`Shard`]: `--shard I/N`, a Slurm job array, MPI
//! ranks), each training its own cells in the same folder; the summaries are written once every
//! cell has a result, by the shard that finishes last or by `sweep --report DIR` ([`Sweep::merge`]).

pub mod grid;
pub mod plots;
pub mod report;
pub mod shard;
pub mod spec;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::config::TrainConfig;
use crate::lock::ProcessLock;
use crate::template::Template;
use crate::train::checkpoint;
use crate::train::{self, output, Observer};
pub use grid::{Axis, Cell, Grid};
pub use report::CellResult;
pub use shard::Shard;

/// The file that marks a cell as finished and holds its result.
pub const RESULT_FILE: &str = "result.json";

/// The lock of a whole sweep's folder: held by an unsharded sweep while it runs, and by whoever
/// writes the summaries.
const SWEEP_LOCK: &str = "sweep.lock";

/// Receives a sweep's progress; the CLI draws it, tests ignore it.
pub trait SweepObserver {
    /// Cell `index` (0-based) of `total` starts; `how` says whether it starts, resumes, is only
    /// scored, or is skipped as finished.
    fn cell_start(&mut self, index: usize, total: usize, cell: &Cell, how: CellStart);
    /// Cell `index` finished with `result`.
    fn cell_done(&mut self, index: usize, total: usize, cell: &Cell, result: &CellResult);
    /// Cell `index` failed with `error`; the sweep goes on with the next cell.
    fn cell_failed(&mut self, index: usize, total: usize, cell: &Cell, error: &anyhow::Error) {
        let _ = (index, total, cell, error);
    }
    /// The observer of the cell's training run.
    fn run_observer(&mut self) -> &mut dyn Observer;
}

/// How a cell is taken up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellStart {
    /// Finished in an earlier run: its `result.json` is read.
    Finished,
    /// Interrupted after the checkpoint of this step: training continues from it.
    Resume(usize),
    /// Trained to the end earlier, but not yet scored on the test set.
    ScoreOnly,
    /// Not started yet.
    Fresh,
}

/// A sweep observer that ignores everything.
pub struct QuietSweep(pub train::Quiet);

impl SweepObserver for QuietSweep {
    fn cell_start(&mut self, _: usize, _: usize, _: &Cell, _: CellStart) {}
    fn cell_done(&mut self, _: usize, _: usize, _: &Cell, _: &CellResult) {}
    fn run_observer(&mut self) -> &mut dyn Observer {
        &mut self.0
    }
}

/// A sweep: the base options, the grid and the output folder.
pub struct Sweep {
    /// Options shared by every cell.
    pub base: TrainConfig,
    /// What varies.
    pub grid: Grid,
    /// The sweep's folder (one subfolder per cell, plus the summaries).
    pub output: PathBuf,
    /// The cells this process runs ([`Shard::WHOLE`] unless [`Sweep::with_shard`] says otherwise).
    pub shard: Shard,
}

/// What [`Sweep::merge`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// Every cell has a result: the summaries are written; the results in grid order.
    Written(Vec<CellResult>),
    /// These cells (folder names) have no result yet; nothing was written.
    Unfinished(Vec<String>),
}

impl Sweep {
    /// Checks the whole sweep before anything runs: the grid against the options, every cell's
    /// options (as `train` would check them), and that the cells have a set to be compared on.
    pub fn new(base: TrainConfig, grid: Grid, output: PathBuf) -> Result<Sweep> {
        if base.test.is_none() && base.dev.is_none() {
            bail!(
                "a sweep compares its cells on the test set (or, without one, the best dev \
                 accuracy): give option `test` or `dev` in the base configuration"
            );
        }
        let sweep = Sweep {
            base,
            grid,
            output,
            shard: Shard::WHOLE,
        };
        let varies_length = sweep.grid.axes.iter().any(|a| a.key == "num_virtual_tokens");
        for cell in sweep.cells() {
            let cfg = sweep.cell_config(&cell, false)?;
            cfg.validate()
                .with_context(|| format!("grid cell {}", cell.group_label()))?;
            let soft_in_template = Template::parse(&cfg.template)?.num_virtual_tokens();
            if varies_length && soft_in_template > 0 && !cfg.method.is_kv_prefix() {
                bail!(
                    "--grid num_virtual_tokens has no effect in cell {}: its template has its own \
                     [soft:{soft_in_template}] tokens (`num_virtual_tokens` only sets the length \
                     of a prompt prepended to a template without any); remove them from the template",
                    cell.group_label()
                );
            }
        }
        Ok(sweep)
    }

    /// The same sweep, running only `shard`'s cells.
    pub fn with_shard(self, shard: Shard) -> Sweep {
        Sweep { shard, ..self }
    }

    /// Every cell of the whole grid, in order (a shard runs those [`Shard::takes`] picks).
    pub fn cells(&self) -> Vec<Cell> {
        self.grid.cells(self.base.seed)
    }

    /// The options of `cell`, writing into its folder.
    fn cell_config(&self, cell: &Cell, resume: bool) -> Result<TrainConfig> {
        let mut cfg = self.grid.config_with(&self.base, &cell.settings, cell.seed)?;
        cfg.output = self.output.join(&cell.name);
        cfg.resume = resume;
        cfg.overwrite = false;
        Ok(cfg)
    }

    /// Runs every cell not yet finished, writing `results.jsonl` and `results.md` (and the
    /// plots) after each that has a result (a run where none has leaves them unchanged). A cell
    /// that fails is reported and the sweep goes on with the others; the sweep then ends with an
    /// error naming every failed cell (run it again to retry them).
    /// Returns every cell's result, in grid order. The observer is told each cell's place among
    /// this process's cells.
    ///
    /// A shard ([`Sweep::with_shard`]) runs only its cells and writes no summaries: call
    /// [`Sweep::merge`] after it. Its results are its own cells'.
    pub fn run(&self, obs: &mut dyn SweepObserver) -> Result<Vec<CellResult>> {
        std::fs::create_dir_all(&self.output).with_context(|| format!("cannot create {}", self.output.display()))?;
        // `sweep.lock`: two sweeps in one folder would train the same cells at once. Shards of
        // one sweep run side by side, each under its own lock (a cell's folder is also locked
        // by its training run).
        let _lock = if self.shard.is_part() {
            let name = format!("sweep-shard-{}-of-{}.lock", self.shard.index + 1, self.shard.count);
            let holder = format!("another process running shard {}", self.shard);
            ProcessLock::take(&self.output.join(name), &holder, &self.output)?
        } else {
            ProcessLock::take(&self.output.join(SWEEP_LOCK), "another sweep", &self.output)?
        };
        spec::write(self)?;
        // This process's cells; the observer counts among them.
        let cells: Vec<Cell> = (self.cells().into_iter().enumerate())
            .filter(|(i, _)| self.shard.takes(*i))
            .map(|(_, cell)| cell)
            .collect();
        let mut results = vec![];
        let mut failed: Vec<(String, String)> = vec![];
        for (i, cell) in cells.iter().enumerate() {
            match self.run_cell(i, cells.len(), cell, obs) {
                Ok(result) => {
                    obs.cell_done(i, cells.len(), cell, &result);
                    results.push(result);
                    if !self.shard.is_part() {
                        report::write_summaries(&self.output, &self.grid, &results, &failed)?;
                    }
                }
                Err(e) => {
                    obs.cell_failed(i, cells.len(), cell, &e);
                    failed.push((cell.name.clone(), format!("{e:#}")));
                }
            }
        }
        // The failures join the summaries, but a run in which no cell got a result (every
        // cell refused, e.g. a rerun with other base options) leaves the summaries of the
        // earlier runs as they were.
        if !results.is_empty() && !self.shard.is_part() {
            report::write_summaries(&self.output, &self.grid, &results, &failed)?;
        }
        if !failed.is_empty() {
            let list: Vec<String> = failed.iter().map(|(name, e)| format!("{name}: {e}")).collect();
            bail!(
                "{} of {} cells failed (the others are in {}; run the same command again to retry \
                 the failed ones):\n{}",
                failed.len(),
                cells.len(),
                self.output.join("results.md").display(),
                list.join("\n")
            );
        }
        Ok(results)
    }

    /// Writes the summaries over every cell of the grid once each has a result (whichever
    /// process trained it), under the sweep's lock (waiting a few seconds for another process
    /// merging at the same moment). A cell whose `result.json` was written with other options
    /// is refused by name.
    pub fn merge(&self) -> Result<Merge> {
        let _lock = take_patiently(&self.output.join(SWEEP_LOCK), &self.output)?;
        let (results, missing) = self.finished_cells()?;
        if !missing.is_empty() {
            return Ok(Merge::Unfinished(missing));
        }
        report::write_summaries(&self.output, &self.grid, &results, &[])?;
        Ok(Merge::Written(results))
    }

    /// `sweep --report`: writes the summaries over the cells that have a result, listing the
    /// others as without one; an error names those when there are any.
    pub fn report(&self) -> Result<Vec<CellResult>> {
        let _lock = take_patiently(&self.output.join(SWEEP_LOCK), &self.output)?;
        let (results, missing) = self.finished_cells()?;
        let unfinished: Vec<(String, String)> = missing
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    "no result yet (its shard has not finished it)".to_string(),
                )
            })
            .collect();
        if !results.is_empty() {
            report::write_summaries(&self.output, &self.grid, &results, &unfinished)?;
        }
        if !missing.is_empty() {
            bail!(
                "{} of {} cells have no result yet ({}): run or finish their shards, then                  `softprompt sweep --report {}` again",
                missing.len(),
                self.cells().len(),
                missing.join(", "),
                self.output.display()
            );
        }
        Ok(results)
    }

    /// The results of the cells that have one, in grid order, and the names of the others.
    fn finished_cells(&self) -> Result<(Vec<CellResult>, Vec<String>)> {
        let (mut results, mut missing) = (vec![], vec![]);
        for cell in self.cells() {
            let path = self.output.join(&cell.name).join(RESULT_FILE);
            if !path.exists() {
                missing.push(cell.name);
                continue;
            }
            let result = CellResult::read(&path)?;
            result.check_options(&self.cell_config(&cell, false)?, &path)?;
            results.push(result);
        }
        Ok((results, missing))
    }

    /// Takes one cell to its result: read, resumed, scored or trained.
    fn run_cell(&self, index: usize, total: usize, cell: &Cell, obs: &mut dyn SweepObserver) -> Result<CellResult> {
        let dir = self.output.join(&cell.name);
        let cfg = self.cell_config(cell, false)?;
        let result_path = dir.join(RESULT_FILE);
        if result_path.exists() {
            obs.cell_start(index, total, cell, CellStart::Finished);
            let result = CellResult::read(&result_path)?;
            result.check_options(&cfg, &result_path)?;
            return Ok(result);
        }
        let context = || format!("sweep cell {} ({})", cell.name, dir.display());
        let (how, cfg) = match output::checkpoint_step(&dir) {
            Some(step) if training_finished(&cfg, &dir, step).with_context(context)? => (CellStart::ScoreOnly, cfg),
            Some(step) => (CellStart::Resume(step), self.cell_config(cell, true)?),
            // A run killed before its first checkpoint leaves only its metrics: nothing worth
            // keeping, so the cell starts over in place.
            None => (
                CellStart::Fresh,
                TrainConfig {
                    overwrite: killed_before_checkpoint(&dir),
                    ..cfg
                },
            ),
        };
        obs.cell_start(index, total, cell, how);
        let result = match how {
            CellStart::ScoreOnly => score_finished(&cfg, &dir, obs.run_observer()).with_context(context)?,
            _ => CellResult::from_report(&cfg, &train::train(&cfg, obs.run_observer()).with_context(context)?)?,
        };
        let result = result.with_cell(cell);
        result.write(&result_path)?;
        Ok(result)
    }
}

/// Takes `path` (a sweep's lock), retrying for a few seconds while another process holds it
/// only to write the summaries.
fn take_patiently(path: &Path, folder: &Path) -> Result<ProcessLock> {
    let mut tries = 0;
    loop {
        match ProcessLock::take(path, "another sweep", folder) {
            Ok(lock) => return Ok(lock),
            Err(_) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `dir` holds what a run killed before its first checkpoint leaves: files, but no
/// checkpoint and no adapter.
fn killed_before_checkpoint(dir: &Path) -> bool {
    let has_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    has_files && !dir.join(crate::adapter::ADAPTER_WEIGHTS).exists()
}

/// Whether the run in `dir`, checkpointed at `step`, has nothing left to train: its last step
/// is done, or early stopping had ended it.
fn training_finished(cfg: &TrainConfig, dir: &Path, step: usize) -> Result<bool> {
    let rows = crate::data::read_jsonl(&cfg.train)?.len();
    if step >= train::total_steps(cfg, rows)? {
        return Ok(true);
    }
    let checkpoint = checkpoint::load_checkpoint(&dir.join(output::CHECKPOINT_DIR))?;
    Ok(cfg.patience.is_some_and(|p| checkpoint.progress.evals_since_best >= p))
}

/// The result of a run whose training finished but whose test score was never written: the
/// saved best adapter is scored on the test set.
fn score_finished(cfg: &TrainConfig, dir: &Path, obs: &mut dyn Observer) -> Result<CellResult> {
    let checkpoint = checkpoint::load_checkpoint(&dir.join(output::CHECKPOINT_DIR))?;
    let mut p = train::prepare(cfg, obs)?;
    p.out_dir = dir.to_path_buf();
    let test = train::evaluate_test(&p)?;
    let progress = checkpoint.progress;
    CellResult::new(cfg, test.map(|t| t.accuracy), progress.best, progress.step, None)
}

/// The options of a cell as they are compared between runs: everything but where and how the
/// run writes.
pub fn comparable_options(cfg: &TrainConfig) -> Result<Value> {
    let mut v = serde_json::to_value(cfg)?;
    if let Value::Object(m) = &mut v {
        for key in ["output", "resume", "overwrite"] {
            m.remove(key);
        }
    }
    Ok(v)
}
