//! Residual prompt tuning and DePT: gradients through each reparameterisation equal central
//! finite differences (f64, the tiny Llama for DePT's input update); on the real SmolLM2 each
//! lowers the training loss; the saved adapter (a plain PROMPT_TUNING adapter, with DePT's `A`
//! and `B` beside the prompt) reloads and scores as the learner's raw parameters do, through the
//! readers' session and the run's own test evaluation; resuming equals an uninterrupted run;
//! `init = "from"` continues from the raw parameters; generation applies DePT's update;
//! the new options are checked by name.

mod common;
use candle_core::{DType, Device, Tensor};
use common::tiny::{rand, tiny_llama};
use common::*;
use softprompt::adapter::{load_peft, PeftType, DEPT_A, DEPT_B};
use softprompt::backbone::{Backbone, BackboneInput};
use softprompt::batch::make_batch;
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::generate::prefill;
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::session::{self, ScoreOptions};
use softprompt::prompt::{initial_prompt, seeded_rng, InitSource, PromptInit, SoftPrompt, RESIDUAL_EMBEDDING};
use softprompt::task::{Example, TaskKind};
use softprompt::template::Token;
use softprompt::train::dept::DeptPrompt;
use softprompt::train::optim::Schedule;
use softprompt::train::{self, InitKind, LearnedPrompt, Method, Quiet, TrainConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn randn(p: usize, d: usize, seed: u64) -> Tensor {
    initial_prompt(
        &PromptInit::RandomNormal,
        p,
        d,
        InitSource::none(),
        &mut seeded_rng(seed),
    )
    .unwrap()
    .to_dtype(DType::F64)
    .unwrap()
}

/// Checks every parameter's gradient from `grads` against central differences of `f`.
fn check_fd(
    vars: Vec<(String, candle_core::Var)>,
    grads: &candle_core::backprop::GradStore,
    f: &dyn Fn() -> f64,
) -> f64 {
    let eps = 1e-6;
    let mut worst = 0f64;
    for (name, var) in vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached `{name}`"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().any(|x| *x != 0.0), "gradient of `{name}` is all zero");
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.dims().to_vec();
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] = base[i] + eps;
            var.set(&Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let plus = f();
            v[i] = base[i] - eps;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let minus = f();
            let fd = (plus - minus) / (2.0 * eps);
            let err = (fd - g[i]).abs() / 1f64.max(g[i].abs());
            assert!(err < 1e-6, "`{name}`[{i}]: backprop {} vs finite difference {fd}", g[i]);
            worst = worst.max(err);
        }
        var.set(&Tensor::from_vec(base, shape.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
    }
    worst
}

#[test]
fn residual_gradients_match_finite_differences() {
    let (p, d, h) = (3, 6, 4);
    let prompt = SoftPrompt::residual(&randn(p, d, 1), h, &mut seeded_rng(2)).unwrap();
    // Move LayerNorm's scale and shift off their starting 1 and 0, so their gradients are generic.
    let mlp = prompt.residual_mlp().unwrap();
    let mut s = 3u64;
    mlp.ln_weight.set(&(rand(&[d], 0.5, &mut s) + 1.0).unwrap()).unwrap();
    mlp.ln_bias.set(&rand(&[d], 0.5, &mut s)).unwrap();
    let names: Vec<(String, Vec<usize>)> = prompt
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    assert_eq!(
        names,
        vec![
            (RESIDUAL_EMBEDDING.to_string(), vec![p, d]),
            ("residual_prompt.down.weight".into(), vec![h, d]),
            ("residual_prompt.down.bias".into(), vec![h]),
            ("residual_prompt.up.weight".into(), vec![d, h]),
            ("residual_prompt.up.bias".into(), vec![d]),
            ("residual_prompt.layer_norm.weight".into(), vec![d]),
            ("residual_prompt.layer_norm.bias".into(), vec![d]),
        ]
    );
    // The skip connection: P' − P is the LayerNorm'd MLP output (zero mean per token before
    // the shift, so P' ≠ P).
    let r = rand(&[p, d], 1.0, &mut s);
    let loss = || {
        (prompt.forward().unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (prompt.forward().unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let worst = check_fd(prompt.vars(), &grads, &loss);
    println!("residual: worst relative error {worst:e}");
}

fn example(prompt: Vec<Token>) -> Example {
    Example {
        origin: "t:1".into(),
        prompt,
        target: Vec::new(),
        gold: 0,
        truncated: false,
    }
}

#[test]
fn dept_gradients_match_finite_differences_through_the_model() {
    let model = tiny_llama();
    let (p, d, rows, rank) = (2, 16, 4, 2);
    let mut prompt = DeptPrompt::new(&randn(p, d, 4), rows, rank, &mut seeded_rng(5)).unwrap();
    // B starts at zero (the update starts at 0); give it values so A's gradient is not zero.
    let start: HashMap<String, Tensor> = prompt.tensors().unwrap().into_iter().collect();
    let b0: Vec<f64> = start[DEPT_B].flatten_all().unwrap().to_vec1().unwrap();
    assert!(b0.iter().all(|x| *x == 0.0), "B must start at zero");
    let mut s = 9u64;
    let mut set = start.clone();
    set.insert(DEPT_B.into(), rand(&[rank, d], 0.5, &mut s));
    prompt.set_from(&set).unwrap();
    // Row 0: soft tokens first, 5 real tokens (the 5th is past A's 4 rows: no update); row 1:
    // a soft token in the middle, padded.
    let a = example(vec![
        Token::Soft(0),
        Token::Soft(1),
        Token::Id(3),
        Token::Id(5),
        Token::Id(7),
        Token::Id(2),
        Token::Id(4),
    ]);
    let b = example(vec![Token::Id(6), Token::Soft(0), Token::Soft(1), Token::Id(9)]);
    let batch = make_batch(&[&a, &b], false, &Device::Cpu).unwrap();
    assert_eq!(batch.input_index, vec![0, 1, 2, 3, 4, 0, 1]);
    let real = batch.mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let r = rand(&[2, 7, d], 1.0, &mut s).broadcast_mul(&real).unwrap();
    // The trainer's chain: forward, the backbone's input gradient, the split gradient, autograd.
    let learned = LearnedPrompt::forward(&prompt).unwrap();
    assert_eq!(learned.dims(), &[p + rows, d]);
    let (_, tape) = prompt.model_forward(&model, &batch, &learned.detach()).unwrap();
    let d_learned = prompt.gradient(&model, &batch, &tape, &r).unwrap();
    let grads = (&learned * d_learned).unwrap().sum_all().unwrap().backward().unwrap();
    let functional = || {
        let learned = LearnedPrompt::forward(&prompt).unwrap();
        let (hidden, _) = prompt.model_forward(&model, &batch, &learned).unwrap();
        (hidden * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let worst = check_fd(LearnedPrompt::vars(&prompt), &grads, &functional);
    println!("dept: worst relative error {worst:e}");
    // The frozen model sees the update only at real input tokens.
    let plain = softprompt::batch::splice_embeddings(&model, &batch, Some(&learned.narrow(0, 0, p).unwrap())).unwrap();
    let hidden_plain = model.forward(&BackboneInput::new(&plain, &batch.mask)).unwrap();
    let (hidden, _) = prompt.model_forward(&model, &batch, &learned).unwrap();
    let diff = (hidden - hidden_plain)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff > 1e-3, "the update changed nothing");
}

/// Four capital-city rows in one batch, copied into `dir/data`; the output `dir/out`.
fn tiny(dir: &Path, method: Method) -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: first_rows("facts-countries/capital/train.jsonl", 4, &dir.join("data")),
        dev: Some(data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(4),
        template: "[soft:4]{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        method,
        init: InitKind::Random,
        residual_bottleneck: 32,
        dept_rank: 4,
        dept_lr: 1e-3,
        lr: 0.01,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(8),
        batch: 4,
        eval_every: 8,
        max_len: 64,
        output: dir.join("out"),
        ..TrainConfig::default()
    }
}

fn lowers_the_loss(cfg: &TrainConfig) {
    train::train(cfg, &mut Quiet).unwrap();
    let l = losses(&cfg.output);
    println!("{:?}: {l:?}", cfg.method);
    assert_eq!(l.len(), cfg.steps.unwrap());
    let n = l.len();
    assert!(
        (l[n - 2] + l[n - 1]) < 0.8 * (l[0] + l[1]),
        "{:?}: loss did not fall: {l:?}",
        cfg.method
    );
}

/// The dev rows' scores through the readers' path (`session::open` on the saved folder).
fn reader_scores(cfg: &TrainConfig, model: &softprompt::backbone::LoadedModel) -> Vec<Vec<f32>> {
    let mut data = read_jsonl(cfg.dev.as_ref().unwrap()).unwrap();
    data.records.truncate(4);
    let s = session::open(model, Some(&cfg.output), &ScoreOptions::default(), &[&data]).unwrap();
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let r = Scorer::new(model, &s.task, s.prompt.as_ref(), None)
        .unwrap()
        .with_input_update(s.input_update.as_ref())
        .evaluate(&examples, 4, false)
        .unwrap();
    r.predictions.into_iter().map(|p| p.scores).collect()
}

/// The dev rows' scores with the given prompt and update (the session's task).
fn scores_with(
    cfg: &TrainConfig,
    model: &softprompt::backbone::LoadedModel,
    prompt: &Tensor,
    update: Option<&Tensor>,
) -> Vec<Vec<f32>> {
    let mut data = read_jsonl(cfg.dev.as_ref().unwrap()).unwrap();
    data.records.truncate(4);
    let s = session::open(model, Some(&cfg.output), &ScoreOptions::default(), &[&data]).unwrap();
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let r = Scorer::new(model, &s.task, Some(prompt), None)
        .unwrap()
        .with_input_update(update)
        .evaluate(&examples, 4, false)
        .unwrap();
    r.predictions.into_iter().map(|p| p.scores).collect()
}

#[test]
fn residual_prompt_tuning_trains_saves_and_reloads() {
    let tmp = scratch("residual");
    let cfg = tiny(tmp.path(), Method::ResidualPromptTuning);
    lowers_the_loss(&cfg);
    // A plain PROMPT_TUNING adapter holding P' = P + LN(MLP(P)); the raw parts beside it.
    let a = load_peft(&cfg.output).unwrap();
    assert_eq!(a.config.peft_type(), PeftType::PromptTuning);
    assert!(a.tensors.is_empty(), "{:?}", a.tensors.keys().collect::<Vec<_>>());
    let raw = softprompt::io::read_safetensors(&cfg.output.join("softprompt_prompt.safetensors")).unwrap();
    assert!(raw.contains_key(RESIDUAL_EMBEDDING) && raw.contains_key("residual_prompt.up.weight"));
    let rebuilt = raw_learned(&cfg, tmp.path().join("reprepare"));
    let d = max_abs_diff(&rebuilt, &a.prompt_embeddings);
    assert!(d < 1e-6, "saved P' differs from the raw parameters' by {d}");
    let raw_p = &raw[RESIDUAL_EMBEDDING];
    assert!(max_abs_diff(raw_p, &a.prompt_embeddings) > 1e-3, "P' equals P");
    // Readers (the session) score it as the learner's own prompt does, and so does the run's
    // test evaluation.
    let model = load_model("smollm2-135m");
    let s_reader = reader_scores(&cfg, &model);
    let s_learner = scores_with(&cfg, &model, &rebuilt, None);
    assert!(
        max_diff_rows(&s_reader, &s_learner) < 1e-5,
        "{s_reader:?} vs {s_learner:?}"
    );
    let t = test_scores_on_dev(&cfg, 4);
    assert!(max_diff_rows(&t, &s_reader) < 1e-4, "test {t:?} vs {s_reader:?}");
    // Generation reads it as any prompt-tuning adapter.
    let Some(lm) = model.backbone.causal() else {
        panic!("SmolLM2 is causal")
    };
    PromptCache::from_adapter(lm, &a).unwrap();
    // init = "from" continues from the raw P and MLP: the new run's P' is the saved one.
    let from = TrainConfig {
        init: InitKind::From,
        init_from: Some(cfg.output.clone()),
        output: tmp.path().join("from"),
        ..cfg.clone()
    };
    let p = train::prepare(&from, &mut Quiet).unwrap();
    let learner = train::new_learner(&p).unwrap();
    let start = learner.prompt.forward().unwrap();
    assert!(max_abs_diff(&start, &a.prompt_embeddings) < 1e-6);
}

#[test]
fn dept_trains_saves_and_reloads() {
    let tmp = scratch("dept");
    let cfg = tiny(tmp.path(), Method::Dept);
    lowers_the_loss(&cfg);
    let a = load_peft(&cfg.output).unwrap();
    assert_eq!(a.config.peft_type(), PeftType::PromptTuning);
    assert_eq!(a.tensors[DEPT_A].dims(), &[cfg.max_len, cfg.dept_rank]);
    assert_eq!(a.tensors[DEPT_B].dims(), &[cfg.dept_rank, 576]);
    let update = a.input_update().unwrap().unwrap();
    assert!(update.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.output.join("softprompt.json")).unwrap()).unwrap();
    assert_eq!(task["method"], "dept");
    // The learner's own parts, rebuilt from the raw parameters: [P; A·B].
    let rebuilt = raw_learned(&cfg, tmp.path().join("reprepare"));
    let prompt = rebuilt.narrow(0, 0, 4).unwrap();
    let own_update = rebuilt.narrow(0, 4, cfg.max_len).unwrap();
    assert!(max_abs_diff(&prompt, &a.prompt_embeddings) < 1e-6);
    assert!(max_abs_diff(&own_update, &update) < 1e-6);
    let model = load_model("smollm2-135m");
    let s_reader = reader_scores(&cfg, &model);
    let s_learner = scores_with(&cfg, &model, &prompt, Some(&own_update));
    assert!(
        max_diff_rows(&s_reader, &s_learner) < 1e-5,
        "{s_reader:?} vs {s_learner:?}"
    );
    let t = test_scores_on_dev(&cfg, 4);
    assert!(max_diff_rows(&t, &s_reader) < 1e-4, "test {t:?} vs {s_reader:?}");
    // The update matters: without it the scores differ.
    let s_without = scores_with(&cfg, &model, &prompt, None);
    assert!(
        max_diff_rows(&s_without, &s_reader) > 1e-5,
        "the update changed no score"
    );
    // Generation applies it too: the prompt cache plus the request's embeddings with A·B's
    // first rows added give the same last hidden state as the whole sequence run at once.
    let Some(lm) = model.backbone.causal() else {
        panic!("SmolLM2 is causal")
    };
    let pc = PromptCache::from_adapter(lm, &a).unwrap();
    assert!(pc.input_update.is_some());
    let ids = model.tokenizer.encode("The capital of France is", false).unwrap();
    let n = ids.len();
    let mut cache = pc.cache.clone();
    let embeds = pc.input_embeds(lm, &ids).unwrap();
    let cached = prefill(lm, &embeds, &mut cache, usize::MAX, &mut |_, _| {}).unwrap();
    let words = lm
        .embed(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
        .unwrap();
    let shifted = (words + update.narrow(0, 0, n).unwrap().unsqueeze(0).unwrap()).unwrap();
    let whole = Tensor::cat(&[&a.prompt_embeddings.unsqueeze(0).unwrap(), &shifted], 1).unwrap();
    let mask = Tensor::ones((1, 4 + n), DType::U32, &Device::Cpu).unwrap();
    let full = lm.forward(&BackboneInput::new(&whole, &mask)).unwrap();
    let d = max_abs_diff(
        &cached.narrow(1, n - 1, 1).unwrap(),
        &full.narrow(1, 4 + n - 1, 1).unwrap(),
    );
    assert!(d < 1e-3, "cached generation differs from the whole sequence by {d}");
    let plain = lm
        .embed(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
        .unwrap();
    assert!(max_abs_diff(&embeds, &plain) > 0.0, "generation dropped the update");
}

#[test]
fn resumed_residual_prompt_tuning_equals_uninterrupted() {
    let tmp = scratch("residual");
    let full = TrainConfig {
        steps: Some(4),
        eval_every: 2,
        ..tiny(&tmp.path().join("full"), Method::ResidualPromptTuning)
    };
    resume_equals_uninterrupted(&full, tmp.path().join("part"));
}

#[test]
fn resumed_dept_equals_uninterrupted() {
    let tmp = scratch("dept");
    let full = TrainConfig {
        steps: Some(4),
        eval_every: 2,
        ..tiny(&tmp.path().join("full"), Method::Dept)
    };
    resume_equals_uninterrupted(&full, tmp.path().join("part"));
}

#[test]
fn new_options_are_checked_by_name() {
    let base = TrainConfig {
        output: PathBuf::from("/nonexistent/never-written"),
        ..TrainConfig::default()
    };
    let err = |cfg: TrainConfig| format!("{:#}", cfg.validate().unwrap_err());
    let e = err(TrainConfig {
        method: Method::ResidualPromptTuning,
        residual_bottleneck: 0,
        ..base.clone()
    });
    assert!(
        e.contains("option `residual_bottleneck` (--residual-bottleneck)"),
        "{e}"
    );
    let e = err(TrainConfig {
        method: Method::Dept,
        dept_rank: 0,
        ..base.clone()
    });
    assert!(e.contains("option `dept_rank` (--dept-rank)"), "{e}");
    let e = err(TrainConfig {
        method: Method::Dept,
        dept_lr: 0.0,
        ..base.clone()
    });
    assert!(e.contains("option `dept_lr` (--dept-lr)"), "{e}");
}
