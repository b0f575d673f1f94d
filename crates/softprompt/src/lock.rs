//! One writer per folder: an exclusive OS file lock (`flock`) on a lock file beside what it
//! guards, holding the writer's process id for messages. The kernel releases the lock when its
//! process ends in any way (`kill -9` included), so a lock left by a dead run is never stale: the
//! next writer simply takes it. A second writer while the first lives is refused, naming it.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::io::{Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A held lock; dropping it removes the lock file, then releases the lock.
#[derive(Debug)]
pub struct ProcessLock {
    path: PathBuf,
    /// The open lock file: the lock lives as long as this descriptor.
    _file: File,
}

/// Whether the open `file` is still the one named `path` (a holder that ends removes the file
/// before releasing it, so a lock taken on a file that was removed meanwhile guards nothing).
fn still_named(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl ProcessLock {
    /// Takes the lock file `path` for `guarded` (named in errors, with `holder`, e.g. "another
    /// training run"). The folder holding `path` must exist.
    pub fn take(path: &Path, holder: &str, guarded: &Path) -> Result<ProcessLock> {
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("cannot create the lock {}", path.display()))?;
            match file.try_lock() {
                Ok(()) if still_named(&file, path) => {
                    let me = std::process::id().to_string();
                    file.set_len(0)
                        .and_then(|()| file.rewind())
                        .and_then(|()| file.write_all(me.as_bytes()))
                        .with_context(|| format!("cannot write the lock {}", path.display()))?;
                    return Ok(ProcessLock {
                        path: path.to_path_buf(),
                        _file: file,
                    });
                }
                // Its last holder removed it after we opened it: open the new one.
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) => {
                    let pid = std::io::read_to_string(&mut file).unwrap_or_default();
                    let pid = pid.trim();
                    let who = if pid.is_empty() {
                        "starting".to_string()
                    } else if pid == std::process::id().to_string() {
                        format!("{pid}, this process")
                    } else {
                        pid.to_string()
                    };
                    bail!(
                        "{holder} (process {who}) is writing {}; wait for it to end, or stop it",
                        guarded.display()
                    );
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
        }
        bail!(
            "cannot take the lock {}: other processes keep taking and removing it",
            path.display()
        )
    }
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        // Removed while still held, so that no one takes a lock on a file about to vanish; the
        // descriptor closes (releasing the lock) right after.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_second_writer_is_refused_and_a_leftover_file_is_no_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("x.lock");
        {
            let _held = ProcessLock::take(&path, "another run", dir).unwrap();
            let e = format!("{:#}", ProcessLock::take(&path, "another run", dir).unwrap_err());
            assert!(
                e.contains(&format!("another run (process {}, this process)", std::process::id())),
                "{e}"
            );
        }
        assert!(!path.exists(), "dropping removes the file");
        // A lock file that no process holds (whatever id it names) is free.
        std::fs::write(&path, "1").unwrap();
        let held = ProcessLock::take(&path, "another run", dir).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), std::process::id().to_string());
        drop(held);
        assert!(!path.exists());
    }

    /// Another process holds the lock (util-linux's `flock`, the same `flock(2)` lock): refused;
    /// once it is killed with SIGKILL, the kernel has released it and the lock is taken.
    #[test]
    fn a_lock_held_by_a_killed_process_is_released_by_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("x.lock");
        let mut child = Command::new("flock")
            // -o: the lock is held by flock itself (not passed on to the command it runs).
            .arg("-o")
            .arg(&path)
            .args(["sh", "-c", "echo locked; exec sleep 20"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("util-linux's flock(1) runs");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        let e = format!("{:#}", ProcessLock::take(&path, "another run", dir).unwrap_err());
        assert!(e.contains("another run (process starting)"), "{e}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let held = ProcessLock::take(&path, "another run", dir).expect("the dead holder's lock is free");
        drop(held);
    }
}
