//! The run folder: the files a training run writes ([`RUN_FILES`]), its one-writer lock, and
//! replacing it so that a crash at any instant loses nothing. The new run is written
//! into a staging folder `.NAME.softprompt-new-PID` beside the folder `NAME`; when it is complete
//! a marker listing its files is written into it (one atomic rename): from then on the
//! replacement is decided. The old run's files then move into `.NAME.softprompt-old-PID`, the
//! new ones into `NAME`, and both hidden folders are removed — every step a rename, and every
//! step safe to redo.
//!
//! A process killed anywhere in this leaves hidden folders that [`recover`] (run by the next
//! command that touches `NAME`, under its lock) completes or removes: staging with the marker is
//! moved in (the new run had finished), staging without it is removed (the old run was never
//! touched), and a lone old-run folder is removed (its replacement is in place). Afterwards
//! `NAME` holds either the whole old run or the whole new one.

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};

use super::run_files;
use crate::lock::ProcessLock;

/// The files and folders a run writes into its output folder.
pub const RUN_FILES: &[&str] = &[
    "adapter_config.json",
    "adapter_model.safetensors",
    run_files::TASK_FILE,
    run_files::PROMPT_FILE,
    "checkpoint-last",
    "metrics.jsonl",
    "training.png",
];

/// The file in a staging folder that says the new run is complete; it lists the run files the
/// new run holds, one per line.
const COMPLETE_MARKER: &str = ".softprompt-complete";

/// Environment variable of the crash tests: `N` makes the process kill itself (SIGKILL) after the
/// `N`-th step of a swap (step 0: the new run is complete, its marker not yet written; step 1:
/// the marker is written; then one step per rename and per folder removed).
pub const KILL_AT_STEP_VAR: &str = "SOFTPROMPT_TEST_KILL_AT_SWAP_STEP";

/// The hidden folder holding process `pid`'s new run for the folder named `name`.
pub fn staging_dir(parent: &Path, name: &str, pid: u32) -> PathBuf {
    parent.join(format!(".{name}.softprompt-new-{pid}"))
}

/// The hidden folder holding the old run while process `pid` replaces the folder `name`.
fn trash_dir(parent: &Path, name: &str, pid: u32) -> PathBuf {
    parent.join(format!(".{name}.softprompt-old-{pid}"))
}

/// Counts the steps of a swap for [`KILL_AT_STEP_VAR`].
struct Steps {
    at: usize,
    kill_at: Option<usize>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            at: 0,
            kill_at: std::env::var(KILL_AT_STEP_VAR).ok().and_then(|v| v.parse().ok()),
        }
    }

    /// One step of the swap is done.
    fn done(&mut self) {
        if self.kill_at == Some(self.at) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::process::abort();
        }
        self.at += 1;
    }
}

/// Moves `from` to `to`, naming both on failure.
fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

/// The run files present in `dir`.
pub fn run_files_in(dir: &Path) -> Vec<&'static str> {
    RUN_FILES.iter().copied().filter(|f| dir.join(f).exists()).collect()
}

/// Removes a file or a folder.
pub fn remove(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Replaces the run in `target` by the complete run in `staging` (see the [module
/// documentation](self)). Other files in `target` stay.
pub fn replace(target: &Path, staging: &Path) -> Result<()> {
    let manifest = run_files_in(staging);
    let text: String = manifest.iter().map(|f| format!("{f}\n")).collect();
    let mut steps = Steps::new();
    steps.done();
    crate::io::write_bytes(&staging.join(COMPLETE_MARKER), text.as_bytes())?;
    steps.done();
    let trash = trash_dir(parent_of(staging), &folder_name(target), std::process::id());
    roll_forward(target, staging, &trash, &manifest, &mut steps)
}

/// Finishes a decided replacement: old run files aside, new ones in, hidden folders removed.
/// Safe to run again after a crash at any point of an earlier run of it.
fn roll_forward(target: &Path, staging: &Path, trash: &Path, manifest: &[&str], steps: &mut Steps) -> Result<()> {
    std::fs::create_dir_all(trash).with_context(|| format!("cannot create {}", trash.display()))?;
    for f in RUN_FILES {
        let moved_in = manifest.contains(f) && !staging.join(f).exists();
        let here = target.join(f);
        if here.exists() && !moved_in {
            let aside = trash.join(f);
            if aside.exists() {
                remove(&aside).with_context(|| format!("cannot remove {}", aside.display()))?;
            }
            rename(&here, &aside)?;
            steps.done();
        }
    }
    for f in manifest {
        let new = staging.join(f);
        if new.exists() {
            rename(&new, &target.join(f))?;
            steps.done();
        }
    }
    std::fs::remove_dir_all(trash).with_context(|| format!("cannot remove {}", trash.display()))?;
    steps.done();
    std::fs::remove_dir_all(staging).with_context(|| format!("cannot remove {}", staging.display()))?;
    steps.done();
    Ok(())
}

/// The folder holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The last component of `path`, as the hidden folders' names use it.
pub fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into())
}

/// The hidden folders of interrupted replacements of `target`: `(pid, staging, trash)` with
/// whichever of the two exists.
fn leftovers(target: &Path) -> Vec<(u32, Option<PathBuf>, Option<PathBuf>)> {
    let parent = parent_of(target);
    let name = folder_name(target);
    let (new_prefix, old_prefix) = (format!(".{name}.softprompt-new-"), format!(".{name}.softprompt-old-"));
    let mut pids: Vec<u32> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n.strip_prefix(&new_prefix).or_else(|| n.strip_prefix(&old_prefix))?;
            pid.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| {
            let (s, t) = (staging_dir(parent, &name, pid), trash_dir(parent, &name, pid));
            (pid, s.is_dir().then_some(s), t.is_dir().then_some(t))
        })
        .collect()
}

/// Whether folders of an interrupted replacement of `target` lie beside it.
pub fn has_leftovers(target: &Path) -> bool {
    !leftovers(target).is_empty()
}

/// Completes or removes what interrupted replacements of `target` left (see the [module
/// documentation](self)); returns one sentence per thing done. The caller must hold the lock of
/// `target`: then no live process is using these folders.
pub fn recover(target: &Path) -> Result<Vec<String>> {
    let mut said = Vec::new();
    for (pid, staging, trash) in leftovers(target) {
        let trash = trash.unwrap_or_else(|| trash_dir(parent_of(target), &folder_name(target), pid));
        match staging {
            Some(staging) if staging.join(COMPLETE_MARKER).is_file() => {
                let text = std::fs::read_to_string(staging.join(COMPLETE_MARKER))
                    .with_context(|| format!("cannot read {}", staging.join(COMPLETE_MARKER).display()))?;
                let manifest: Vec<&str> = RUN_FILES
                    .iter()
                    .copied()
                    .filter(|f| text.lines().any(|l| l == *f))
                    .collect();
                std::fs::create_dir_all(target).with_context(|| format!("cannot create {}", target.display()))?;
                roll_forward(target, &staging, &trash, &manifest, &mut Steps::new()).map_err(|e| {
                    anyhow!(
                        "{e:#}; {} holds the finished run of process {pid}, which was stopped while it \
                         replaced {}: move its files into that folder by hand",
                        staging.display(),
                        target.display()
                    )
                })?;
                said.push(format!(
                    "process {pid} was stopped while it replaced the run in {} by its finished new \
                     run; the replacement is now complete",
                    target.display()
                ));
            }
            Some(staging) => {
                std::fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
                said.push(format!(
                    "removed {}, the unfinished run of process {pid}, which was stopped before it \
                     finished ({} was not changed by it)",
                    staging.display(),
                    target.display()
                ));
            }
            None => {}
        }
        if trash.exists() {
            std::fs::remove_dir_all(&trash).with_context(|| format!("cannot remove {}", trash.display()))?;
            said.push(format!(
                "removed {}, the run that process {pid} had replaced in {}",
                trash.display(),
                target.display()
            ));
        }
    }
    Ok(said)
}

/// Takes the lock of the run folder `target` (`.NAME.softprompt-lock` beside it: the folder
/// itself may be swapped), naming `holder` if another process has it. `predict` takes its
/// output file's lock the same way.
pub fn lock_run_folder(target: &Path, holder: &str) -> Result<ProcessLock> {
    let lock = parent_of(target).join(format!(".{}.softprompt-lock", folder_name(target)));
    ProcessLock::take(&lock, holder, target)
}

/// Completes or removes what replacements of the run folder `dir` that were interrupted (the
/// process killed) left beside it, saying so — when no other process is writing `dir`. Commands
/// that read a run folder call it first.
pub fn recover_run_folder(dir: &Path) -> Result<()> {
    if !has_leftovers(dir) {
        return Ok(());
    }
    // A live writer holds the lock: its folders are in use, and `dir` is whole but for the few
    // renames of its swap.
    let Ok(_lock) = lock_run_folder(dir, "a training run") else {
        return Ok(());
    };
    for note in recover(dir)? {
        eprintln!("note: {note}");
    }
    Ok(())
}
