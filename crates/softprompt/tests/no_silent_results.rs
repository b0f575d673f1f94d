//! Results that used to come out silently wrong are refused or said: an adapter holding NaN,
//! early stopping without a dev set, a classifier trained on one label, and a batch larger than
//! the training data.

mod common;
use candle_core::{Device, Tensor};
use softprompt::adapter::{load_peft, ADAPTER_WEIGHTS};
use softprompt::task::TaskKind;
use softprompt::train::{self, Observer, TrainConfig};
use std::path::{Path, PathBuf};

/// A classification run of `rows` (JSONL text) in `dir`.
fn classify_config(dir: &Path, rows: &str) -> TrainConfig {
    let train = dir.join("train.jsonl");
    std::fs::write(&train, rows).unwrap();
    TrainConfig {
        model: "smollm2-135m".into(),
        train,
        template: "[soft:2]Review: {text}\nSentiment: {label}".into(),
        task: TaskKind::Classify,
        steps: Some(1),
        output: dir.join("out"),
        ..TrainConfig::default()
    }
}

/// Collects the observer's messages.
#[derive(Default)]
struct Messages(Vec<String>);

impl Observer for Messages {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

#[test]
fn an_adapter_holding_nan_is_refused_naming_the_tensor() {
    let tmp = common::scratch("nan-adapter");
    let dir: PathBuf = tmp.path().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = common::fixture("smollm2_prompt_tuning_text");
    for f in ["adapter_config.json", ADAPTER_WEIGHTS] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let good = load_peft(&dir).unwrap();
    let mut values: Vec<f32> = good.prompt_embeddings.flatten_all().unwrap().to_vec1().unwrap();
    values[5] = f32::NAN;
    let bad = Tensor::from_vec(values, good.prompt_embeddings.dims(), &Device::Cpu).unwrap();
    softprompt::io::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &[("prompt_embeddings".into(), bad)], None).unwrap();
    let e = format!("{:#}", load_peft(&dir).unwrap_err());
    assert!(
        e.contains("`prompt_embeddings`") && e.contains("NaN") && e.contains(ADAPTER_WEIGHTS),
        "{e}"
    );
}

#[test]
fn patience_without_a_dev_set_is_refused() {
    let cfg = TrainConfig {
        patience: Some(2),
        ..TrainConfig::default()
    };
    assert!(cfg.dev.is_none());
    let e = format!("{:#}", cfg.validate().unwrap_err());
    assert!(
        e.contains("option `patience` (--patience)") && e.contains("no dev set"),
        "{e}"
    );
}

#[test]
fn a_classifier_trained_on_one_label_is_refused() {
    let tmp = common::scratch("one-label");
    let rows = "{\"text\": \"fine\", \"label\": \"positive\"}\n{\"text\": \"good\", \"label\": \"positive\"}\n";
    let cfg = classify_config(tmp.path(), rows);
    let e = format!("{:#}", train::prepare(&cfg, &mut Messages::default()).err().unwrap());
    assert!(
        e.contains("`positive`") && e.contains("two labels") && e.contains("train.jsonl"),
        "{e}"
    );
}

#[test]
fn a_batch_larger_than_the_data_takes_all_rows_and_says_so() {
    let tmp = common::scratch("big-batch");
    let rows = "{\"text\": \"fine\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": \"negative\"}\n\
                {\"text\": \"good\", \"label\": \"positive\"}\n";
    let cfg = TrainConfig {
        batch: 1_000_000,
        ..classify_config(tmp.path(), rows)
    };
    let mut said = Messages::default();
    let p = train::prepare(&cfg, &mut said).unwrap();
    assert_eq!(p.cfg.batch, 3);
    assert!(
        said.0
            .iter()
            .any(|m| m.contains("option `batch` (--batch) is 1000000") && m.contains("3 rows")),
        "{:?}",
        said.0
    );
}

/// `--lr 1e30` used to blow the prompt up to 1e30 and then train on with a zero gradient, exit 0:
/// now the run stops at the first runaway update, and the checkpoint of the step before stays.
#[test]
fn a_learning_rate_that_overflows_the_prompt_stops_training_keeping_the_last_checkpoint() {
    let tmp = common::scratch("runaway");
    let rows = "{\"text\": \"great\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": \"negative\"}\n";
    let mut cfg = classify_config(tmp.path(), rows);
    cfg.steps = Some(3);
    cfg.batch = 2;
    cfg.lr = 1e30;
    cfg.warmup = 0;
    let e = format!(
        "{:#}",
        train::train(&cfg, &mut Messages::default()).map(|_| ()).unwrap_err()
    );
    assert!(
        e.contains("ran away at step 1") && e.contains("lower the learning rate"),
        "{e}"
    );
    assert!(e.contains("before its first checkpoint"), "{e}");
    assert!(!cfg.output.exists(), "nothing half-trained is left");
}
