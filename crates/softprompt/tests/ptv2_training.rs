//! P-tuning v2 (Liu et al. 2022): per-layer key/value prefixes on the real MiniLM for sequence
//! classification. The prefixed forward reproduces transformers' own BertModel run with the
//! prefix as `past_key_values` (fixture `fixtures/ptv2/minilm_prefix_hf`); training lowers the
//! loss and moves the prefix (with and without PEFT's projection); the adapter is written in
//! PEFT's PREFIX_TUNING / SEQ_CLS layout, reloads as a session and scores as the trained
//! parameters do; resuming equals an uninterrupted run; what cannot work is refused.

mod common;
use candle_core::{DType, Tensor};
use softprompt::adapter::{load_peft, PeftType, TaskType};
use softprompt::backbone::BackboneInput;
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::session::{self, ScoreOptions};
use softprompt::io::read_safetensors;
use softprompt::loss::ClassifierHead;
use softprompt::prompt::prefix::flat_to_cache;
use softprompt::task::TaskKind;
use softprompt::train::optim::Schedule;
use softprompt::train::prefix::prefix_shape;
use softprompt::train::{self, InitKind, Method, Quiet, TrainConfig};
use std::path::{Path, PathBuf};

/// The first eight training rows (both labels), copied into `dir`: every step of a batch-8 run
/// sees them all.
fn eight_rows(dir: &Path) -> PathBuf {
    common::first_rows("sentiment-movies/train.jsonl", 8, dir)
}

/// A tiny p-tuning v2 run on MiniLM on eight rows copied into `dir/data`, its output `dir/out`.
fn tiny(dir: &Path) -> TrainConfig {
    TrainConfig {
        model: "minilm-l6".into(),
        train: eight_rows(&dir.join("data")),
        dev: Some(common::data("sentiment-movies/dev.jsonl")),
        dev_rows: Some(6),
        template: "{text}".into(),
        target_field: "label".into(),
        task: TaskKind::SeqCls,
        method: Method::PrefixTuning,
        num_virtual_tokens: 4,
        init: InitKind::RandomNormal,
        lr: 0.01,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(4),
        batch: 8,
        eval_every: 2,
        output: dir.join("out"),
        ..TrainConfig::default()
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ptv2")
        .join(name)
}

/// MiniLM after a 4-position prefix gives transformers' hidden states (real positions), pooler
/// output and classifier logits: same K/V layout, same mask extension, same position offset.
#[test]
fn minilm_prefix_matches_transformers() {
    let model = common::load_model("minilm-l6");
    let enc = model.backbone.encoder().unwrap();
    let r = read_safetensors(&fixture("minilm_prefix_hf").join("reference.safetensors")).unwrap();
    let prefix = flat_to_cache(&r["prompt_embeddings"], prefix_shape(enc.info())).unwrap();
    let ids = common::as_u32(&r["input_ids"]);
    let mask = common::as_u32(&r["attention_mask"]);
    let embeds = enc.embed(&ids).unwrap();
    let hidden = enc
        .forward_prefixed(&BackboneInput::new(&embeds, &mask), &prefix)
        .unwrap();
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let real = |t: &Tensor| t.broadcast_mul(&keep).unwrap();
    let head = ClassifierHead {
        weight: candle_core::Var::from_tensor(&r["classifier.weight"]).unwrap(),
        bias: candle_core::Var::from_tensor(&r["classifier.bias"]).unwrap(),
    };
    let errs = [
        common::max_abs_diff(&real(&hidden), &real(&r["last_hidden"])),
        common::max_abs_diff(&enc.pool(&hidden).unwrap(), &r["pooler_output"]),
        common::max_abs_diff(&head.logits(enc, &hidden).unwrap(), &r["logits"]),
    ];
    println!(
        "MiniLM prefix vs transformers: hidden {:.1e}, pooled {:.1e}, logits {:.1e}",
        errs[0], errs[1], errs[2]
    );
    for e in errs {
        assert!(e < 1e-4, "MiniLM prefix differs from transformers by {e}");
    }
}

/// Trains `cfg`; the loss falls and the saved prefix is not the one it started from.
fn lowers_the_loss_and_moves_the_prefix(cfg: TrainConfig) {
    train::train(&cfg, &mut Quiet).unwrap();
    let l = common::losses(&cfg.output);
    println!("projection {}: {l:?}", cfg.prefix_projection);
    let n = l.len();
    assert_eq!(n, cfg.steps.unwrap());
    assert!(l[n - 2] + l[n - 1] < 0.8 * (l[0] + l[1]), "loss did not fall: {l:?}");
    let p = train::prepare(
        &TrainConfig {
            output: cfg.output.with_file_name("unused"),
            ..cfg.clone()
        },
        &mut Quiet,
    )
    .unwrap();
    let start = train::new_learner(&p).unwrap().prompt.forward().unwrap();
    let trained = load_peft(&cfg.output).unwrap().prompt_embeddings;
    let moved = common::max_abs_diff(&start, &trained);
    assert!(moved > 1e-3, "the prefix did not move ({moved})");
}

#[test]
fn ptv2_lowers_the_loss() {
    let tmp = common::scratch("ptv2");
    lowers_the_loss_and_moves_the_prefix(TrainConfig {
        steps: Some(8),
        eval_every: 8,
        lr: 0.05,
        ..tiny(&tmp.path().join("lower"))
    });
}

#[test]
fn ptv2_with_projection_lowers_the_loss() {
    let tmp = common::scratch("ptv2");
    lowers_the_loss_and_moves_the_prefix(TrainConfig {
        prefix_projection: true,
        encoder_hidden: 32,
        steps: Some(8),
        eval_every: 8,
        ..tiny(&tmp.path().join("lower-projection"))
    });
}

/// Logits of the first six dev rows scored with the adapter in `dir` opened as a session (what
/// `softprompt eval/predict --adapter` do).
fn session_logits(model: &softprompt::backbone::LoadedModel, dir: &Path) -> Vec<Vec<f32>> {
    let mut data = read_jsonl(&common::data("sentiment-movies/dev.jsonl")).unwrap();
    data.records.truncate(6);
    let s = session::open(model, Some(dir), &ScoreOptions::default(), &[&data]).unwrap();
    assert!(s.prompt.is_none(), "a prefix adapter has no input prompt");
    assert_eq!(s.task.kind, TaskKind::SeqCls);
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    Scorer::new(model, &s.task, None, s.head.as_ref())
        .unwrap()
        .with_prefix(s.prefix.as_ref())
        .evaluate(&examples, 4, false)
        .unwrap()
        .predictions
        .into_iter()
        .map(|p| p.scores)
        .collect()
}

/// The adapter is PEFT's prefix-tuning layout for SEQ_CLS; it reloads as a session whose
/// scores equal the trained parameters' (rebuilt from softprompt's raw file) and the run's own
/// test evaluation.
fn saved_adapter_reloads(cfg: TrainConfig) {
    train::train(&cfg, &mut Quiet).unwrap();
    let a = load_peft(&cfg.output).unwrap();
    assert_eq!(a.config.peft_type(), PeftType::PrefixTuning);
    assert_eq!(a.config.task_type, Some(TaskType::SeqCls));
    assert_eq!(
        (a.config.token_dim, a.config.num_layers, a.config.num_attention_heads),
        (384, Some(6), Some(12))
    );
    assert_eq!(a.prompt_embeddings.dims(), [4, 6 * 2 * 384]);
    let (w, b) = a.classifier().expect("the classifier head is saved");
    assert_eq!((w.dims(), b.dims()), (&[2, 384][..], &[2][..]));
    let config = std::fs::read_to_string(cfg.output.join("adapter_config.json")).unwrap();
    for field in [
        "\"peft_type\": \"PREFIX_TUNING\"",
        "\"task_type\": \"SEQ_CLS\"",
        "\"modules_to_save\": [",
    ] {
        assert!(config.contains(field), "{field} missing in {config}");
    }
    let model = common::load_model("minilm-l6");
    let from_files = session_logits(&model, &cfg.output);
    // The same adapter rebuilt from the raw parameters (the best checkpoint is the last one).
    let flat = common::raw_learned(&cfg, cfg.output.with_file_name("reprepare"));
    let d = common::max_abs_diff(&flat, &a.prompt_embeddings);
    assert!(
        d < 1e-6,
        "saved prompt_embeddings differ from the raw parameters' by {d}"
    );
    // The run's test evaluation reads the best adapter back from its folder.
    let t = common::test_scores_on_dev(&cfg, 6);
    let err = common::max_diff_rows(&t, &from_files);
    println!("session vs run's test evaluation: {err:.1e}");
    assert!(err < 1e-5, "test evaluation {t:?} vs session {from_files:?}");
    // Scoring one row at a time gives the batch's logits (padding does not leak).
    let mut data = read_jsonl(&common::data("sentiment-movies/dev.jsonl")).unwrap();
    data.records.truncate(6);
    let s = session::open(&model, Some(&cfg.output), &ScoreOptions::default(), &[&data]).unwrap();
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let scorer = Scorer::new(&model, &s.task, None, s.head.as_ref())
        .unwrap()
        .with_prefix(s.prefix.as_ref());
    let alone: Vec<Vec<f32>> = examples
        .chunks(1)
        .map(|e| scorer.evaluate(e, 1, false).unwrap().predictions[0].scores.clone())
        .collect();
    let err = common::max_diff_rows(&alone, &from_files);
    assert!(err < 1e-4, "one row at a time vs batches of 4: {err}");
}

#[test]
fn saved_ptv2_adapter_reloads_and_scores_the_same() {
    let tmp = common::scratch("ptv2");
    saved_adapter_reloads(TrainConfig {
        steps: Some(2),
        ..tiny(&tmp.path().join("reload"))
    });
}

#[test]
fn saved_projected_ptv2_adapter_reloads_and_scores_the_same() {
    let tmp = common::scratch("ptv2");
    saved_adapter_reloads(TrainConfig {
        prefix_projection: true,
        encoder_hidden: 24,
        steps: Some(2),
        ..tiny(&tmp.path().join("reload-projection"))
    });
}

#[test]
fn resumed_ptv2_equals_uninterrupted() {
    let tmp = common::scratch("ptv2");
    let full = TrainConfig {
        prefix_projection: true,
        encoder_hidden: 16,
        ..tiny(&tmp.path().join("resume-full"))
    };
    common::resume_equals_uninterrupted(&full, tmp.path().join("resume-part"));
    let state = read_safetensors(&full.output.join("checkpoint-last/state.safetensors")).unwrap();
    assert!(state.keys().any(|k| k.starts_with("adamw.m.prompt_encoder")));
    assert!(state.keys().any(|k| k.contains("classifier")));
}

#[test]
fn what_cannot_work_on_an_encoder_is_refused() {
    let tmp = common::scratch("ptv2");
    let err = |cfg: TrainConfig| format!("{:#}", train::train(&cfg, &mut Quiet).map(|_| ()).unwrap_err());
    let e = err(TrainConfig {
        method: Method::Cartridge,
        ..tiny(&tmp.path().join("bad-cartridge"))
    });
    assert!(e.contains("method `cartridge` runs on causal language models"), "{e}");
    let e = err(TrainConfig {
        init: InitKind::Text,
        init_text: Some("Classify the sentiment of the review.".into()),
        ..tiny(&tmp.path().join("bad-text"))
    });
    assert!(
        e.contains("needs a causal language model") && e.contains("init = \"text\""),
        "{e}"
    );
    let e = err(TrainConfig {
        num_virtual_tokens: 20,
        max_len: 500,
        ..tiny(&tmp.path().join("bad-positions"))
    });
    assert!(
        e.contains("option `num_virtual_tokens` (--num-virtual-tokens) (20) + option `max_len` (--max-len) (500) exceed the 512 positions"),
        "{e}"
    );
    let e = err(TrainConfig {
        template: "[soft:4]{text}".into(),
        ..tiny(&tmp.path().join("bad-soft"))
    });
    assert!(e.contains("remove the [soft:..] tokens"), "{e}");
    let e = err(TrainConfig {
        task: TaskKind::Classify,
        ..tiny(&tmp.path().join("bad-classify"))
    });
    assert!(e.contains("needs a causal language model"), "{e}");
    // A prefix for another geometry (SmolLM2's) is refused when opening a session.
    let model = common::load_model("minilm-l6");
    let data = read_jsonl(&common::data("sentiment-movies/dev.jsonl")).unwrap();
    let opts = ScoreOptions {
        template: Some("{text}".into()),
        ..ScoreOptions::default()
    };
    let e = session::open(&model, Some(&common::fixture("smollm2_prefix_tuning")), &opts, &[&data])
        .map(|_| ())
        .unwrap_err();
    assert!(format!("{e:#}").contains("does not fit model"), "{e:#}");
}
