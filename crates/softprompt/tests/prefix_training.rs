//! Training key/value prefixes on the real SmolLM2 with tiny budgets: prefix tuning (with and
//! without PEFT's projection) and a Cartridge lower the training loss; the saved PEFT adapter
//! reloads (`load_peft` + `prefix_cache`) and scores as the trained parameters do; its
//! `adapter_config.json` is PEFT's; resuming equals an uninterrupted run; a Cartridge's frozen
//! tokens never change; templates with soft tokens are refused.

mod common;
use candle_core::{DType, Device, Tensor};
use softprompt::adapter::{load_peft, PeftType};
use softprompt::backbone::{BackboneInput, KvCache};
use softprompt::batch::{make_batch, splice_embeddings};
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::score::score_candidates_after;
use softprompt::infer::session::{self, ScoreOptions};
use softprompt::io::read_safetensors;
use softprompt::prompt::prefix::{flat_to_cache, layers_to_flat};
use softprompt::task::TaskKind;
use softprompt::train::optim::Schedule;
use softprompt::train::prefix::prefix_shape;
use softprompt::train::{self, InitKind, Method, Quiet, TrainConfig};
use std::path::{Path, PathBuf};

const CARTRIDGE_TEXT: &str = "Facts about countries and their capital cities:";

/// Four capital-city rows in one batch (every step sees the same rows), copied into `dir`.
fn four_rows(dir: &Path) -> PathBuf {
    common::first_rows("facts-countries/capital/train.jsonl", 4, dir)
}

/// A tiny run of `method` on four rows copied into `dir/data`, its output `dir/out`.
fn tiny(dir: &Path, method: Method) -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: four_rows(&dir.join("data")),
        dev: Some(common::data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(4),
        template: "{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        method,
        num_virtual_tokens: 4,
        init: InitKind::RandomNormal,
        lr: 0.05,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(4),
        batch: 4,
        eval_every: 2,
        output: dir.join("out"),
        ..TrainConfig::default()
    }
}

fn lowers_the_loss(cfg: TrainConfig) {
    train::train(&cfg, &mut Quiet).unwrap();
    let l = common::losses(&cfg.output);
    println!("{:?}: {l:?}", cfg.method);
    assert_eq!(l.len(), cfg.steps.unwrap());
    let n = l.len();
    assert!(
        (l[n - 2] + l[n - 1]) < 0.8 * (l[0] + l[1]),
        "{:?}: loss did not fall: {l:?}",
        cfg.method
    );
}

#[test]
fn prefix_tuning_lowers_the_loss() {
    let tmp = common::scratch("prefix");
    lowers_the_loss(TrainConfig {
        init: InitKind::Zero,
        steps: Some(8),
        eval_every: 8,
        ..tiny(&tmp.path().join("lower-prefix"), Method::PrefixTuning)
    });
}

#[test]
fn prefix_tuning_with_projection_lowers_the_loss() {
    let tmp = common::scratch("prefix");
    lowers_the_loss(TrainConfig {
        prefix_projection: true,
        encoder_hidden: 32,
        lr: 0.01,
        steps: Some(8),
        eval_every: 8,
        ..tiny(&tmp.path().join("lower-projection"), Method::PrefixTuning)
    });
}

#[test]
fn cartridge_lowers_the_loss() {
    let tmp = common::scratch("prefix");
    lowers_the_loss(TrainConfig {
        init: InitKind::Text,
        init_text: Some(CARTRIDGE_TEXT.into()),
        steps: Some(8),
        eval_every: 8,
        ..tiny(&tmp.path().join("lower-cartridge"), Method::Cartridge)
    });
}

/// The adapter's `adapter_config.json` as PEFT writes it (the fixture's, model name aside).
fn same_config_as_fixture(out: &Path, fixture: &str) {
    let ours = std::fs::read_to_string(out.join("adapter_config.json"))
        .unwrap()
        .replace("\"smollm2-135m\"", "\"SmolLM2-135M-Instruct.Q4_1.gguf\"");
    let peft = std::fs::read_to_string(common::fixture(fixture).join("adapter_config.json")).unwrap();
    assert_eq!(ours, peft, "{fixture}");
}

/// Scores of the dev rows with a one-row prefix cache.
fn dev_scores(cfg: &TrainConfig, model: &softprompt::backbone::LoadedModel, prefix: &KvCache) -> Vec<Vec<f32>> {
    let mut data = read_jsonl(cfg.dev.as_ref().unwrap()).unwrap();
    data.records.truncate(4);
    let s = session::open(model, Some(&cfg.output), &ScoreOptions::default(), &[&data]).unwrap();
    assert!(s.prompt.is_none());
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let r = Scorer::new(model, &s.task, None, None)
        .unwrap()
        .with_prefix(Some(prefix))
        .evaluate(&examples, 4, false)
        .unwrap();
    r.predictions.into_iter().map(|p| p.scores).collect()
}

/// Saves, reloads through `load_peft` + `prefix_cache`, and scores as the raw parameters do.
fn saved_adapter_reloads(cfg: TrainConfig, fixture: &str, peft_type: PeftType) {
    train::train(&cfg, &mut Quiet).unwrap();
    same_config_as_fixture(&cfg.output, fixture);
    let model = common::load_model("smollm2-135m");
    let info = model.backbone.info().clone();
    let a = load_peft(&cfg.output).unwrap();
    assert_eq!(a.config.peft_type(), peft_type);
    let cache = a.prefix_cache(&info).unwrap().unwrap();
    // The same prefix rebuilt from softprompt's own raw parameters (the best checkpoint is the
    // last: one evaluation at the end).
    let flat = common::raw_learned(&cfg, cfg.output.with_file_name("reprepare"));
    let d = common::max_abs_diff(&flat, &a.prompt_embeddings);
    assert!(
        d < 1e-6,
        "{fixture}: saved prompt_embeddings differ from the raw parameters' prefix by {d}"
    );
    let from_raw = flat_to_cache(&flat, prefix_shape(&info)).unwrap();
    let s1 = dev_scores(&cfg, &model, &cache);
    let s2 = dev_scores(&cfg, &model, &from_raw);
    assert!(common::max_diff_rows(&s1, &s2) < 1e-5, "{fixture}: {s1:?} vs {s2:?}");
    // And the run's test evaluation (the best adapter read back from the folder) scores the
    // same as scoring it here.
    let t = common::test_scores_on_dev(&cfg, 4);
    assert!(common::max_diff_rows(&t, &s1) < 1e-4, "{fixture}: test {t:?} vs {s1:?}");
}

#[test]
fn saved_prefix_adapter_reloads_and_scores_the_same() {
    let tmp = common::scratch("prefix");
    saved_adapter_reloads(
        TrainConfig {
            steps: Some(2),
            ..tiny(&tmp.path().join("reload-prefix"), Method::PrefixTuning)
        },
        "smollm2_prefix_tuning",
        PeftType::PrefixTuning,
    );
}

#[test]
fn saved_projected_prefix_adapter_reloads_and_scores_the_same() {
    let tmp = common::scratch("prefix");
    saved_adapter_reloads(
        TrainConfig {
            prefix_projection: true,
            encoder_hidden: 64,
            steps: Some(2),
            ..tiny(&tmp.path().join("reload-projection"), Method::PrefixTuning)
        },
        "smollm2_prefix_tuning_projection",
        PeftType::PrefixTuning,
    );
}

#[test]
fn saved_cartridge_reloads_and_scores_the_same() {
    let tmp = common::scratch("prefix");
    saved_adapter_reloads(
        TrainConfig {
            num_virtual_tokens: 5,
            init: InitKind::Text,
            init_text: Some(CARTRIDGE_TEXT.into()),
            steps: Some(2),
            ..tiny(&tmp.path().join("reload-cartridge"), Method::Cartridge)
        },
        "smollm2_cartridge",
        PeftType::Cartridge,
    );
}

fn resume_equals_uninterrupted(full: TrainConfig) {
    let part = full.output.with_file_name("part");
    common::resume_equals_uninterrupted(&full, part);
}

#[test]
fn resumed_projected_prefix_tuning_equals_uninterrupted() {
    let tmp = common::scratch("prefix");
    resume_equals_uninterrupted(TrainConfig {
        prefix_projection: true,
        encoder_hidden: 16,
        ..tiny(&tmp.path().join("resume-projection"), Method::PrefixTuning)
    });
}

#[test]
fn resumed_cartridge_equals_uninterrupted_and_frozen_tokens_stay() {
    let tmp = common::scratch("prefix");
    let cfg = TrainConfig {
        num_frozen_tokens: 2,
        init: InitKind::Text,
        init_text: Some(CARTRIDGE_TEXT.into()),
        weight_decay: 0.1,
        ..tiny(&tmp.path().join("resume-cartridge"), Method::Cartridge)
    };
    resume_equals_uninterrupted(cfg.clone());
    // The frozen tokens are the text prefill's first two positions, bit for bit, after training
    // (weight decay included); the trainable ones moved.
    let model = common::load_model("smollm2-135m");
    let lm = model.backbone.causal().unwrap();
    let ids = model.tokenizer.encode(CARTRIDGE_TEXT, true).unwrap();
    let ids = Tensor::new(&ids[..4], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut cache = KvCache::default();
    let mask = Tensor::ones((1, 4), DType::U32, &Device::Cpu).unwrap();
    lm.forward_cached(&BackboneInput::new(&lm.embed(&ids).unwrap(), &mask), &mut cache)
        .unwrap();
    let start = layers_to_flat(&cache.layers, 4).unwrap();
    let trained = load_peft(&cfg.output).unwrap().prompt_embeddings;
    let rows = |t: &Tensor, a: usize, n: usize| -> Vec<f32> {
        t.narrow(0, a, n).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(rows(&trained, 0, 2), rows(&start, 0, 2), "frozen tokens changed");
    assert_ne!(
        rows(&trained, 2, 2),
        rows(&start, 2, 2),
        "trainable tokens did not move"
    );
    let raw = read_safetensors(&cfg.output.join("softprompt_prompt.safetensors")).unwrap();
    assert_eq!(raw["prompt_encoder.default.frozen_embedding"].dims(), [2, 30 * 2 * 192]);
    assert_eq!(
        raw["prompt_encoder.default.trainable_embedding"].dims(),
        [2, 30 * 2 * 192]
    );
}

/// Batched scoring after a prefix (the shared-template path included) equals scoring each row
/// alone after the same prefix; a PEFT fixture opens as a session with a template.
#[test]
fn peft_prefix_fixture_scores_in_batches_as_row_by_row() {
    let model = common::load_model("smollm2-135m");
    let lm = model.backbone.causal().unwrap();
    let mut data = read_jsonl(&common::data("sentiment-movies/test.jsonl")).unwrap();
    data.records.truncate(5);
    for fixture in ["smollm2_prefix_tuning", "smollm2_cartridge"] {
        let opts = ScoreOptions {
            template: Some("Review: {text}\\nSentiment: {label}".into()),
            ..ScoreOptions::default()
        };
        let s = session::open(&model, Some(&common::fixture(fixture)), &opts, &[&data]).unwrap();
        let prefix = s.prefix.as_ref().expect("a prefix cache");
        let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
        let batched = Scorer::new(&model, &s.task, None, None)
            .unwrap()
            .with_prefix(Some(prefix))
            .evaluate(&examples, 5, false)
            .unwrap();
        let candidates = s.task.candidate_ids(&model.tokenizer, " ").unwrap();
        let mut worst = 0f32;
        for (e, p) in examples.iter().zip(&batched.predictions) {
            let batch = make_batch(&[e], false, &Device::Cpu).unwrap();
            let embeds = splice_embeddings(lm, &batch, None).unwrap();
            let alone = score_candidates_after(lm, Some(prefix), &embeds, &candidates).unwrap();
            for (a, b) in alone.iter().zip(&p.scores) {
                worst = worst.max((a - b).abs());
            }
        }
        println!("{fixture}: max-abs batched vs alone {worst:.2e}");
        assert!(worst < 1e-3, "{fixture}: {worst}");
        // A template with soft tokens is refused for a prefix adapter.
        let bad = ScoreOptions {
            template: Some("[soft:4]Review: {text}\\nSentiment: {label}".into()),
            ..ScoreOptions::default()
        };
        let e = session::open(&model, Some(&common::fixture(fixture)), &bad, &[&data])
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{e:#}").contains("no [soft:..] tokens"), "{e:#}");
    }
}

#[test]
fn bad_prefix_options_are_refused() {
    let tmp = common::scratch("prefix");
    let err = |cfg: TrainConfig| format!("{:#}", train::train(&cfg, &mut Quiet).map(|_| ()).unwrap_err());
    let e = err(TrainConfig {
        template: "[soft:4]{text} {target}".into(),
        ..tiny(&tmp.path().join("bad-soft"), Method::PrefixTuning)
    });
    assert!(e.contains("remove the [soft:..] tokens"), "{e}");
    let e = err(TrainConfig {
        init: InitKind::Vocab,
        ..tiny(&tmp.path().join("bad-init"), Method::PrefixTuning)
    });
    assert!(e.contains("does not apply to a key/value prefix"), "{e}");
    let e = err(TrainConfig {
        init: InitKind::Text,
        init_text: Some(CARTRIDGE_TEXT.into()),
        prefix_projection: true,
        ..tiny(&tmp.path().join("bad-text-projection"), Method::PrefixTuning)
    });
    assert!(e.contains("projection cannot start from given keys"), "{e}");
    let e = err(TrainConfig {
        num_frozen_tokens: 4,
        ..tiny(&tmp.path().join("bad-frozen"), Method::Cartridge)
    });
    assert!(e.contains("num_frozen_tokens (4) must be below"), "{e}");
    let e = err(TrainConfig {
        init: InitKind::Text,
        init_text: Some("Hi".into()),
        ..tiny(&tmp.path().join("bad-short-text"), Method::Cartridge)
    });
    assert!(e.contains("the prefill needs at least"), "{e}");
}
