//! Helpers shared by the integration tests: fixture paths, real-model paths, comparisons.
#![allow(dead_code)]

pub mod tiny;

use candle_core::{Device, Tensor};
use softprompt::backbone::{self, LoadedModel};
use softprompt::model_source;
use std::collections::HashMap;
use std::path::PathBuf;

/// A fresh, empty folder for one test (`softprompt-<label>-XXXXXX` in the system's temporary
/// folder: tests run in parallel, and several runs of the suite may too), removed with all it
/// holds when the returned guard is dropped. Paths that must not exist yet (a run's output) are
/// `dir.path().join(name)`.
pub fn scratch(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("softprompt-{label}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot make a temporary folder: {e}"))
}

/// Another process holding the OS lock (`flock`) on `path`: util-linux's `flock -o` (the lock
/// held by flock itself, not passed on to the command it runs), returned once it holds it. Kill
/// it (SIGKILL) to see the kernel release the lock.
pub fn flock_holder(path: &std::path::Path) -> std::process::Child {
    let mut holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(path)
        .args(["sh", "-c", "echo locked; exec sleep 20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux's flock(1) runs");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    holder
}

/// `fixtures/peft/<name>` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// `data/<name>` at the repository root.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data").join(name)
}

/// Loads a default model by short name; fails with instructions when it is not fetched.
pub fn load_model(name: &str) -> LoadedModel {
    let location = model_source::resolve(name)
        .unwrap_or_else(|e| panic!("{e:#}\n(run `cargo run -p softprompt-cli -- fetch` before the tests)"));
    backbone::load(&location, &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Tensors of a fixture's `expected.safetensors`.
pub fn expected(folder: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(folder).join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// An i64 fixture tensor as u32.
pub fn as_u32(t: &Tensor) -> Tensor {
    t.to_dtype(candle_core::DType::U32).unwrap()
}

/// A file of the fetched default models (`$SOFTPROMPT_HOME/models/<rel>`); fails with
/// instructions when it is missing.
pub fn model_file(rel: &str) -> PathBuf {
    let path = model_source::cache_dir().join("models").join(rel);
    assert!(
        path.is_file(),
        "model file {} is missing: run `cargo run -p softprompt-cli -- fetch` first (or set SOFTPROMPT_HOME)",
        path.display()
    );
    path
}

/// SmolLM2's tokenizer, built from its GGUF metadata.
pub fn smollm2_tokenizer() -> softprompt::tokenizer::TextTokenizer {
    let gguf = softprompt::gguf::GgufFile::open(&model_file("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    softprompt::tokenizer::TextTokenizer::from_gguf(&gguf).unwrap()
}

/// MiniLM's tokenizer (tokenizer.json).
pub fn minilm_tokenizer() -> softprompt::tokenizer::TextTokenizer {
    softprompt::tokenizer::TextTokenizer::from_json_file(&model_file("minilm-l6/tokenizer.json")).unwrap()
}

/// The first `n` rows of data file `rel` (under `data/`), written into `dir` (made if missing)
/// as `rel` with its slashes turned into dashes (`facts-countries-capital-train.jsonl`).
pub fn first_rows(rel: &str, n: usize, dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let rows: Vec<String> = std::fs::read_to_string(data(rel))
        .unwrap()
        .lines()
        .take(n)
        .map(String::from)
        .collect();
    let f = dir.join(rel.replace('/', "-"));
    std::fs::write(&f, rows.join("\n")).unwrap();
    f
}

/// The training loss of every step of the run in `out` (`metrics.jsonl`).
pub fn losses(out: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

/// Largest absolute difference between two lists of score rows.
pub fn max_diff_rows(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "different numbers of rows");
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Trains `full` (4 steps), then the same run stopped after 2 steps into `part_output` and
/// resumed to 4: the two runs' `checkpoint-last` states (parameters and AdamW moments) are equal
/// bit for bit.
pub fn resume_equals_uninterrupted(full: &softprompt::train::TrainConfig, part_output: PathBuf) {
    use softprompt::train::{self, Quiet, TrainConfig};
    train::train(full, &mut Quiet).unwrap();
    let part = TrainConfig {
        steps: Some(2),
        output: part_output,
        ..full.clone()
    };
    train::train(&part, &mut Quiet).unwrap();
    let resumed = TrainConfig {
        resume: true,
        output: part.output.clone(),
        ..full.clone()
    };
    let report = train::train(&resumed, &mut Quiet).unwrap();
    assert_eq!((report.steps, report.steps_run), (4, 2));
    let state = |out: &std::path::Path| {
        softprompt::io::read_safetensors(&out.join("checkpoint-last/state.safetensors")).unwrap()
    };
    let (a, b) = (state(&full.output), state(&part.output));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|k| k.starts_with("adamw.m.")));
    for (k, t) in &a {
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{k} differs after resuming");
    }
}

/// What the run `cfg` learned (`Learned::forward`: a prompt or a flat prefix), rebuilt from its
/// own raw parameters (`softprompt_prompt.safetensors`) through a fresh learner prepared with
/// `scratch` as output folder.
pub fn raw_learned(cfg: &softprompt::train::TrainConfig, scratch: PathBuf) -> Tensor {
    use softprompt::train::{self, Quiet, TrainConfig};
    let raw = softprompt::io::read_safetensors(&cfg.output.join("softprompt_prompt.safetensors")).unwrap();
    let prepare = TrainConfig {
        output: scratch,
        ..cfg.clone()
    };
    let p = train::prepare(&prepare, &mut Quiet).unwrap();
    let mut learner = train::new_learner(&p).unwrap();
    learner.prompt.set_from(&raw.into_iter().collect()).unwrap();
    learner.prompt.forward().unwrap()
}

/// The label scores of the run's own test evaluation (`evaluate_test`: the best adapter read
/// back from its folder) on the first `rows` rows of its dev set.
pub fn test_scores_on_dev(cfg: &softprompt::train::TrainConfig, rows: usize) -> Vec<Vec<f32>> {
    use softprompt::train::{self, Quiet, TrainConfig};
    let on_dev = TrainConfig {
        test: cfg.dev.clone(),
        test_rows: Some(rows),
        ..cfg.clone()
    };
    let p = train::prepare(&on_dev, &mut Quiet).unwrap();
    let test = train::evaluate_test(&p).unwrap().unwrap();
    test.predictions.into_iter().map(|p| p.scores).collect()
}
