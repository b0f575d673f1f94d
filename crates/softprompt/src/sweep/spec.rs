//! `sweep.json`: what a sweep is (its base options, axes and seeds), written into its folder by
//! every run so that `softprompt sweep --report DIR` can merge the cells that several shards
//! trained without being given the grid again.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use super::grid::{Axis, Grid};
use super::Sweep;
use crate::config::TrainConfig;
use crate::io::write_atomically;

/// The file in a sweep's folder that describes the sweep.
pub const SPEC_FILE: &str = "sweep.json";

/// The version of [`SPEC_FILE`]'s layout this build writes and reads.
const FORMAT: u32 = 1;

/// [`SPEC_FILE`]'s contents.
#[derive(Serialize, Deserialize)]
struct SpecFile {
    /// Layout version.
    format: u32,
    /// Every base option, as `train` reads them.
    base: Value,
    /// The grid's axes, outermost first.
    axes: Vec<AxisRecord>,
    /// Seeds per combination.
    seeds: usize,
}

/// One axis as written.
#[derive(Serialize, Deserialize)]
struct AxisRecord {
    key: String,
    values: Vec<Value>,
}

/// Writes (or replaces) `sweep`'s description in its folder.
pub fn write(sweep: &Sweep) -> Result<()> {
    let spec = SpecFile {
        format: FORMAT,
        base: serde_json::to_value(&sweep.base)?,
        axes: sweep
            .grid
            .axes
            .iter()
            .map(|a| AxisRecord {
                key: a.key.clone(),
                values: a.values.clone(),
            })
            .collect(),
        seeds: sweep.grid.seeds,
    };
    let text = serde_json::to_string_pretty(&spec)?;
    write_atomically(&sweep.output.join(SPEC_FILE), |w| Ok(writeln!(w, "{text}")?))
}

/// The sweep described in folder `dir` (its output set to `dir`), checked as a new sweep is.
pub fn read(dir: &Path) -> Result<Sweep> {
    let path = dir.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: is {} a sweep's folder (written by `softprompt sweep` from this version on)?",
            path.display(),
            dir.display()
        )
    })?;
    let spec: SpecFile =
        serde_json::from_str(&text).with_context(|| format!("{} is not a sweep description", path.display()))?;
    if spec.format != FORMAT {
        bail!(
            "{}: format {} (this softprompt reads format {FORMAT}); rerun one shard with this \
             version to rewrite it",
            path.display(),
            spec.format
        );
    }
    let mut base: TrainConfig =
        serde_json::from_value(spec.base).with_context(|| format!("{}: field `base`", path.display()))?;
    base.output = dir.to_path_buf();
    let axes = spec
        .axes
        .into_iter()
        .map(|a| Axis {
            key: a.key,
            values: a.values,
        })
        .collect();
    let grid = Grid::new(axes, spec.seeds, &base).with_context(|| format!("{}", path.display()))?;
    Sweep::new(base, grid, dir.to_path_buf()).with_context(|| format!("{}", path.display()))
}
