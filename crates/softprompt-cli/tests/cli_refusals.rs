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
fn eval_rows_zero_or_negative_is_an_error_naming_the_flag() {
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
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--rows is 0; it must be at least 1 (rows to score; leave it out to score every row)"),
        "{err}"
    );
    let (code, err) = softprompt(&["eval", "smollm2-135m", "--data", &data, "--rows", "-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rows is -1; it must be at least 1"), "{err}");
}

/// A negative number is the value of the option it follows (not an unknown argument), and is
/// refused naming the option and its range, before any model is loaded (issue 21).
#[test]
fn negative_numbers_are_refused_naming_the_option_and_its_range() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--steps", "-1"],
            "option `steps` (--steps) is -1; it must be at least 1 (optimiser steps)",
        ),
        (
            &["train", "--warmup", "-2"],
            "option `warmup` (--warmup) is -2; it must be at least 0",
        ),
        (
            &["train", "--batch", "2.5"],
            "option `batch` (--batch) is `2.5`; it must be a whole number, at least 1",
        ),
        (
            &["complete", "smollm2-135m", "Hi", "--max-tokens", "-5"],
            "--max-tokens is -5; it must be at least 1 (the most tokens to generate)",
        ),
        (
            &["complete", "smollm2-135m", "Hi", "--temperature", "-1"],
            "--temperature is -1; it must be a finite number ≥ 0",
        ),
        (
            &["complete", "smollm2-135m", "Hi", "--top-k", "-1"],
            "--top-k is -1; it must be at least 0",
        ),
        (
            &["complete", "smollm2-135m", "Hi", "--top-p", "-0.5"],
            "--top-p is -0.5; it must be in (0, 1]",
        ),
        (
            &["inspect", "adapter", "--top", "-1"],
            "--top is -1; it must be at least 1",
        ),
        (
            &["sweep", "--grid", "lr=0.1", "--seeds", "-1"],
            "--seeds is -1; it must be at least 1",
        ),
        (&["bench", "--reps", "-3"], "--reps is -3; it must be at least 1"),
        (
            &["predict", "smollm2-135m", "--data", "d.jsonl", "--batch", "-8"],
            "--batch is -8; it must be at least 1",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = softprompt(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
}

/// `complete --max-tokens` beyond what the context leaves is refused before anything is
/// generated, naming the limit, as the server refuses such a `max_tokens` (issue 21).
#[test]
fn complete_max_tokens_beyond_the_context_is_refused_naming_the_limit() {
    let (code, err) = softprompt(&["complete", "smollm2-135m", "Hello", "--max-tokens", "1000000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--max-tokens is 1000000000, more than the model's context leaves")
            && err.contains("tokens can be generated; give --max-tokens"),
        "{err}"
    );
}

/// A key/value prefix without `--init` starts from random-normal, as `--help` says; an input
/// prompt's init (vocab) given for a prefix is refused naming what applies (issue 21).
#[test]
fn a_prefix_without_init_trains_from_random_normal_as_the_help_says() {
    let (code, help) = {
        let out = Command::new(env!("CARGO_BIN_EXE_softprompt"))
            .args(["train", "--help"])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(code, Some(0));
    assert!(
        help.contains("`random-normal` for a key/value prefix (prefix-tuning, cartridge)"),
        "{help}"
    );
    let tmp = scratch("prefix-init");
    let data = rows(tmp.path());
    let out = tmp.path().join("out");
    let (code, err) = softprompt(&[
        "train",
        "--train",
        &data,
        "--method",
        "prefix-tuning",
        "--num-virtual-tokens",
        "2",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("softprompt.json")).unwrap()).unwrap();
    assert_eq!(task["training"]["init"], "random-normal", "{task}");
    let (code, err) = softprompt(&["train", "--train", &data, "--method", "cartridge", "--init", "vocab"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("option `init` is \"vocab\", which does not apply to a key/value prefix"),
        "{err}"
    );
}

/// `--init from` with an adapter that does not fit the run names option `init_from` and the
/// folder (another prompt length, another kind of prompt: before the model loads); an adapter
/// of another model's width names `init_from` (issue 21).
#[test]
fn init_from_an_adapter_that_does_not_fit_names_the_option_and_the_folder() {
    let tmp = scratch("init-from");
    let data = rows(tmp.path());
    let out = tmp.path().join("out");
    let fixture = |name: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/peft")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    let train = |from: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--train",
            &data,
            "--init",
            "from",
            "--init-from",
            from,
            "--steps",
            "1",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        softprompt(&args)
    };
    // 5 virtual tokens in the adapter, 7 in the run.
    let smollm = fixture("smollm2_prompt_tuning_random");
    let (code, err) = train(&smollm, &["--num-virtual-tokens", "7"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("option `init_from` (--init-from) is {smollm}"))
            && err.contains("5 virtual tokens")
            && err.contains("this run's has 7"),
        "{err}"
    );
    // An input prompt for a key/value prefix.
    let (code, err) = train(&smollm, &["--method", "prefix-tuning", "--num-virtual-tokens", "5"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("option `init_from` (--init-from) is {smollm}")) && err.contains("PROMPT_TUNING"),
        "{err}"
    );
    // Not an adapter folder.
    let (code, err) = train(tmp.path().to_str().unwrap(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("option `init_from` (--init-from) is") && err.contains("adapter_config.json"),
        "{err}"
    );
    // A MiniLM adapter (hidden size 384) for SmolLM2 (576).
    let minilm = fixture("minilm_seqcls_prompt_tuning");
    let (code, err) = train(&minilm, &["--num-virtual-tokens", "6"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("option `init_from` (--init-from) is {minilm}"))
            && err.contains("its width 384 is another model's"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", out.display());
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
    let (code, err) = run(&["--grid", "init=text,vocab", "--output", out, "--shard", "3/2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("I must be between 1 and N"), "{err}");
    let (code, err) = softprompt(&["sweep", "--report", out, "--steps", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--report DIR takes no other option (--steps)"), "{err}");
    let (code, err) = softprompt(&["sweep", "--report", out]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sweep.json") && err.contains("a sweep's folder"), "{err}");
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
