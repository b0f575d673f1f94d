//! Data-parallel training over a [`Collective`]: what each rank computes and how the ranks'
//! parts are joined so that N processes take the steps one process would.
//!
//! - Each micro-batch is split across the ranks ([`super::collective::share`]); a rank's loss and
//!   gradients are weighted by its share of the micro-batch's loss normaliser ([`normaliser`]:
//!   target tokens for the LM loss, rows for a classification head), so that their sum is the
//!   mean over the whole micro-batch, as one process computes it.
//! - [`sum_gradients`] flattens every learned tensor's gradient (in [`super::Learner::params`]'s
//!   order) and the loss into one buffer and sums it over the ranks in rank order: every rank
//!   then clips and takes the same AdamW step on the same bits.
//! - Evaluation: each rank scores its share of the rows; [`gather_predictions`] joins them.
//! - Rank 0 reads and writes the run's folder; [`mirror`] hands the files the others need (a
//!   checkpoint to resume, the best adapter to test) to a private temporary folder
//!   ([`Scratch`]).
//! - [`inputs_digest`]: the options, model files and encoded data, compared at start.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::collective::{pack_files, unpack_files, Collective};
use super::Prepared;
use crate::infer::evaluate::Prediction;
use crate::model_source::{self, ModelLocation, Sha256};
use crate::task::Example;

/// What a micro-batch's mean loss divides by: its target tokens (LM loss), or its rows (a
/// classification head).
pub fn normaliser(rows: &[&Example], classifier: bool) -> usize {
    if classifier {
        rows.len()
    } else {
        rows.iter().map(|e| e.target.len()).sum()
    }
}

/// Sums `grads` (by parameter name) and `loss` over the ranks, in place. A parameter that no
/// rank has a gradient for stays without one.
pub fn sum_gradients(
    comm: &dyn Collective,
    params: &[(String, Var)],
    grads: &mut BTreeMap<String, Tensor>,
    loss: &mut f32,
) -> Result<()> {
    // Per parameter: a presence flag, then its values.
    let mut buf: Vec<f32> = Vec::with_capacity(params.iter().map(|(_, v)| v.elem_count() + 1).sum::<usize>() + 1);
    for (name, var) in params {
        match grads.get(name) {
            Some(g) => {
                buf.push(1.0);
                buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            None => {
                buf.push(0.0);
                buf.extend(std::iter::repeat_n(0f32, var.elem_count()));
            }
        }
    }
    buf.push(*loss);
    comm.sum_f32(&mut buf)?;
    let mut at = 0;
    for (name, var) in params {
        let present = buf[at] > 0.0;
        let n = var.elem_count();
        let values = &buf[at + 1..at + 1 + n];
        at += n + 1;
        if present {
            let t = Tensor::from_slice(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
            grads.insert(name.clone(), t);
        }
    }
    *loss = buf[at];
    Ok(())
}

/// Every rank's `predictions` (of its share of the rows), joined in rank order: the rows in
/// their order in the data.
pub fn gather_predictions(comm: &dyn Collective, predictions: &[Prediction]) -> Result<Vec<Prediction>> {
    if comm.size() == 1 {
        return Ok(predictions.to_vec());
    }
    let mut all = Vec::new();
    for (rank, bytes) in comm.all_gather(&serde_json::to_vec(predictions)?)?.iter().enumerate() {
        let part: Vec<Prediction> =
            serde_json::from_slice(bytes).with_context(|| format!("the predictions of rank {rank}"))?;
        all.extend(part);
    }
    Ok(all)
}

/// A folder of this process's own under the system's temporary folder, removed when dropped:
/// where a rank other than 0 keeps the files rank 0 hands it.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates the folder of rank `rank`.
    pub fn new(rank: usize) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("softprompt-rank{rank}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Hands the files `names` of rank 0's folder `dir` to every rank: rank 0 returns `dir`; the
/// others get copies in `scratch/sub` and return that folder. A file rank 0 does not have is
/// missing in the copies too, so every rank's reader fails alike.
pub fn mirror(
    comm: &dyn Collective,
    dir: &Path,
    names: &[&str],
    scratch: Option<&Scratch>,
    sub: &str,
) -> Result<PathBuf> {
    if comm.size() == 1 {
        return Ok(dir.to_path_buf());
    }
    let mut bytes = Vec::new();
    if comm.rank() == 0 {
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(name);
            if path.is_file() {
                let b = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                files.push((name.to_string(), b));
            }
        }
        bytes = pack_files(&files);
    }
    comm.broadcast(&mut bytes)?;
    let Some(scratch) = scratch.filter(|_| comm.rank() != 0) else {
        return Ok(dir.to_path_buf());
    };
    let copy = scratch.path().join(sub);
    if copy.exists() {
        std::fs::remove_dir_all(&copy).with_context(|| format!("cannot remove {}", copy.display()))?;
    }
    std::fs::create_dir_all(&copy).with_context(|| format!("cannot create {}", copy.display()))?;
    for (name, b) in unpack_files(&bytes)? {
        crate::io::write_bytes(&copy.join(&name), &b)?;
    }
    Ok(copy)
}

/// SHA-256 over what must be the same on every rank: the options, the model's files (a GGUF
/// file, or every file of an HF folder in name order) and the encoded rows of every set.
pub fn inputs_digest(p: &Prepared) -> Result<String> {
    let mut h = Sha256::default();
    h.update(serde_json::to_string(&p.cfg)?.as_bytes());
    let files = match model_source::resolve(&p.cfg.model)? {
        ModelLocation::Gguf(f) => vec![f],
        ModelLocation::HfDir(d) => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
                .with_context(|| format!("cannot list {}", d.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file())
                .collect();
            v.sort();
            v
        }
    };
    let mut chunk = vec![0u8; 1 << 20];
    for f in files {
        use std::io::Read;
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        let mut file = std::fs::File::open(&f).with_context(|| format!("cannot read {}", f.display()))?;
        loop {
            let n = file
                .read(&mut chunk)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&chunk[..n]);
        }
    }
    let sets = std::iter::once(&p.train).chain(p.tasks.iter().flat_map(|t| [&t.dev, &t.test]));
    for set in sets {
        h.update(&(set.len() as u64).to_le_bytes());
        for e in set {
            h.update(format!("{:?}|{:?}|{}|{}\n", e.prompt, e.target, e.gold, e.origin).as_bytes());
        }
    }
    Ok(h.hex())
}
