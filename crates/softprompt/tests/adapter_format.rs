//! `softprompt.json` across versions: adapter folders written by earlier releases (kept under
//! `fixtures/adapters/`, each beside the predictions that release made with it) are read by this
//! one and score the same; a field from a newer version is read past with a warning, unless the
//! file lists it as critical, which is refused by name.
//!
//! Fixtures:
//! - `sentiment-format0`: written by the release before `softprompt.json` had a version (commit
//!   eb46ffa): `softprompt train --config examples/sentiment.toml --steps 4 --eval-every 4
//!   --dev-rows 8 --test-rows 8 --batch 4 --num-virtual-tokens 8 --template
//!   '[soft:8]Review: {text}\nSentiment: {label}' --verbalizer negative=bad --verbalizer
//!   positive=good`, then `softprompt predict smollm2-135m --data FIRST_16_TEST_ROWS --adapter
//!   ...` into `sentiment-format0.predictions.jsonl`.
//! - `sentiment-format1`: the same command with the first release of format 1.

mod common;

use serde_json::Value;
use softprompt::adapter::run_files::{AdapterTask, TASK_FILE, TASK_FORMAT_VERSION};
use softprompt::data::Row;
use softprompt::infer::classify::Classifier;
use softprompt::prompt::Method;
use softprompt::task::TaskKind;
use std::path::{Path, PathBuf};

/// `fixtures/adapters/<name>` at the repository root.
fn adapter_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/adapters")
        .join(name)
}

/// The rows and the label scores an earlier release predicted for them.
fn recorded_predictions(name: &str) -> Vec<(Row, String, Vec<f32>)> {
    let path = adapter_fixture(&format!("{name}.predictions.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let mut row = Row::new();
            row.insert("text".into(), v["text"].clone());
            let scores = v["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_f64().unwrap() as f32)
                .collect();
            (row, v["prediction"].as_str().unwrap().to_string(), scores)
        })
        .collect()
}

/// Scores the recorded rows with the adapter in `dir` and compares each row's prediction and
/// label probabilities (the softmax of the recorded scores) with what was recorded.
fn scores_as_recorded(dir: &Path, recorded: &str) {
    let model = common::load_model("smollm2-135m");
    let classifier = Classifier::from_adapter(&model, dir)
        .unwrap()
        .expect("a classification adapter");
    assert_eq!(classifier.labels(), ["negative", "positive"]);
    let rows = recorded_predictions(recorded);
    let inputs: Vec<Row> = rows.iter().map(|(r, _, _)| r.clone()).collect();
    let examples = classifier.encode(&model.tokenizer, &inputs).unwrap();
    let got = classifier.classify(&model, &examples).unwrap();
    assert_eq!(got.len(), rows.len());
    for (i, ((_, prediction, scores), c)) in rows.iter().zip(&got).enumerate() {
        assert_eq!(&c.label, prediction, "row {i}");
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = scores.iter().map(|s| (s - max).exp()).sum();
        for (s, p) in scores.iter().zip(&c.probabilities) {
            let want = (s - max).exp() / z;
            assert!((want - p).abs() < 1e-4, "row {i}: probability {p}, recorded {want}");
        }
    }
}

/// A copy of the fixture `name` in a scratch folder, its `softprompt.json` edited by `edit`.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let scratch = common::scratch("adapter-format");
    for entry in std::fs::read_dir(adapter_fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), scratch.path().join(entry.file_name())).unwrap();
    }
    let path = scratch.path().join(TASK_FILE);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    scratch
}

#[test]
fn an_adapter_from_before_format_versions_is_read_with_its_method_and_shape() {
    let task = AdapterTask::read(&adapter_fixture("sentiment-format0")).unwrap();
    assert_eq!(task.format_version, 0);
    assert_eq!(task.method, Method::PromptTuning);
    assert_eq!(task.num_virtual_tokens, 8);
    assert_eq!(task.task, TaskKind::Classify);
    assert_eq!(task.verbalizer["positive"], "good");
    assert_eq!(
        task.training["steps"], 4,
        "the old options are kept as the training record"
    );
    assert!(task.warnings.is_empty(), "{:?}", task.warnings);
}

#[test]
fn an_adapter_from_before_format_versions_scores_as_when_it_was_written() {
    scores_as_recorded(&adapter_fixture("sentiment-format0"), "sentiment-format0");
}

#[test]
fn an_adapter_of_format_1_scores_as_when_it_was_written() {
    let dir = adapter_fixture("sentiment-format1");
    let task = AdapterTask::read(&dir).unwrap();
    assert_eq!(task.format_version, 1);
    assert!(task.warnings.is_empty(), "{:?}", task.warnings);
    scores_as_recorded(&dir, "sentiment-format1");
}

#[test]
fn a_field_from_a_newer_version_is_read_with_a_warning_and_scores_the_same() {
    let copy = edited_copy("sentiment-format1", |f| {
        f.insert("format_version".into(), Value::from(TASK_FORMAT_VERSION + 1));
        f.insert("trained_rows".into(), Value::from(16));
    });
    let task = AdapterTask::read(copy.path()).unwrap();
    assert_eq!(task.warnings.len(), 1, "{:?}", task.warnings);
    assert!(task.warnings[0].contains("`trained_rows`"), "{}", task.warnings[0]);
    scores_as_recorded(copy.path(), "sentiment-format1");
}

#[test]
fn a_critical_field_from_a_newer_version_is_refused_by_name() {
    let copy = edited_copy("sentiment-format1", |f| {
        f.insert("format_version".into(), Value::from(TASK_FORMAT_VERSION + 1));
        f.insert("label_prior".into(), serde_json::json!({"positive": 0.7}));
        f.insert("critical".into(), serde_json::json!(["label_prior"]));
    });
    let e = format!("{:#}", AdapterTask::read(copy.path()).unwrap_err());
    assert!(e.contains("`label_prior`") && e.contains(TASK_FILE), "{e}");
    let model = common::load_model("smollm2-135m");
    assert!(Classifier::from_adapter(&model, copy.path()).is_err());
}

#[test]
fn what_this_release_writes_reads_back_unchanged() {
    let task = AdapterTask::read(&adapter_fixture("sentiment-format1")).unwrap();
    let back = AdapterTask::from_json(&task.to_json().unwrap(), Path::new(TASK_FILE)).unwrap();
    assert_eq!(back, task);
    let written: Value = serde_json::from_str(&task.to_json().unwrap()).unwrap();
    assert!(written.get("warnings").is_none());
}
