//! The collective operations data-parallel training needs, behind one small trait: the rank and
//! number of processes, a sum of an f32 buffer over the ranks in a fixed order, byte gathers and
//! broadcasts, a barrier. [`Single`] is one process (every operation is the identity); the CLI
//! implements [`Collective`] on MPI behind its feature `mpi`, so this library links no MPI.
//!
//! What the training loop does with them is in [`super::parallel`].

use anyhow::{bail, Result};
use std::ops::Range;

/// The processes of one training job and the operations they take part in together. Every
/// rank calls every operation in the same order (a collective); an implementation may block
/// until all have.
pub trait Collective {
    /// This process's number, `0..size()`. Rank 0 writes the run's files.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their element-wise sum over the ranks, added in rank
    /// order (rank 0's, then rank 1's, ...), so that every rank gets the same bits and a run
    /// with the same ranks gets the same sum. Every rank passes a buffer of the same length.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Replaces `bytes` on every rank by rank 0's.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// One process: rank 0 of 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The positions of `n` items that rank `rank` of `size` takes: contiguous, in rank order, the
/// sizes differing by at most one (`n = 8`, 3 ranks: 0..2, 2..5, 5..8). A rank may get none.
pub fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    n * rank / size..n * (rank + 1) / size
}

/// Refuses to go on unless every rank holds the same `digest` of `what` (for instance the model
/// file and the data), naming the first rank that differs from rank 0. Every rank returns the
/// same answer, so all stop together.
pub fn check_same(comm: &dyn Collective, what: &str, digest: &str) -> Result<()> {
    let all = comm.all_gather(digest.as_bytes())?;
    let first = &all[0];
    if let Some((rank, other)) = all.iter().enumerate().find(|(_, d)| *d != first) {
        bail!(
            "rank {rank} of {} read different {what} than rank 0 (digest {} against rank 0's {}): \
             every rank must be started with the same options, model file and data",
            comm.size(),
            String::from_utf8_lossy(other),
            String::from_utf8_lossy(first)
        );
    }
    Ok(())
}

/// Files as one byte string: for each, its name's length (u32, little-endian), the name, its
/// length (u64) and its bytes.
pub fn pack_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in files {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((bytes.len() as u64).to_le_bytes());
        out.extend(bytes);
    }
    out
}

/// The files of [`pack_files`] again.
pub fn unpack_files(mut bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if bytes.len() < n {
            bail!("a packed file list ends early ({} bytes left, {n} needed)", bytes.len());
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    let mut files = Vec::new();
    while !bytes.is_empty() {
        let name_len = u32::from_le_bytes(take(&mut bytes, 4)?.try_into()?) as usize;
        let name = String::from_utf8(take(&mut bytes, name_len)?.to_vec())?;
        let len = u64::from_le_bytes(take(&mut bytes, 8)?.try_into()?) as usize;
        files.push((name, take(&mut bytes, len)?.to_vec()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_once_in_order() {
        for n in 0..20 {
            for size in 1..6 {
                let parts: Vec<Range<usize>> = (0..size).map(|r| share(n, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(
                    lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1,
                    "{n} {size} {lens:?}"
                );
            }
        }
        assert_eq!(share(8, 1, 3), 2..5);
    }

    #[test]
    fn packed_files_come_back_unchanged() {
        let files = vec![
            ("a.json".to_string(), b"{}".to_vec()),
            ("empty".to_string(), Vec::new()),
            ("w.safetensors".to_string(), (0..=255u8).collect()),
        ];
        assert_eq!(unpack_files(&pack_files(&files)).unwrap(), files);
        let packed = pack_files(&files);
        let err = unpack_files(&packed[..packed.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("ends early"), "{err}");
    }

    #[test]
    fn one_process_agrees_with_itself() {
        check_same(&Single, "data", "abc").unwrap();
        let mut v = vec![1.0, 2.0];
        Single.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
    }
}
