//! One training run writes an output folder at a time: a second run into a folder another run
//! holds is refused (naming the holder) before anything is written, the lock lives beside the
//! folder (an `--overwrite` swaps the folder itself) and is gone when the run ends.

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
    assert!(e.contains("already locked") && e.contains(".a.softprompt-lock"), "{e}");
    first.commit().unwrap();
    assert!(!lock.exists(), "the lock is removed when the run ends");

    // A lock left by a killed run (its process is gone) is taken over.
    std::fs::write(&lock, "4194305").unwrap();
    let again = OutputDir::claim(&cfg).unwrap();
    drop(again);
    assert!(!lock.exists());

    // A live holder (PID 1 runs on every Linux system) is named.
    std::fs::write(&lock, "1").unwrap();
    let e = format!("{:#}", OutputDir::claim(&cfg).unwrap_err());
    assert!(e.contains("another training run (process 1)"), "{e}");
    std::fs::remove_file(&lock).unwrap();
}
