//! One training run writes an output folder at a time: a second run into a folder another run
//! holds is refused (naming the holder) before anything is written, the lock lives beside the
//! folder (an `--overwrite` swaps the folder itself), is an OS lock (a lock file no process holds
//! is free, whatever it says) and is gone when the run ends.

mod common;
use softprompt::train::{OutputDir, TrainConfig};

#[test]
fn a_second_run_into_a_held_folder_is_refused_and_the_lock_goes_with_the_run() {
    let tmp = common::scratch("one-writer");
    let cfg = TrainConfig {
        output: tmp.path().join("runs").join("a"),
        ..TrainConfig::default()
    };
    let lock = tmp.path().join("runs").join(".a.softprompt-lock");
    let first = OutputDir::claim(&cfg).unwrap();
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), std::process::id().to_string());
    let e = format!("{:#}", OutputDir::claim(&cfg).unwrap_err());
    assert!(
        e.contains(&format!(
            "another training run (process {}, this process)",
            std::process::id()
        )),
        "{e}"
    );
    first.commit().unwrap();
    assert!(!lock.exists(), "the lock is removed when the run ends");

    // A lock file left by a killed run names a process, but no process holds it: it is free.
    std::fs::write(&lock, "1").unwrap();
    let again = OutputDir::claim(&cfg).unwrap();
    drop(again);
    assert!(!lock.exists());

    // Another process holding it (util-linux's flock(1), the same lock) is refused.
    let mut holder = common::flock_holder(&lock);
    let e = format!("{:#}", OutputDir::claim(&cfg).unwrap_err());
    assert!(
        e.contains("another training run (process") && e.contains("runs/a"),
        "{e}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    drop(OutputDir::claim(&cfg).expect("a killed holder's lock is released by the kernel"));
}
