//! Late prompt tuning: the prompt's gradient through the layers above its layer equals central
//! finite differences (f64, the tiny Llama); the fused layers agree with the composed ones; the
//! adapter's keys and values (what every reader uses) give the training layout's hidden states;
//! on the real SmolLM2 training lowers the loss, caching the lower layers changes nothing, and
//! the saved adapter scores through the readers (`eval`'s session, the run's test evaluation,
//! generation's prompt cache) as at the end of training; a resumed run (its lower-layer cache
//! rebuilt) equals an uninterrupted one bit for bit; step 0 is prompt tuning's; the options are
//! checked by name.

mod common;
use candle_core::{DType, Device, Tensor};
use common::tiny::{rand, tiny_llama, tiny_llama_in};
use common::*;
use softprompt::adapter::{load_peft, PeftType, LATE_PROMPT_LAYER, LATE_PROMPT_PLACEHOLDER};
use softprompt::backbone::{Backbone, BackboneInput, CausalLm, KvCache};
use softprompt::batch::{make_batch, Batch};
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::late_prompt::late_prompt_cache;
use softprompt::infer::prompt_cache::PromptCache;
use softprompt::infer::session::{self, ScoreOptions};
use softprompt::task::{Example, TaskKind};
use softprompt::template::Token;
use softprompt::train::late_prompt::{without_virtual_tokens, LatePrompt};
use softprompt::train::optim::Schedule;
use softprompt::train::{self, InitKind, LearnedPrompt, Method, Quiet, TrainConfig};
use std::path::Path;

fn example(prompt: Vec<Token>) -> Example {
    Example {
        origin: "t:1".into(),
        prompt,
        target: Vec::new(),
        gold: 0,
        truncated: false,
    }
}

/// Two rows behind two reserved positions, the second one shorter (padded).
fn two_rows() -> Batch {
    let a = example(vec![
        Token::Soft(0),
        Token::Soft(1),
        Token::Id(3),
        Token::Id(5),
        Token::Id(7),
        Token::Id(2),
    ]);
    let b = example(vec![Token::Soft(0), Token::Soft(1), Token::Id(6), Token::Id(9)]);
    make_batch(&[&a, &b], false, &Device::Cpu).unwrap()
}

fn loss(hidden: &Tensor, r: &Tensor) -> f64 {
    (hidden.to_dtype(DType::F64).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn gradient_matches_finite_differences_through_the_upper_layers() {
    let model = tiny_llama();
    let (p, d) = (2, 16);
    let mut s = 11u64;
    let start = rand(&[p, d], 1.0, &mut s);
    let placeholder = rand(&[p, d], 1.0, &mut s);
    let prompt = LatePrompt::with_layer(&start, &placeholder, 1, true).unwrap();
    let batch = two_rows();
    let real = batch.mask.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
    let r = rand(&[2, 6, d], 1.0, &mut s).broadcast_mul(&real).unwrap();
    let (_, tape) = prompt.model_forward(&model, &batch, &start).unwrap();
    let g: Vec<f64> = prompt
        .gradient(&model, &batch, &tape, &r)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(prompt.cached_rows(), 2);
    assert!(g.iter().any(|x| *x != 0.0), "the prompt's gradient is all zero");
    let base: Vec<f64> = start.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    let at = |v: Vec<f64>| {
        let t = Tensor::from_vec(v, (p, d), &Device::Cpu).unwrap();
        loss(&prompt.model_forward(&model, &batch, &t).unwrap().0, &r)
    };
    let mut worst = 0f64;
    for i in 0..base.len() {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[i] += eps;
        minus[i] -= eps;
        let fd = (at(plus) - at(minus)) / (2.0 * eps);
        let err = (fd - g[i]).abs() / 1f64.max(g[i].abs());
        assert!(err < 1e-6, "P[{i}]: backward {} vs finite difference {fd}", g[i]);
        worst = worst.max(err);
    }
    println!("late prompt: worst relative error {worst:e}");
}

/// Hidden states at the input positions of the training layout (lower layers on the
/// placeholder, the prompt spliced in at the layer, the layers above), and after the adapter's
/// keys and values (what the readers run), for the rows of `batch` one by one.
fn training_and_reader_hidden(
    model: &dyn CausalLm,
    prompt: &Tensor,
    placeholder: &Tensor,
    layer: usize,
    batch: &Batch,
) -> (Tensor, Tensor) {
    let learner = LatePrompt::with_layer(prompt, placeholder, layer, false).unwrap();
    let (train_h, _) = learner.model_forward(model, batch, prompt).unwrap();
    let cache = late_prompt_cache(model, prompt, placeholder, layer).unwrap();
    let p = prompt.dim(0).unwrap();
    let (b, t) = batch.shape;
    let ids = batch.ids.narrow(1, p, t - p).unwrap();
    let mask = batch.mask.narrow(1, p, t - p).unwrap();
    let embeds = model.embed(&ids).unwrap();
    let mut c: KvCache = cache.repeat(b).unwrap();
    let read_h = model
        .forward_cached(&BackboneInput::new(&embeds, &mask), &mut c)
        .unwrap();
    let real = mask.to_dtype(train_h.dtype()).unwrap().unsqueeze(2).unwrap();
    let train_h = train_h.narrow(1, p, t - p).unwrap().broadcast_mul(&real).unwrap();
    let read_h = read_h.broadcast_mul(&real).unwrap();
    (train_h, read_h)
}

#[test]
fn the_adapters_keys_and_values_give_the_training_layouts_hidden_states() {
    let batch = two_rows();
    let mut s = 5u64;
    let prompt = rand(&[2, 16], 1.0, &mut s);
    let placeholder = rand(&[2, 16], 1.0, &mut s);
    for layer in [0, 1] {
        for dtype in [DType::F64, DType::F32] {
            let model = tiny_llama_in(dtype);
            let (prompt, placeholder) = (prompt.to_dtype(dtype).unwrap(), placeholder.to_dtype(dtype).unwrap());
            let (a, b) = training_and_reader_hidden(model.as_ref(), &prompt, &placeholder, layer, &batch);
            let diff = max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap());
            assert!(diff < 1e-5, "layer {layer}, {dtype:?}: training vs reader {diff}");
        }
    }
}

#[test]
fn fused_layers_equal_composed_ones() {
    let (fused, composed) = (tiny_llama_in(DType::F32), tiny_llama_in(DType::F64));
    let batch = two_rows();
    let mut s = 21u64;
    let prompt = rand(&[2, 16], 1.0, &mut s);
    let placeholder = rand(&[2, 16], 1.0, &mut s);
    let r = rand(&[2, 6, 16], 1.0, &mut s);
    let run = |model: &dyn CausalLm, dtype: DType| {
        let prompt = prompt.to_dtype(dtype).unwrap();
        let placeholder = placeholder.to_dtype(dtype).unwrap();
        let learner = LatePrompt::with_layer(&prompt, &placeholder, 1, true).unwrap();
        let (h, tape) = learner.model_forward(model, &batch, &prompt).unwrap();
        // Summed over the rows: the fused layers report the gradient of positions every row
        // shares (the prompt) at row 0 only.
        let d_layer = model
            .backward(&tape, &r.to_dtype(dtype).unwrap())
            .unwrap()
            .sum(0)
            .unwrap();
        let g = learner
            .gradient(model, &batch, &tape, &r.to_dtype(dtype).unwrap())
            .unwrap();
        [h, d_layer, g].map(|t| t.to_dtype(DType::F32).unwrap())
    };
    let (a, b) = (run(fused.as_ref(), DType::F32), run(composed.as_ref(), DType::F64));
    for (what, (x, y)) in ["hidden states", "gradient at the layer (row sum)", "prompt gradient"]
        .iter()
        .zip(a.iter().zip(&b))
    {
        let diff = max_abs_diff(x, y);
        assert!(diff < 1e-4, "{what}: fused vs composed {diff}");
    }
}

#[test]
fn step_zero_is_prompt_tuning_with_the_same_init() {
    // The prompt starts as the placeholder's hidden states at its layer: the model then computes
    // what prompt tuning computes with the placeholder as its prompt.
    let model = tiny_llama();
    let batch = two_rows();
    let mut s = 31u64;
    let init = rand(&[2, 16], 1.0, &mut s);
    let mask = Tensor::ones((1, 2), DType::U32, &Device::Cpu).unwrap();
    let lifted = model
        .forward_layers(&BackboneInput::new(&init.unsqueeze(0).unwrap(), &mask), 0..1, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let late = LatePrompt::with_layer(&lifted, &init, 1, false).unwrap();
    let (h_late, _) = late.model_forward(&model, &batch, &lifted).unwrap();
    let embeds = softprompt::batch::splice_embeddings(&model, &batch, Some(&init)).unwrap();
    let h_pt = model.forward(&BackboneInput::new(&embeds, &batch.mask)).unwrap();
    let diff = max_abs_diff(
        &h_late.to_dtype(DType::F32).unwrap(),
        &h_pt.to_dtype(DType::F32).unwrap(),
    );
    assert!(diff < 1e-6, "late prompt at step 0 vs prompt tuning: {diff}");
}

/// Four capital-city rows in one batch, copied into `dir/data`; the output `dir/NAME`.
fn tiny(dir: &Path, name: &str) -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: first_rows("facts-countries/capital/train.jsonl", 4, &dir.join("data")),
        dev: Some(data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(4),
        template: "[soft:4]{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        method: Method::LatePromptTuning,
        init: InitKind::Random,
        lr: 0.3,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(8),
        batch: 4,
        eval_every: 8,
        max_len: 64,
        output: dir.join(name),
        ..TrainConfig::default()
    }
}

/// The dev rows' scores through the readers' path (`session::open` on the saved folder: the
/// template without its `[soft:4]`, the adapter as a key/value prefix).
fn reader_scores(cfg: &TrainConfig, model: &softprompt::backbone::LoadedModel) -> Vec<Vec<f32>> {
    let mut data = read_jsonl(cfg.dev.as_ref().unwrap()).unwrap();
    data.records.truncate(4);
    let s = session::open(model, Some(&cfg.output), &ScoreOptions::default(), &[&data]).unwrap();
    assert!(s.prompt.is_none() && s.prefix.as_ref().is_some_and(|c| c.len() == 4));
    assert_eq!(s.task.template.num_virtual_tokens(), 0);
    let examples = s.task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let r = Scorer::new(model, &s.task, None, None)
        .unwrap()
        .with_prefix(s.prefix.as_ref())
        .evaluate(&examples, 4, false)
        .unwrap();
    r.predictions.into_iter().map(|p| p.scores).collect()
}

/// The dev rows' scores by the learner rebuilt from the run's raw parameters, as the run's
/// own dev evaluation scores them.
fn learner_scores(cfg: &TrainConfig, scratch: &Path) -> Vec<Vec<f32>> {
    let raw = softprompt::io::read_safetensors(&cfg.output.join("softprompt_prompt.safetensors")).unwrap();
    let p = train::prepare(
        &TrainConfig {
            output: scratch.to_path_buf(),
            ..cfg.clone()
        },
        &mut Quiet,
    )
    .unwrap();
    let mut learner = train::new_learner(&p).unwrap();
    learner.prompt.set_from(&raw.into_iter().collect()).unwrap();
    let (prompt, prefix) = learner.prompt.eval_parts(&*p.model.backbone).unwrap();
    assert!(prompt.is_none());
    let rows = without_virtual_tokens(&p.tasks[0].dev);
    let r = Scorer::new(&p.model, p.task(), None, None)
        .unwrap()
        .with_prefix(prefix.as_ref())
        .evaluate(&rows, 4, false)
        .unwrap();
    r.predictions.into_iter().map(|p| p.scores).collect()
}

#[test]
fn late_prompt_tuning_trains_saves_and_reloads() {
    let tmp = scratch("late-prompt");
    let cfg = tiny(tmp.path(), "cached");
    train::train(&cfg, &mut Quiet).unwrap();
    let l = losses(&cfg.output);
    println!("late prompt tuning: {l:?}");
    assert_eq!(l.len(), 8);
    assert!(l[6] + l[7] < 0.8 * (l[0] + l[1]), "loss did not fall: {l:?}");
    // Without the cache every step runs the lower layers again: the same numbers.
    let uncached = TrainConfig {
        cache_lower_layers: Some(false),
        ..tiny(tmp.path(), "uncached")
    };
    train::train(&uncached, &mut Quiet).unwrap();
    let l2 = losses(&uncached.output);
    let worst = l.iter().zip(&l2).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "cached {l:?} vs uncached {l2:?}");
    // A PROMPT_TUNING-shaped adapter plus its layer (SmolLM2-135M: 30 layers, default 15).
    let a = load_peft(&cfg.output).unwrap();
    assert_eq!(a.config.peft_type(), PeftType::PromptTuning);
    assert_eq!(a.prompt_embeddings.dims(), &[4, 576]);
    assert_eq!(a.tensors[LATE_PROMPT_LAYER].dims(), &[1]);
    assert_eq!(a.late_prompt_layer().unwrap(), Some(15));
    assert_eq!(a.tensors[LATE_PROMPT_PLACEHOLDER].dims(), &[4, 576]);
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.output.join("softprompt.json")).unwrap()).unwrap();
    assert_eq!(task["method"], "late-prompt-tuning");
    // Never read as an input prompt.
    let e = format!("{:#}", a.input_prompt().unwrap_err());
    assert!(e.contains("late-prompt-tuning") && e.contains("layer 15"), "{e}");
    // Readers score as the learner does at the end of training, and so does the test evaluation.
    let model = load_model("smollm2-135m");
    let s_reader = reader_scores(&cfg, &model);
    let s_learner = learner_scores(&cfg, &tmp.path().join("reprepare"));
    assert!(
        max_diff_rows(&s_reader, &s_learner) < 1e-5,
        "{s_reader:?} vs {s_learner:?}"
    );
    let t = test_scores_on_dev(&cfg, 4);
    assert!(max_diff_rows(&t, &s_reader) < 1e-4, "test {t:?} vs {s_reader:?}");
    // Generation and the server start from the same keys and values.
    let lm = model.backbone.causal().unwrap();
    let cache = PromptCache::from_adapter(lm, &a).unwrap();
    assert_eq!(cache.len(), 4);
}

#[test]
fn options_are_checked_by_name() {
    let tmp = scratch("late-prompt-options");
    let middle = TrainConfig {
        template: "{text} [soft:4] {target}".into(),
        ..tiny(tmp.path(), "middle")
    };
    let e = format!("{:#}", train::train(&middle, &mut Quiet).unwrap_err());
    assert!(
        e.contains("option `template`") && e.contains("late-prompt-tuning"),
        "{e}"
    );
    let deep = TrainConfig {
        insert_layer: Some(30),
        ..tiny(tmp.path(), "deep")
    };
    let e = format!("{:#}", train::train(&deep, &mut Quiet).unwrap_err());
    assert!(e.contains("option `insert_layer`") && e.contains("30 layers"), "{e}");
    let other = TrainConfig {
        insert_layer: Some(3),
        ..TrainConfig::default()
    };
    let w = other.options_without_effect().join("\n");
    assert!(w.contains("insert_layer"), "{w}");
}

#[test]
fn resumed_late_prompt_tuning_equals_uninterrupted() {
    // The lower layers' cache starts empty again after a resume: the rows' outputs, computed
    // in other batches, must be the same numbers.
    let tmp = scratch("late-prompt-resume");
    let full = TrainConfig {
        steps: Some(4),
        batch: 2,
        eval_every: 0,
        ..tiny(tmp.path(), "full")
    };
    resume_equals_uninterrupted(&full, tmp.path().join("part"));
}

#[test]
fn other_families_refuse_by_name() {
    let model = load_model("minilm-l6");
    let embeds = Tensor::zeros((1, 3, 384), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap();
    let input = BackboneInput::new(&embeds, &mask);
    let e = format!("{:#}", model.backbone.forward_layers(&input, 0..3, None).unwrap_err());
    assert!(
        e.contains("late prompt tuning runs on Llama-family models") && e.contains("Bert"),
        "{e}"
    );
    let Err(e) = model.backbone.forward_train_from(&input, 3) else {
        panic!("an encoder ran late prompt tuning's training forward")
    };
    let e = format!("{e:#}");
    assert!(e.contains("late prompt tuning runs on Llama-family models"), "{e}");
}
