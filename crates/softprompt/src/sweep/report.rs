//! What a sweep writes: each cell's `result.json`, and over all cells `results.jsonl`,
//! `results.md` (mean ± standard deviation over seeds, the best group marked) and the plots.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

use super::grid::{show_value, Cell, Grid};
use super::{comparable_options, plots};
use crate::config::TrainConfig;
use crate::io::write_atomically;
use crate::train::TrainReport;

/// One cell's outcome, as written to its `result.json` and to `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellResult {
    /// The cell's folder name.
    pub cell: String,
    /// The grid's settings of this cell (without the seed).
    pub settings: Map<String, Value>,
    /// The run's seed.
    pub seed: u64,
    /// What the cells are compared on: `test_accuracy`, or `best_dev_accuracy` without a test set.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// Accuracy of the best checkpoint on the test set.
    pub test_accuracy: Option<f64>,
    /// Best dev accuracy.
    pub best_dev_accuracy: Option<f64>,
    /// The step of the best dev accuracy.
    pub best_step: Option<usize>,
    /// Optimiser steps done.
    pub steps: usize,
    /// Training time of the last session of the run (absent when the cell was only scored).
    pub train_seconds: Option<f64>,
    /// Every option of the run (but where it writes), to tell a rerun with other options.
    pub options: Value,
}

impl CellResult {
    /// A result from its parts; the metric is the test accuracy when the run has a test set,
    /// otherwise the best dev accuracy.
    pub fn new(
        cfg: &TrainConfig,
        test_accuracy: Option<f64>,
        best_dev: Option<(f64, usize)>,
        steps: usize,
        train_seconds: Option<f64>,
    ) -> Result<CellResult> {
        let (metric, value) = match (cfg.test.is_some(), test_accuracy, best_dev) {
            (true, Some(t), _) => ("test_accuracy", t),
            (false, _, Some((d, _))) => ("best_dev_accuracy", d),
            _ => bail!("the run produced no test or dev accuracy to compare"),
        };
        Ok(CellResult {
            cell: String::new(),
            settings: Map::new(),
            seed: cfg.seed,
            metric: metric.into(),
            value,
            test_accuracy,
            best_dev_accuracy: best_dev.map(|b| b.0),
            best_step: best_dev.map(|b| b.1),
            steps,
            train_seconds,
            options: comparable_options(cfg)?,
        })
    }

    /// The result of a finished training run.
    pub fn from_report(cfg: &TrainConfig, r: &TrainReport) -> Result<CellResult> {
        Self::new(
            cfg,
            r.test.as_ref().map(|t| t.accuracy),
            r.best_dev,
            r.steps,
            Some(r.train_seconds),
        )
    }

    /// The same result, named after `cell`.
    pub fn with_cell(mut self, cell: &Cell) -> CellResult {
        self.cell = cell.name.clone();
        self.settings = cell.settings.iter().cloned().collect();
        self
    }

    /// Writes `result.json` (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, |w| {
            serde_json::to_writer_pretty(&mut *w, self)?;
            Ok(writeln!(w)?)
        })
    }

    /// Reads a cell's `result.json`.
    pub fn read(path: &Path) -> Result<CellResult> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a sweep cell result", path.display()))
    }

    /// Refuses a finished cell that was run with other options than `cfg` (the base
    /// configuration changed between runs of the sweep), naming the first option that differs.
    /// An option the result does not record (added to softprompt after the cell ran) counts as
    /// its default.
    pub fn check_options(&self, cfg: &TrainConfig, path: &Path) -> Result<()> {
        let (Value::Object(then), Value::Object(now), Value::Object(defaults)) = (
            &self.options,
            &comparable_options(cfg)?,
            &comparable_options(&TrainConfig::default())?,
        ) else {
            bail!("{}: field `options` is not an object", path.display());
        };
        let recorded = |k: &str| then.get(k).or(defaults.get(k)).unwrap_or(&Value::Null);
        let Some((key, value)) = now.iter().find(|(k, v)| recorded(k) != *v) else {
            return Ok(());
        };
        bail!(
            "{} was run with option `{key}` = {}, but this sweep gives it {value}: use another \
             output folder for the new sweep, or remove that cell's folder to rerun it",
            path.display(),
            recorded(key),
        )
    }
}

/// A cell's grid settings in the grid's order, without the seed.
pub type Settings = Vec<(String, Value)>;

/// The cells that share settings (they differ only by seed), summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The shared settings, in the grid's order.
    pub settings: Settings,
    /// Mean of the metric over seeds.
    pub mean: f64,
    /// Sample standard deviation over seeds (0 for one seed).
    pub std: f64,
    /// Seeds run.
    pub n: usize,
}

/// Groups results by their settings (in order of first appearance) with mean and standard
/// deviation over seeds.
pub fn groups(grid: &Grid, results: &[CellResult]) -> Vec<Group> {
    let mut out: Vec<(Settings, Vec<f64>)> = vec![];
    for r in results {
        let settings: Settings = grid
            .axes
            .iter()
            .filter(|a| a.key != "seed")
            .map(|a| (a.key.clone(), r.settings.get(&a.key).cloned().unwrap_or(Value::Null)))
            .collect();
        match out.iter_mut().find(|(s, _)| *s == settings) {
            Some((_, values)) => values.push(r.value),
            None => out.push((settings, vec![r.value])),
        }
    }
    out.into_iter()
        .map(|(settings, values)| {
            let (mean, std) = mean_std(&values);
            Group {
                settings,
                mean,
                std,
                n: values.len(),
            }
        })
        .collect()
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Writes `results.jsonl`, `results.md` (with a list of the cells that failed, if any) and the
/// plots for the results so far.
pub fn write_summaries(dir: &Path, grid: &Grid, results: &[CellResult], failed: &[(String, String)]) -> Result<()> {
    write_atomically(&dir.join("results.jsonl"), |w| {
        for r in results {
            writeln!(w, "{}", serde_json::to_string(r)?)?;
        }
        Ok(())
    })?;
    let groups = groups(grid, results);
    let mut table = markdown_table(&groups, results.first().map_or("metric", |r| r.metric.as_str()));
    for axis in &grid.axes {
        let long: Vec<String> = axis
            .values
            .iter()
            .filter(|v| plots::short(axis, v) != show_value(v))
            .map(|v| format!("- {} = `{}`\n", plots::short(axis, v), show_value(v)))
            .collect();
        if !long.is_empty() {
            table += &format!("\nIn plot-{}.png:\n\n{}", axis.key, long.concat());
        }
    }
    if !failed.is_empty() {
        table += "\nFailed cells (run the sweep again to retry them):\n\n";
        for (name, e) in failed {
            table += &format!("- `{name}`: {}\n", e.replace('\n', " "));
        }
    }
    write_atomically(&dir.join("results.md"), |w| Ok(w.write_all(table.as_bytes())?))?;
    plots::write_plots(dir, grid, &groups)
}

/// The Markdown table of `groups`: one column per grid key, then the metric as mean ± standard
/// deviation in percent and the number of seeds; the best group in bold and marked ★.
pub fn markdown_table(groups: &[Group], metric: &str) -> String {
    let Some(first) = groups.first() else {
        return "No cell has finished yet.\n".into();
    };
    let best = groups
        .iter()
        .enumerate()
        .rev()
        .max_by(|a, b| a.1.mean.total_cmp(&b.1.mean))
        .map(|(i, _)| i);
    let keys: Vec<&str> = first.settings.iter().map(|(k, _)| k.as_str()).collect();
    let mut s = format!("| {} | {metric} (%) | seeds |\n", keys.join(" | "));
    s += &format!("|{}---:|---:|\n", "---|".repeat(keys.len()));
    for (i, g) in groups.iter().enumerate() {
        let cells: Vec<String> = g.settings.iter().map(|(_, v)| markdown_cell(v)).collect();
        let figure = if g.n > 1 {
            format!("{:.1} ± {:.1}", 100.0 * g.mean, 100.0 * g.std)
        } else {
            format!("{:.1}", 100.0 * g.mean)
        };
        let figure = if Some(i) == best {
            format!("**{figure}** ★")
        } else {
            figure
        };
        s += &format!("| {} | {figure} | {} |\n", cells.join(" | "), g.n);
    }
    s
}

/// A value as a Markdown table cell: text in backticks, `|` escaped.
fn markdown_cell(v: &Value) -> String {
    match v {
        Value::String(_) => format!("`{}`", show_value(v).replace('|', "\\|").replace('`', "'")),
        other => show_value(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::grid::Axis;

    fn result(settings: &[(&str, Value)], seed: u64, value: f64) -> CellResult {
        CellResult {
            cell: format!("c{seed}"),
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            seed,
            metric: "test_accuracy".into(),
            value,
            test_accuracy: Some(value),
            best_dev_accuracy: None,
            best_step: None,
            steps: 3,
            train_seconds: Some(1.0),
            options: Value::Null,
        }
    }

    #[test]
    fn groups_average_over_seeds_and_the_table_marks_the_best() {
        let base = TrainConfig::default();
        let grid = Grid::new(vec![Axis::parse("init=text,vocab").unwrap()], 2, &base).unwrap();
        let rs = vec![
            result(&[("init", "text".into())], 1, 0.6),
            result(&[("init", "text".into())], 2, 0.8),
            result(&[("init", "vocab".into())], 1, 0.5),
        ];
        let g = groups(&grid, &rs);
        assert_eq!(g.len(), 2);
        assert!((g[0].mean - 0.7).abs() < 1e-12 && (g[0].std - 0.02f64.sqrt()).abs() < 1e-12);
        assert_eq!((g[1].n, g[1].std), (1, 0.0));
        let md = markdown_table(&g, "test_accuracy");
        assert!(md.contains("| `text` | **70.0 ± 14.1** ★ | 2 |"), "{md}");
        assert!(md.contains("| `vocab` | 50.0 | 1 |"), "{md}");
    }

    #[test]
    fn a_result_run_with_other_options_is_refused_by_name() {
        let cfg = TrainConfig::default();
        let mut r = CellResult::new(&cfg, None, Some((0.5, 3)), 3, None).unwrap();
        assert_eq!(r.metric, "best_dev_accuracy");
        r.check_options(&cfg, Path::new("x/result.json")).unwrap();
        let other = TrainConfig { lr: 0.5, ..cfg.clone() };
        let e = format!("{:#}", r.check_options(&other, Path::new("x/result.json")).unwrap_err());
        assert!(e.contains("option `lr` = 0.03, but this sweep gives it 0.5"), "{e}");
        // An option added after the cell ran counts as its default.
        if let Value::Object(m) = &mut r.options {
            m.remove("weights");
        }
        r.check_options(&cfg, Path::new("x/result.json")).unwrap();
        let other = TrainConfig {
            weights: crate::backbone::WeightStorage::File,
            ..cfg.clone()
        };
        assert!(r.check_options(&other, Path::new("x/result.json")).is_err());
        r.options = Value::Null;
        assert!(r.check_options(&cfg, Path::new("x")).is_err());
    }
}
