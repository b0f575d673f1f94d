//! The processes of a training job: one, or the ranks of an MPI job started by `mpirun` or
//! `srun` (feature `mpi`, [`crate::mpi_collective`]). A build without the feature refuses to
//! run as several ranks, saying how to build one with it.

use anyhow::Result;
use softprompt::train::{Collective, Single};
use std::rc::Rc;

/// The environment variables MPI launchers set to the number of ranks (Open MPI's `mpirun`,
/// MPICH's Hydra and Slurm's PMI, PMIx).
const SIZE_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// The number of ranks a launcher started, and the variable that says so (None outside a
/// launcher).
pub fn launched_size() -> Option<(usize, &'static str)> {
    SIZE_VARIABLES
        .iter()
        .find_map(|&var| Some((std::env::var(var).ok()?.trim().parse().ok()?, var)))
}

/// The processes this one trains with.
pub struct Ranks {
    comm: Rc<dyn Collective>,
    #[cfg(feature = "mpi")]
    mpi: Option<Rc<crate::mpi_collective::Mpi>>,
}

impl Ranks {
    /// One process, or (feature `mpi`) the ranks of the MPI job this process was started in.
    pub fn start() -> Result<Self> {
        #[cfg(feature = "mpi")]
        if launched_size().is_some() {
            let mpi = Rc::new(crate::mpi_collective::Mpi::init()?);
            return Ok(Self {
                comm: mpi.clone(),
                mpi: Some(mpi),
            });
        }
        #[cfg(not(feature = "mpi"))]
        if let Some((n, var)) = launched_size().filter(|(n, _)| *n > 1) {
            anyhow::bail!(
                "this process is one of {n} started by an MPI launcher ({var}={n}), but this \
                 softprompt was built without MPI, so each would train alone; build it with \
                 `cargo build --release -p softprompt-cli --features mpi` (needs an MPI library, \
                 e.g. Debian's libopenmpi-dev, and libclang-dev) or start one process"
            );
        }
        Ok(Self {
            comm: Rc::new(Single),
            #[cfg(feature = "mpi")]
            mpi: None,
        })
    }

    /// The collective operations of these processes.
    pub fn comm(&self) -> Rc<dyn Collective> {
        self.comm.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ends a job of several ranks that failed on this one: prints the error with the rank and
    /// aborts every rank (a rank that merely returned would leave the others waiting in a
    /// collective). One process returns the error.
    pub fn fail(&self, err: anyhow::Error) -> anyhow::Error {
        if self.comm.size() > 1 {
            eprintln!("error (rank {} of {}): {err:#}", self.rank(), self.comm.size());
            #[cfg(feature = "mpi")]
            if let Some(mpi) = &self.mpi {
                mpi.abort(1);
            }
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_launcher_means_one_process() {
        if launched_size().is_none() {
            let ranks = Ranks::start().unwrap();
            assert_eq!((ranks.rank(), ranks.comm().size()), (0, 1));
        }
    }
}
