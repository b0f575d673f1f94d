//! The trainer end to end on the real SmolLM2 with tiny budgets: bit-identical runs for one
//! seed, resuming equals an uninterrupted run (prompt tuning and p-tuning), the loss goes down,
//! and bad input gives clear errors.

mod common;
use softprompt::io::read_safetensors;
use softprompt::task::TaskKind;
use softprompt::train::optim::Schedule;
use softprompt::train::{self, EncoderKind, InitKind, Method, Quiet, TrainConfig};
use std::path::PathBuf;

/// A tiny real run (4 steps of 2 rows, checkpointed every 2) into `output`.
fn tiny(output: PathBuf) -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: common::data("facts-countries/capital/train.jsonl"),
        dev: Some(common::data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(4),
        template: "[soft:4]{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        init: InitKind::Random,
        lr: 0.01,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(4),
        batch: 2,
        eval_every: 2,
        output,
        ..TrainConfig::default()
    }
}

fn adapter_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn same_seed_gives_bit_identical_runs() {
    let tmp = common::scratch("train");
    let a = tiny(tmp.path().join("same-a"));
    let b = TrainConfig {
        output: tmp.path().join("same-b"),
        ..a.clone()
    };
    train::train(&a, &mut Quiet).unwrap();
    train::train(&b, &mut Quiet).unwrap();
    assert_eq!(adapter_bytes(&a.output), adapter_bytes(&b.output));
    let c = TrainConfig {
        output: tmp.path().join("same-c"),
        seed: 7,
        ..a.clone()
    };
    train::train(&c, &mut Quiet).unwrap();
    assert_ne!(
        adapter_bytes(&a.output),
        adapter_bytes(&c.output),
        "another seed should differ"
    );
}

fn resume_equals_uninterrupted(method: Method) {
    let tmp = common::scratch("train");
    let full = TrainConfig {
        method,
        encoder: EncoderKind::Mlp,
        encoder_hidden: 16,
        ..tiny(tmp.path().join(format!("full-{method:?}")))
    };
    train::train(&full, &mut Quiet).unwrap();
    // Interrupted after 2 steps (the checkpoint is written at each evaluation), then resumed.
    let part = TrainConfig {
        steps: Some(2),
        output: tmp.path().join(format!("part-{method:?}")),
        ..full.clone()
    };
    train::train(&part, &mut Quiet).unwrap();
    let resumed = TrainConfig {
        resume: true,
        ..TrainConfig {
            output: part.output.clone(),
            ..full.clone()
        }
    };
    let report = train::train(&resumed, &mut Quiet).unwrap();
    assert_eq!(report.steps, 4);
    let a = read_safetensors(&full.output.join("checkpoint-last/state.safetensors")).unwrap();
    let b = read_safetensors(&part.output.join("checkpoint-last/state.safetensors")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{k} differs after resuming");
    }
}

#[test]
fn resumed_prompt_tuning_equals_uninterrupted() {
    resume_equals_uninterrupted(Method::PromptTuning);
}

#[test]
fn resumed_p_tuning_equals_uninterrupted() {
    resume_equals_uninterrupted(Method::PTuning);
}

#[test]
fn training_lowers_the_loss_and_writes_every_file() {
    // Four rows in one batch: every step sees the same rows, so the loss must fall.
    let tmp = common::scratch("train");
    let f = common::first_rows("facts-countries/capital/train.jsonl", 4, &tmp.path().join("lower-data"));
    let cfg = TrainConfig {
        train: f,
        batch: 4,
        steps: Some(20),
        lr: 0.1,
        eval_every: 10,
        ..tiny(tmp.path().join("lower"))
    };
    let report = train::train(&cfg, &mut Quiet).unwrap();
    let losses = common::losses(&cfg.output);
    assert_eq!(losses.len(), 20);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&losses[17..]) < 0.75 * mean(&losses[..3]),
        "loss did not fall: {losses:?}"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "softprompt.json",
        "softprompt_prompt.safetensors",
        "training.png",
        "checkpoint-last/state.json",
    ] {
        assert!(cfg.output.join(f).is_file(), "{f} missing");
    }
    assert!(report.best_dev.is_some());
    let png = std::fs::read(cfg.output.join("training.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

fn train_err(cfg: &TrainConfig) -> String {
    format!(
        "{:#}",
        train::train(cfg, &mut Quiet)
            .map(|_| ())
            .expect_err("training should fail")
    )
}

#[test]
fn row_missing_a_template_field_names_file_and_line() {
    let tmp = common::scratch("train");
    let f = tmp.path().join("rows.jsonl");
    std::fs::write(
        &f,
        "{\"text\": \"a\", \"target\": \"b\"}\n{\"txt\": \"c\", \"target\": \"d\"}\n",
    )
    .unwrap();
    let e = train_err(&TrainConfig {
        train: f,
        dev: None,
        ..tiny(tmp.path().join("out"))
    });
    assert!(e.contains("rows.jsonl:2") && e.contains("`text`"), "{e}");
}

#[test]
fn empty_and_malformed_data_sets_are_refused() {
    let tmp = common::scratch("train");
    let f = tmp.path().join("empty.jsonl");
    std::fs::write(&f, "\n\n").unwrap();
    let e = train_err(&TrainConfig {
        train: f.clone(),
        ..tiny(tmp.path().join("empty-out"))
    });
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
    std::fs::write(&f, "{\"text\": \"a\", \"target\": \"b\"}\n{oops\n").unwrap();
    let e = train_err(&TrainConfig {
        train: f,
        ..tiny(tmp.path().join("malformed-out"))
    });
    assert!(e.contains("empty.jsonl:2") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn label_without_verbaliser_word_is_refused() {
    let tmp = common::scratch("train");
    let mut cfg = TrainConfig {
        train: common::data("sentiment-movies/dev.jsonl"),
        dev: None,
        template: "[soft:2]Review: {text}\nSentiment: {label}".into(),
        target_field: "label".into(),
        task: TaskKind::Classify,
        ..tiny(tmp.path().join("out"))
    };
    cfg.verbalizer.insert("positive".into(), " good".into());
    let e = train_err(&cfg);
    assert!(e.contains("label `negative` has no verbaliser word"), "{e}");
}

#[test]
fn unwritable_output_dir_is_refused_before_training() {
    let tmp = common::scratch("train");
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    // A path below a regular file can never be created, even by root.
    let e = train_err(&TrainConfig {
        output: blocker.join("out"),
        ..tiny(tmp.path().join("unused"))
    });
    assert!(e.contains("cannot be created"), "{e}");
}

#[test]
fn long_inputs_are_truncated_and_counted() {
    let tmp = common::scratch("train");
    let cfg = TrainConfig {
        train: common::data("sentiment-movies/dev.jsonl"),
        dev: None,
        template: "[soft:2]Review: {text}\nSentiment: {label}".into(),
        target_field: "label".into(),
        task: TaskKind::Classify,
        max_len: 24,
        steps: Some(1),
        ..tiny(tmp.path().join("out"))
    };
    let report = train::train(&cfg, &mut Quiet).unwrap();
    assert!(report.truncated_train_rows > 100, "{}", report.truncated_train_rows);
}

#[test]
fn diverging_training_stops_and_keeps_the_last_good_checkpoint() {
    // Step 1 has learning rate 0 (warm-up) and is checkpointed; the huge rate with weight decay
    // then overflows the parameters to inf/NaN within two steps.
    let tmp = common::scratch("train");
    let cfg = TrainConfig {
        lr: 1e38,
        weight_decay: 1.0,
        warmup: 1,
        clip: 0.0,
        steps: Some(6),
        eval_every: 1,
        dev_rows: Some(1),
        ..tiny(tmp.path().join("out"))
    };
    let e = train_err(&cfg);
    assert!(e.contains("last good checkpoint") && e.contains("non-finite"), "{e}");
    let state = read_safetensors(&cfg.output.join("checkpoint-last/state.safetensors")).unwrap();
    for (k, t) in state {
        let s = t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite(), "checkpoint tensor {k} is not finite");
    }
}

#[test]
fn seq_cls_on_minilm_trains_a_peft_compatible_head() {
    let tmp = common::scratch("train");
    let cfg = TrainConfig {
        model: "minilm-l6".into(),
        train: common::data("sentiment-movies/dev.jsonl"),
        dev: Some(common::data("sentiment-movies/test.jsonl")),
        dev_rows: Some(8),
        template: "[soft:6]{text}".into(),
        target_field: "label".into(),
        task: TaskKind::SeqCls,
        init: InitKind::RandomNormal,
        steps: Some(3),
        batch: 4,
        eval_every: 3,
        ..tiny(tmp.path().join("seqcls"))
    };
    train::train(&cfg, &mut Quiet).unwrap();
    let a = softprompt::adapter::load_peft(&cfg.output).unwrap();
    assert_eq!(a.prompt_embeddings.dims(), &[6, 384]);
    let (w, b) = a.classifier().expect("classifier head saved");
    assert_eq!((w.dims(), b.dims()), (&[2, 384][..], &[2][..]));
    let config = std::fs::read_to_string(cfg.output.join("adapter_config.json")).unwrap();
    assert!(
        config.contains("\"task_type\": \"SEQ_CLS\"") && config.contains("\"peft_type\": \"PROMPT_TUNING\""),
        "{config}"
    );
    // A seq-cls run on a causal model is refused.
    let e = train_err(&TrainConfig {
        model: "smollm2-135m".into(),
        output: tmp.path().join("seqcls-causal"),
        ..cfg
    });
    assert!(e.contains("needs an encoder model"), "{e}");
}
