//! One writer per folder: a lock file holding the writer's process id, created atomically
//! (`create_new`), removed when the writer is done. A lock whose process is gone (a run killed
//! with `kill -9`) is taken over; one whose process still runs is refused, naming it.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A held lock; dropping it removes the lock file.
#[derive(Debug)]
pub struct ProcessLock(PathBuf);

impl ProcessLock {
    /// Takes the lock file `path` for `guarded` (named in errors, with `holder`, e.g. "another
    /// training run"). The folder holding `path` must exist.
    pub fn take(path: &Path, holder: &str, guarded: &Path) -> Result<ProcessLock> {
        let me = std::process::id().to_string();
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    file.write_all(me.as_bytes())
                        .with_context(|| format!("cannot write the lock {}", path.display()))?;
                    return Ok(ProcessLock(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
                    if pid == me {
                        bail!(
                            "{} is already locked by this process ({})",
                            guarded.display(),
                            path.display()
                        );
                    }
                    // An empty lock is one being written right now: held.
                    let alive = pid.is_empty() || Path::new("/proc").join(&pid).exists();
                    if alive {
                        bail!(
                            "{holder} (process {}) is writing {}; wait for it to end, or stop it \
                             (if it is gone, remove {})",
                            if pid.is_empty() { "starting" } else { &pid },
                            guarded.display(),
                            path.display()
                        );
                    }
                    // Its process is gone: take it over.
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => return Err(e).with_context(|| format!("cannot create the lock {}", path.display())),
            }
        }
        bail!(
            "cannot take the lock {}: another process keeps taking it",
            path.display()
        )
    }
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_is_refused_a_dead_one_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("x.lock");
        {
            let _held = ProcessLock::take(&path, "another run", dir).unwrap();
            assert!(ProcessLock::take(&path, "another run", dir).is_err(), "held by us");
        }
        assert!(!path.exists(), "dropping removes the file");
        // PID 1 runs on every Linux system: a live holder.
        std::fs::write(&path, "1").unwrap();
        let e = format!("{:#}", ProcessLock::take(&path, "another run", dir).unwrap_err());
        assert!(e.contains("another run (process 1)"), "{e}");
        // A process id that does not exist: taken over.
        std::fs::write(&path, "4194305").unwrap();
        let held = ProcessLock::take(&path, "another run", dir).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), std::process::id().to_string());
        drop(held);
        assert!(!path.exists());
    }
}
