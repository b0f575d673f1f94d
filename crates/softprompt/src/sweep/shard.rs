//! A sweep's share of the cells when several processes run it: `--shard I/N`, a Slurm job
//! array's task, or an MPI rank. Cell `i` of the grid belongs to shard `i mod N`, so the seeds of
//! one setting and the expensive settings spread over the shards.

use anyhow::{bail, Context, Result};
use std::fmt;

/// One shard of `count`: the cells whose index modulo `count` is `index` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: usize,
    /// How many shards there are, at least 1.
    pub count: usize,
}

impl Shard {
    /// The whole sweep in one process.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether the sweep is split over several processes.
    pub fn is_part(&self) -> bool {
        self.count > 1
    }

    /// Whether cell `cell_index` (its place in the grid's order) is this shard's.
    pub fn takes(&self, cell_index: usize) -> bool {
        cell_index % self.count == self.index
    }

    /// Reads `--shard I/N`: shard `I` (counted from 1) of `N`.
    pub fn parse(text: &str) -> Result<Shard> {
        let usage = || format!("--shard `{text}`: expected I/N, shard I of N counted from 1 (e.g. --shard 1/4 … 4/4)");
        let (i, n) = text.split_once('/').with_context(usage)?;
        let (i, n): (usize, usize) = match (i.trim().parse(), n.trim().parse()) {
            (Ok(i), Ok(n)) => (i, n),
            _ => bail!("{}", usage()),
        };
        if n == 0 || i == 0 || i > n {
            bail!("{}: I must be between 1 and N, and N at least 1", usage());
        }
        Ok(Shard { index: i - 1, count: n })
    }

    /// The shard the environment gives this process: a Slurm job array's task
    /// (`SLURM_ARRAY_TASK_ID` among `SLURM_ARRAY_TASK_COUNT`, from `SLURM_ARRAY_TASK_MIN` in steps
    /// of `SLURM_ARRAY_TASK_STEP`), an MPI rank (`OMPI_COMM_WORLD_RANK`/`_SIZE` from OpenMPI's
    /// `mpirun`, `PMI_RANK`/`PMI_SIZE` from MPICH's or Slurm's `srun`), or both (each array task's
    /// cells spread again over its ranks). `None` when neither applies. `var` reads a variable
    /// (`std::env::var(..).ok()` outside tests).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let array = slurm_array(&var)?;
        let ranks = mpi_ranks(&var)?;
        Ok(match (array, ranks) {
            (None, None) => None,
            (Some(s), None) | (None, Some(s)) => Some(s),
            (Some(a), Some(r)) => Some(Shard {
                index: a.index * r.count + r.index,
                count: a.count * r.count,
            }),
        })
    }
}

impl fmt::Display for Shard {
    /// `I/N`, counted from 1 as `--shard` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// A whole number from variable `name`, naming it when it is not one.
fn number(var: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match var(name) {
        None => Ok(None),
        Some(v) => match v.trim().parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => bail!("environment variable {name}={v} is not a whole number"),
        },
    }
}

/// The shard of a Slurm job array's task, when the process is one with more than one task.
fn slurm_array(var: &impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
    let (Some(id), Some(count)) = (
        number(var, "SLURM_ARRAY_TASK_ID")?,
        number(var, "SLURM_ARRAY_TASK_COUNT")?,
    ) else {
        return Ok(None);
    };
    if count <= 1 {
        return Ok(None);
    }
    let min = number(var, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let step = number(var, "SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
    let offset = id.checked_sub(min).filter(|o| o % step == 0 && o / step < count);
    let Some(offset) = offset else {
        bail!(
            "this Slurm array task (SLURM_ARRAY_TASK_ID={id}, MIN={min}, STEP={step}, COUNT={count}) is \
             not one of a range --array=A-B[:S]; give each task its share with --shard I/N instead"
        );
    };
    Ok(Some(Shard {
        index: offset / step,
        count,
    }))
}

/// The shard of an MPI rank, when the process is one of several ranks.
fn mpi_ranks(var: &impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
    for (rank, size) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ] {
        if let (Some(r), Some(n)) = (number(var, rank)?, number(var, size)?) {
            if r >= n {
                bail!("environment variables {rank}={r} and {size}={n}: the rank is not below the size");
            }
            return Ok((n > 1).then_some(Shard { index: r, count: n }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn shards_parse_from_one_and_split_cells_round_robin() {
        let s = Shard::parse("2/3").unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.to_string(), "2/3");
        let mine: Vec<usize> = (0..8).filter(|&i| s.takes(i)).collect();
        assert_eq!(mine, vec![1, 4, 7]);
        for bad in ["0/3", "4/3", "1/0", "a/b", "3", ""] {
            let e = format!("{:#}", Shard::parse(bad).unwrap_err());
            assert!(e.contains("--shard"), "{bad}: {e}");
        }
    }

    #[test]
    fn slurm_arrays_and_mpi_ranks_give_the_shard() {
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let array = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        // --array=1-7:2 → tasks 1, 3, 5, 7; task 5 is the third.
        assert_eq!(
            Shard::from_env(env(&array)).unwrap(),
            Some(Shard { index: 2, count: 4 })
        );
        let one_task = [("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "1")];
        assert_eq!(Shard::from_env(env(&one_task)).unwrap(), None);
        let listed = [
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ];
        let e = format!("{:#}", Shard::from_env(env(&listed)).unwrap_err());
        assert!(e.contains("--shard I/N"), "{e}");
        let ranks = [("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")];
        assert_eq!(
            Shard::from_env(env(&ranks)).unwrap(),
            Some(Shard { index: 1, count: 2 })
        );
        let both = [array.as_slice(), &[("PMI_RANK", "1"), ("PMI_SIZE", "3")]].concat();
        assert_eq!(
            Shard::from_env(env(&both)).unwrap(),
            Some(Shard { index: 7, count: 12 })
        );
        let e = format!(
            "{:#}",
            Shard::from_env(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).unwrap_err()
        );
        assert!(e.contains("PMI_RANK=x"), "{e}");
    }
}
