//! [`Collective`] on MPI (rsmpi, the `mpi` crate; feature `mpi`): the world communicator of the
//! job `mpirun` or `srun` started. MPI's default error handler ends the job on any MPI error,
//! and `mpirun` ends every rank when one dies, so no operation here returns an error.

use anyhow::{bail, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};
use mpi::Count;
use softprompt::train::Collective;

/// The MPI world of this job, initialised once and finalised when dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI.
    pub fn init() -> Result<Self> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI was already initialised in this process");
        };
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }

    /// Ends every rank of the job with exit status `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// A byte count as MPI's element count, refusing more than it can say.
    fn count(n: usize) -> Result<Count> {
        Count::try_from(n).map_err(|_| anyhow::anyhow!("{n} bytes are too many for one MPI message"))
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    /// Gathers every rank's buffer on rank 0, adds them there in rank order and broadcasts the
    /// sum: every rank gets the same bits whatever MPI's reduction algorithms would do.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let n = values.len();
        if self.rank() == 0 {
            let mut all = vec![0f32; n * self.size()];
            root.gather_into_root(&values[..], &mut all[..]);
            for (i, v) in values.iter_mut().enumerate() {
                let mut sum = all[i];
                for rank in 1..self.size() {
                    sum += all[rank * n + i];
                }
                *v = sum;
            }
        } else {
            root.gather_into(&values[..]);
        }
        root.broadcast_into(values);
        Ok(())
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut counts: Vec<Count> = vec![0; self.size()];
        self.world.all_gather_into(&Self::count(bytes.len())?, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at: &mut Count, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        Self::count(total)?;
        let mut all = vec![0u8; total];
        {
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(bytes, &mut parts);
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for &c in &counts {
            out.push(all[at..at + c as usize].to_vec());
            at += c as usize;
        }
        Ok(out)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
