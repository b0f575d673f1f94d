//! `--overwrite` survives `kill -9` at any instant: a child process replaces a finished run by a
//! new one and is killed (SIGKILL, by the swap's test hook) after each step of the swap in turn;
//! the next command that touches the folder completes or removes what the dead process left, and
//! the folder then holds exactly the old run (killed before the replacement was decided) or
//! exactly the new one, with the user's own files untouched and no hidden folder left.

mod common;
use softprompt::adapter::run_folder::{self, KILL_AT_STEP_VAR};
use softprompt::train::{OutputDir, TrainConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set in the child: the output folder it replaces.
const CHILD_VAR: &str = "SOFTPROMPT_CRASH_TEST_OUTPUT";

/// The old run: every run file but `softprompt.json`, plus a file of the user's.
fn old_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("checkpoint-last")).unwrap();
    std::fs::write(dir.join("checkpoint-last/state.json"), "old state").unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "training.png",
    ] {
        std::fs::write(dir.join(f), format!("old {f}")).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "the user's").unwrap();
}

/// The new run: no `training.png` (the old one must go), a `softprompt.json` (new).
fn new_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("checkpoint-last")).unwrap();
    std::fs::write(dir.join("checkpoint-last/state.json"), "new state").unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "softprompt.json",
    ] {
        std::fs::write(dir.join(f), format!("new {f}")).unwrap();
    }
}

/// Every file below `dir`, relative, with its text.
fn files(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read_to_string(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// The child's side: replace the run in `$CHILD_VAR` as `train --overwrite` does (claim the
/// folder, write the new run into the staging folder, commit). Does nothing in a normal test run.
#[test]
fn child_replaces_a_run() {
    let Some(out) = std::env::var_os(CHILD_VAR) else { return };
    let cfg = TrainConfig {
        output: PathBuf::from(out),
        overwrite: true,
        ..TrainConfig::default()
    };
    let dir = OutputDir::claim(&cfg).unwrap();
    new_run(dir.work());
    dir.commit().unwrap();
}

/// Runs the child with the kill hook at `step`; whether it was killed.
fn replace_killed_at(out: &Path, step: usize) -> bool {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_replaces_a_run", "--nocapture", "--test-threads", "1"])
        .env(CHILD_VAR, out)
        .env(KILL_AT_STEP_VAR, step.to_string())
        .status()
        .unwrap();
    !status.success()
}

#[test]
fn a_replacement_killed_at_any_step_leaves_the_old_run_or_the_new_one() {
    let tmp = common::scratch("crash");
    let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));
    old_run(&old_dir);
    new_run(&new_dir);
    let mut expected_new = files(&new_dir);
    expected_new.insert("notes.txt".into(), "the user's".into());
    let expected_old = files(&old_dir);

    let mut killed_steps = 0;
    for step in 0..64 {
        let case = tmp.path().join(format!("step{step}"));
        let out = case.join("out");
        old_run(&out);
        if !replace_killed_at(&out, step) {
            // Past the last step: the child finished the replacement itself.
            assert_eq!(files(&out), expected_new);
            break;
        }
        killed_steps += 1;
        // The next command that reads the folder (here: loading it as an adapter, which fails
        // only because these files are not a real adapter) recovers first.
        let _ = softprompt::adapter::load_peft(&out);
        let want = if step == 0 { &expected_old } else { &expected_new };
        assert_eq!(&files(&out), want, "killed after step {step}");
        // Nothing hidden is left but, at most, the dead process's lock file, which no one holds.
        let left: Vec<_> = std::fs::read_dir(&case)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".out.softprompt-lock")
            .collect();
        assert_eq!(left, ["out"], "killed after step {step}: hidden folders left");
        assert!(!run_folder::has_leftovers(&out));
        drop(run_folder::lock_run_folder(&out, "another run").expect("the lock is free"));
    }
    // Marker, 5 old files aside, 5 new ones in, two folders removed: every one was a kill point.
    assert!(killed_steps >= 13, "only {killed_steps} kill points");
}

/// A staging folder of a run killed while it trained (no marker) is removed by the next run
/// into the folder, which says so; the old run stays.
#[test]
fn the_next_run_removes_a_dead_runs_staging_folder_and_says_so() {
    let tmp = common::scratch("crash-litter");
    let out = tmp.path().join("out");
    old_run(&out);
    let staging = run_folder::staging_dir(tmp.path(), "out", 4_194_305);
    new_run(&staging);
    let said = run_folder::recover(&out).unwrap();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("unfinished run of process 4194305"), "{said:?}");
    assert!(!staging.exists());
    let mut expected = BTreeMap::new();
    let tmp2 = common::scratch("crash-litter-old");
    old_run(tmp2.path());
    expected.extend(files(tmp2.path()));
    assert_eq!(files(&out), expected);
}
