//! The command line refuses what cannot work with a message in the user's terms and exit
//! status 1 (never a panic's 101), where it can before any model is loaded.

use std::path::PathBuf;
use std::process::Command;

fn softprompt(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(args)
        .output()
        .expect("the softprompt binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh folder for one test, removed with what it holds when the guard is dropped.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("softprompt-cli-{name}-"))
        .tempdir()
        .expect("a temporary folder")
}

fn rows(dir: &std::path::Path) -> String {
    let f = dir.join("rows.jsonl");
    std::fs::write(
        &f,
        "{\"text\": \"fine\", \"label\": \"positive\"}\n{\"text\": \"bad\", \"label\": \"negative\"}\n",
    )
    .unwrap();
    f.to_string_lossy().into_owned()
}

#[test]
fn train_batch_zero_is_an_error_naming_the_flag() {
    let tmp = scratch("batch0");
    let dir = tmp.path();
    let data = rows(dir);
    let out = dir.join("out");
    let (code, err) = softprompt(&[
        "train",
        "--train",
        &data,
        "--batch",
        "0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("option `batch` (--batch) is 0; it must be at least 1"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", out.display());
}

#[test]
fn train_steps_zero_and_infinite_learning_rate_are_errors() {
    let tmp = scratch("steps0");
    let dir = tmp.path();
    let data = rows(dir);
    let (code, err) = softprompt(&["train", "--train", &data, "--steps", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("option `steps` (--steps) is 0"), "{err}");
    let (code, err) = softprompt(&["train", "--train", &data, "--lr", "inf"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("option `lr` (--lr) is inf"), "{err}");
    let (code, err) = softprompt(&["train", "--train", &data, "--lr", "-0.1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("option `lr` (--lr) is -0.1; it must be a finite number > 0"),
        "{err}"
    );
}

#[test]
fn eval_rows_zero_is_an_error() {
    let tmp = scratch("rows0");
    let dir = tmp.path();
    let data = rows(dir);
    let (code, err) = softprompt(&[
        "eval",
        "smollm2-135m",
        "--data",
        &data,
        "--template",
        "Review: {text}\\nSentiment: {label}",
        "--rows",
        "0",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--rows 0 leaves no rows to score"), "{err}");
}

#[test]
fn complete_of_an_empty_text_is_an_error() {
    let (code, err) = softprompt(&["complete", "smollm2-135m", ""]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing to complete: TEXT is empty"), "{err}");
}

#[test]
fn sweep_refuses_resume_flags_missing_output_and_unknown_keys() {
    let tmp = scratch("sweep");
    let dir = tmp.path();
    let data = rows(dir);
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let base = ["sweep", "--train", &data, "--test", &data, "--steps", "1"];
    let run = |extra: &[&str]| softprompt(&[&base[..], extra].concat());
    let (code, err) = run(&["--grid", "init=text,vocab", "--resume", "--output", out]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--resume does not apply to a sweep"), "{err}");
    let (code, err) = run(&["--grid", "init=text,vocab"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sweep needs --output DIR"), "{err}");
    let (code, err) = run(&["--grid", "lenght=1,2", "--output", out]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`lenght` is not a training option"), "{err}");
    let (code, err) = run(&["--grid", "num_virtual_tokens=0,5", "--output", out]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("num_virtual_tokens"), "{err}");
    assert!(
        !std::path::Path::new(out).exists(),
        "nothing written for a refused sweep"
    );
}

/// A multitask adapter needs a task id in range; other adapters refuse one.
#[test]
fn complete_with_a_multitask_adapter_needs_a_task_id_in_range() {
    let fixture = |name: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/peft")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    let mpt = fixture("smollm2_multitask_prompt_tuning");
    let complete = |extra: &[&str]| {
        let mut args = vec![
            "complete",
            "smollm2-135m",
            "The capital of Peru is",
            "--max-tokens",
            "1",
        ];
        args.extend_from_slice(extra);
        softprompt(&args)
    };
    let (code, err) = complete(&["--adapter", &mpt]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("one prompt per task") && err.contains("--task-id"),
        "{err}"
    );
    let (code, err) = complete(&["--adapter", &mpt, "--task-id", "3"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("task id 3 is out of range") && err.contains("0..3"),
        "{err}"
    );
    let (code, err) = complete(&["--adapter", &fixture("smollm2_prompt_tuning_random"), "--task-id", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("task id 0 was given") && err.contains("PROMPT_TUNING"),
        "{err}"
    );
    let (code, err) = complete(&["--adapter", &mpt, "--task-id", "1"]);
    assert_eq!(code, 0, "{err}");
}

/// `softprompt info MODEL FLAGS...`: exit status and stdout followed by stderr.
fn info(flags: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(["info", "smollm2-135m"])
        .args(flags)
        .output()
        .expect("the softprompt binary runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_kernels_are_chosen_by_flag_and_refused_where_they_cannot_run() {
    let (code, out) = info(&["--kernels", "composed"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("composed candle ops"), "{out}");
    let (code, out) = info(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fused f32 CPU kernels"), "{out}");
    let (code, out) = info(&["--kernels", "composed", "--weights", "file"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fused"), "{out}");
}

#[test]
fn predict_refuses_to_write_over_its_data_and_leaves_it_whole() {
    let tmp = scratch("predict-same");
    let data = rows(tmp.path());
    let before = std::fs::read(&data).unwrap();
    let (code, err) = softprompt(&[
        "predict",
        "smollm2-135m",
        "--data",
        &data,
        "--template",
        "Review: {text}\nSentiment: {label}",
        "--output",
        &data,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is the --data file"), "{err}");
    assert_eq!(std::fs::read(&data).unwrap(), before);
}

#[test]
fn tokenize_into_a_closed_pipe_ends_without_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(["tokenize", "smollm2-135m", &"a long text to tokenize ".repeat(2_000)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the softprompt binary runs");
    drop(child.stdout.take()); // the reader goes away before anything is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}
