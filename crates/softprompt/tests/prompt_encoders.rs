//! The prompt module: p-tuning encoders (MLP, bidirectional LSTM) give gradients equal to
//! central finite differences (f64), the LSTM matches a plain-loop reference of torch's
//! equations, parameter names/shapes follow PEFT, and every initialisation rule holds on the
//! real SmolLM2 / MiniLM tokenizers and embedding tables.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use softprompt::prompt::*;
use std::collections::HashMap;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = seeded_rng(seed);
    let t = initial_prompt(
        &PromptInit::RandomNormal,
        shape[0],
        shape[1],
        InitSource::none(),
        &mut rng,
    )
    .unwrap();
    t.to_dtype(DType::F64).unwrap()
}

fn loss_of(prompt: &SoftPrompt, r: &Tensor) -> f64 {
    (prompt.forward().unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks d(sum(P ⊙ R))/dθ from candle's backprop against central differences for every
/// element of every parameter. Returns the largest relative error.
fn check_gradients(prompt: &SoftPrompt, r: &Tensor) -> f64 {
    let p = prompt.forward().unwrap();
    assert_eq!(p.dims(), r.dims());
    let grads = (&p * r).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-6;
    let mut worst = 0f64;
    for (name, var) in prompt.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached `{name}`"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().any(|x| *x != 0.0), "gradient of `{name}` is all zero");
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.dims().to_vec();
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] = base[i] + eps;
            var.set(&Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let plus = loss_of(prompt, r);
            v[i] = base[i] - eps;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let minus = loss_of(prompt, r);
            let fd = (plus - minus) / (2.0 * eps);
            let err = (fd - g[i]).abs() / (1.0f64).max(g[i].abs());
            assert!(err < 1e-6, "`{name}`[{i}]: backprop {} vs finite difference {fd}", g[i]);
            worst = worst.max(err);
        }
        var.set(&Tensor::from_vec(base, shape.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
    }
    worst
}

#[test]
fn mlp_encoder_gradients_match_finite_differences() {
    let (p, d, h) = (4, 7, 5);
    let init = randn(&[p, d], 1);
    let prompt = SoftPrompt::p_tuning(&init, &EncoderSpec::Mlp { hidden: h }, &mut seeded_rng(2)).unwrap();
    let names: Vec<(String, Vec<usize>)> = prompt
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let expect = [
        ("prompt_encoder.default.embedding.weight", vec![p, d]),
        ("prompt_encoder.default.mlp_head.0.weight", vec![h, d]),
        ("prompt_encoder.default.mlp_head.0.bias", vec![h]),
        ("prompt_encoder.default.mlp_head.2.weight", vec![h, h]),
        ("prompt_encoder.default.mlp_head.2.bias", vec![h]),
        ("prompt_encoder.default.mlp_head.4.weight", vec![d, h]),
        ("prompt_encoder.default.mlp_head.4.bias", vec![d]),
    ];
    assert_eq!(
        names,
        expect
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(prompt.forward().unwrap().dims(), [p, d]);
    let worst = check_gradients(&prompt, &randn(&[p, d], 3));
    println!("MLP encoder: worst relative gradient error {worst:.2e}");
}

#[test]
fn lstm_encoder_gradients_match_finite_differences() {
    let (p, d, h) = (5, 4, 3);
    let init = randn(&[p, d], 11);
    let spec = EncoderSpec::Lstm {
        hidden: h,
        num_layers: 2,
        dropout: 0.0,
    };
    let prompt = SoftPrompt::p_tuning(&init, &spec, &mut seeded_rng(12)).unwrap();
    assert_eq!(prompt.forward().unwrap().dims(), [p, d]);
    let worst = check_gradients(&prompt, &randn(&[p, d], 13));
    println!("2-layer bidirectional LSTM encoder: worst relative gradient error {worst:.2e}");
}

#[test]
fn lstm_names_and_shapes_follow_torch() {
    let (p, d, h) = (3, 6, 4);
    let init = randn(&[p, d], 5);
    let spec = EncoderSpec::Lstm {
        hidden: h,
        num_layers: 2,
        dropout: 0.0,
    };
    let prompt = SoftPrompt::p_tuning(&init, &spec, &mut seeded_rng(6)).unwrap();
    let got: Vec<(String, Vec<usize>)> = prompt
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let mut want: Vec<(String, Vec<usize>)> = vec![("prompt_encoder.default.embedding.weight".into(), vec![p, d])];
    for l in 0..2 {
        let input = if l == 0 { d } else { 2 * h };
        for suffix in ["", "_reverse"] {
            let pre = "prompt_encoder.default.lstm_head";
            want.push((format!("{pre}.weight_ih_l{l}{suffix}"), vec![4 * h, input]));
            want.push((format!("{pre}.weight_hh_l{l}{suffix}"), vec![4 * h, h]));
            want.push((format!("{pre}.bias_ih_l{l}{suffix}"), vec![4 * h]));
            want.push((format!("{pre}.bias_hh_l{l}{suffix}"), vec![4 * h]));
        }
    }
    want.push(("prompt_encoder.default.mlp_head.0.weight".into(), vec![2 * h, 2 * h]));
    want.push(("prompt_encoder.default.mlp_head.0.bias".into(), vec![2 * h]));
    want.push(("prompt_encoder.default.mlp_head.2.weight".into(), vec![d, 2 * h]));
    want.push(("prompt_encoder.default.mlp_head.2.bias".into(), vec![d]));
    assert_eq!(got, want);
    // torch's init ranges: LSTM ±1/sqrt(h), Linear ±1/sqrt(in).
    for (name, var) in prompt.vars() {
        let bound = if name.contains("lstm_head") {
            1.0 / (h as f64).sqrt()
        } else if name.contains("mlp_head") {
            1.0 / (2.0 * h as f64).sqrt()
        } else {
            continue;
        };
        let v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() <= bound), "{name} outside ±{bound}");
    }
    assert_eq!(prompt.encoder().unwrap().spec(), spec);
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// torch.nn.LSTM's equations with plain loops (batch 1, bidirectional, zero initial state).
fn reference_lstm(prompt: &SoftPrompt, h: usize, layers: usize) -> Vec<Vec<f64>> {
    let params: HashMap<String, Vec<Vec<f64>>> = prompt
        .vars()
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor();
            let m = if t.rank() == 1 {
                vec![t.to_vec1::<f64>().unwrap()]
            } else {
                t.to_vec2::<f64>().unwrap()
            };
            (n, m)
        })
        .collect();
    let get = |n: &str| &params[&format!("prompt_encoder.default.{n}")];
    let mut x: Vec<Vec<f64>> = get("embedding.weight").clone();
    let p = x.len();
    for l in 0..layers {
        let mut out = vec![vec![0.0; 2 * h]; p];
        for (dir, suffix) in ["", "_reverse"].iter().enumerate() {
            let wih = get(&format!("lstm_head.weight_ih_l{l}{suffix}"));
            let whh = get(&format!("lstm_head.weight_hh_l{l}{suffix}"));
            let bih = &get(&format!("lstm_head.bias_ih_l{l}{suffix}"))[0];
            let bhh = &get(&format!("lstm_head.bias_hh_l{l}{suffix}"))[0];
            let (mut hs, mut cs) = (vec![0.0; h], vec![0.0; h]);
            let order: Vec<usize> = if dir == 0 {
                (0..p).collect()
            } else {
                (0..p).rev().collect()
            };
            for t in order {
                let gate = |r: usize| -> f64 {
                    bih[r]
                        + bhh[r]
                        + (0..x[t].len()).map(|k| wih[r][k] * x[t][k]).sum::<f64>()
                        + (0..h).map(|k| whh[r][k] * hs[k]).sum::<f64>()
                };
                let gates: Vec<f64> = (0..4 * h).map(gate).collect();
                for j in 0..h {
                    let (i, f, g, o) = (
                        sig(gates[j]),
                        sig(gates[h + j]),
                        gates[2 * h + j].tanh(),
                        sig(gates[3 * h + j]),
                    );
                    cs[j] = f * cs[j] + i * g;
                    hs[j] = o * cs[j].tanh();
                    out[t][dir * h + j] = hs[j];
                }
            }
        }
        x = out;
    }
    let lin = |x: &Vec<Vec<f64>>, w: &Vec<Vec<f64>>, b: &Vec<f64>, relu: bool| -> Vec<Vec<f64>> {
        x.iter()
            .map(|row| {
                (0..w.len())
                    .map(|o| {
                        let v = b[o] + (0..row.len()).map(|k| w[o][k] * row[k]).sum::<f64>();
                        if relu {
                            v.max(0.0)
                        } else {
                            v
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let y = lin(&x, get("mlp_head.0.weight"), &get("mlp_head.0.bias")[0], true);
    lin(&y, get("mlp_head.2.weight"), &get("mlp_head.2.bias")[0], false)
}

#[test]
fn lstm_forward_matches_torch_equations() {
    let (p, d, h) = (6, 5, 4);
    let init = randn(&[p, d], 21);
    for layers in [1, 2, 3] {
        let spec = EncoderSpec::Lstm {
            hidden: h,
            num_layers: layers,
            dropout: 0.0,
        };
        let prompt = SoftPrompt::p_tuning(&init, &spec, &mut seeded_rng(22)).unwrap();
        let ours: Vec<Vec<f64>> = prompt.forward().unwrap().to_vec2().unwrap();
        let theirs = reference_lstm(&prompt, h, layers);
        let worst = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!("LSTM ({layers} layers) vs plain-loop reference: max-abs {worst:.2e}");
        assert!(worst < 1e-12, "{layers} layers: {worst}");
    }
}

#[test]
fn lstm_dropout_only_in_training() {
    let init = randn(&[4, 6], 31);
    let spec = EncoderSpec::Lstm {
        hidden: 5,
        num_layers: 2,
        dropout: 0.5,
    };
    let prompt = SoftPrompt::p_tuning(&init, &spec, &mut seeded_rng(32)).unwrap();
    let a = prompt.forward().unwrap();
    let b = prompt.forward().unwrap();
    assert_eq!(
        max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()),
        0.0
    );
    let c = prompt.forward_train(&mut seeded_rng(1)).unwrap();
    assert!(max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &c.to_dtype(DType::F32).unwrap()) > 0.0);
    // dropout 0: training forward is the inference forward.
    let spec0 = EncoderSpec::Lstm {
        hidden: 5,
        num_layers: 2,
        dropout: 0.0,
    };
    let p0 = SoftPrompt::p_tuning(&init, &spec0, &mut seeded_rng(32)).unwrap();
    let d = (p0.forward().unwrap() - p0.forward_train(&mut seeded_rng(1)).unwrap()).unwrap();
    assert_eq!(d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
}

#[test]
fn prompt_tuning_is_the_embedding_and_state_round_trips() {
    let init = randn(&[3, 4], 41);
    let mut prompt = SoftPrompt::prompt_tuning(&init).unwrap();
    assert_eq!(prompt.vars().len(), 1);
    assert_eq!(prompt.vars()[0].0, "prompt_embeddings");
    let worst = check_gradients(&prompt, &randn(&[3, 4], 42));
    assert!(worst < 1e-9);

    // tensors() → set_from() restores every parameter of a p-tuning prompt, keeping the Vars.
    let spec = EncoderSpec::Lstm {
        hidden: 3,
        num_layers: 2,
        dropout: 0.0,
    };
    let a = SoftPrompt::p_tuning(&init, &spec, &mut seeded_rng(1)).unwrap();
    let mut b = SoftPrompt::p_tuning(&randn(&[3, 4], 43), &spec, &mut seeded_rng(2)).unwrap();
    let b_vars = b.vars();
    let saved: HashMap<String, Tensor> = a.tensors().unwrap().into_iter().collect();
    b.set_from(&saved).unwrap();
    let diff = (a.forward().unwrap() - b.forward().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
    assert_eq!(b_vars[0].1.as_tensor().id(), b.vars()[0].1.as_tensor().id());
    // Copies: changing the prompt later does not change what was saved.
    let before = saved["prompt_encoder.default.embedding.weight"].clone();
    a.embedding().set(&randn(&[3, 4], 44)).unwrap();
    let after = &saved["prompt_encoder.default.embedding.weight"];
    assert_eq!(
        (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );

    // Missing and misshapen entries are errors that name the tensor, and change nothing.
    let mut partial = saved.clone();
    partial.remove("prompt_encoder.default.mlp_head.2.bias");
    let err = format!("{:#}", b.set_from(&partial).unwrap_err());
    assert!(err.contains("prompt_encoder.default.mlp_head.2.bias"), "{err}");
    let mut wrong = saved.clone();
    wrong.insert(
        "prompt_embeddings".into(),
        Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap(),
    );
    prompt.set_from(&wrong).unwrap_err();
}

#[test]
fn text_rule_repeats_or_truncates() {
    assert_eq!(text_init_ids(&[1, 2, 3], 8).unwrap(), vec![1, 2, 3, 1, 2, 3, 1, 2]);
    assert_eq!(text_init_ids(&[1, 2, 3], 2).unwrap(), vec![1, 2]);
    assert_eq!(text_init_ids(&[1, 2, 3], 3).unwrap(), vec![1, 2, 3]);
    assert_eq!(text_init_ids(&[7], 4).unwrap(), vec![7, 7, 7, 7]);
    assert!(text_init_ids(&[], 4).is_none());
}

fn rows_of(table: &Tensor, ids: &[u32]) -> Tensor {
    table.index_select(&Tensor::new(ids, &Device::Cpu).unwrap(), 0).unwrap()
}

#[test]
fn text_init_on_smollm2_matches_peft_rule() {
    let m = load_model("smollm2-135m");
    let table = m.backbone.embedding_table();
    let src = InitSource::model(table, &m.tokenizer);
    let d = m.backbone.info().hidden;
    let text = "Answer with the capital city:";
    let ids = m.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids, [21350, 351, 260, 3575, 2240, 42]);
    // Repeat: 8 > 6 tokens.
    let p8 = initial_prompt(&PromptInit::Text(text.into()), 8, d, src, &mut seeded_rng(0)).unwrap();
    let want: Vec<u32> = vec![21350, 351, 260, 3575, 2240, 42, 21350, 351];
    assert_eq!(max_abs_diff(&p8, &rows_of(table, &want)), 0.0);
    // Truncate: 4 < 6 tokens.
    let p4 = initial_prompt(&PromptInit::Text(text.into()), 4, d, src, &mut seeded_rng(0)).unwrap();
    assert_eq!(max_abs_diff(&p4, &rows_of(table, &ids[..4])), 0.0);
    // PEFT's own adapter was initialised from this text (then shifted by seeded noise): every
    // row is nearest to the token our rule puts there.
    let adapter = softprompt::adapter::load_peft(&fixture("smollm2_prompt_tuning_text")).unwrap();
    for (r, &id) in want.iter().enumerate() {
        let row = adapter.prompt_embeddings.i(r).unwrap().unsqueeze(0).unwrap();
        let dist = table.broadcast_sub(&row).unwrap().sqr().unwrap().sum(1).unwrap();
        let nearest = dist.argmin(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(nearest, id, "row {r}");
    }
}

#[test]
fn vocab_labels_and_random_inits_on_real_models() {
    for name in ["smollm2-135m", "minilm-l6"] {
        let m = load_model(name);
        let table = m.backbone.embedding_table();
        let tok = &m.tokenizer;
        let vocab = m.backbone.info().vocab;
        let d = m.backbone.info().hidden;
        let src = InitSource::model(table, tok);

        // The pool: 5,000 ordinary tokens, no special / reserved / single-character tokens.
        let pool = common_token_ids(tok, vocab, VOCAB_SAMPLE_POOL);
        assert_eq!(pool.len(), VOCAB_SAMPLE_POOL);
        let specials: Vec<u32> = [tok.bos_id(), tok.eos_id(), tok.pad_id()]
            .into_iter()
            .flatten()
            .collect();
        assert!(pool.iter().all(|id| !specials.contains(id)));
        let first: Vec<String> = pool[..16].iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        println!("{name}: most common tokens start {first:?}");
        assert!(
            first.iter().any(|t| t.trim_start_matches(['Ġ', '▁']) == "the"),
            "{first:?}"
        );

        // Vocab: p distinct pool tokens, reproducible from the seed.
        let p = 64;
        let ids = sample_vocab_ids(tok, vocab, p, &[], &mut seeded_rng(7)).unwrap();
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), p, "sampled with replacement");
        assert!(ids.iter().all(|id| pool.contains(id)));
        let v = initial_prompt(&PromptInit::Vocab, p, d, src, &mut seeded_rng(7)).unwrap();
        assert_eq!(max_abs_diff(&v, &rows_of(table, &ids)), 0.0);
        let again = initial_prompt(&PromptInit::Vocab, p, d, src, &mut seeded_rng(7)).unwrap();
        assert_eq!(max_abs_diff(&v, &again), 0.0);
        let other = initial_prompt(&PromptInit::Vocab, p, d, src, &mut seeded_rng(8)).unwrap();
        assert!(max_abs_diff(&v, &other) > 0.0);
        // All 5,000 at once: still no repeats.
        let all = sample_vocab_ids(tok, vocab, VOCAB_SAMPLE_POOL, &[], &mut seeded_rng(1)).unwrap();
        let mut all_sorted = all.clone();
        all_sorted.sort();
        all_sorted.dedup();
        assert_eq!(all_sorted.len(), VOCAB_SAMPLE_POOL);

        // Labels: one row per label, the mean of its sub-token embeddings; the rest sampled.
        let labels = vec![
            " photosynthesizing".to_string(),
            " positive".to_string(),
            "no".to_string(),
        ];
        let p = 6;
        let lp = initial_prompt(&PromptInit::Labels(labels.clone()), p, d, src, &mut seeded_rng(3)).unwrap();
        assert_eq!(lp.dims(), [p, d]);
        let mut label_ids = Vec::new();
        for (r, label) in labels.iter().enumerate() {
            let sub = tok.encode(label, false).unwrap();
            label_ids.extend_from_slice(&sub);
            let mean = rows_of(table, &sub).mean(0).unwrap();
            let diff = max_abs_diff(&lp.i(r).unwrap(), &mean);
            assert!(diff < 1e-6, "{name} label {label:?} ({} sub-tokens): {diff}", sub.len());
            if r == 0 {
                assert!(
                    sub.len() > 1,
                    "{name}: want a multi-token label to test averaging, got {sub:?}"
                );
            }
        }
        let rest = sample_vocab_ids(tok, vocab, p - labels.len(), &label_ids, &mut seeded_rng(3)).unwrap();
        assert!(rest.iter().all(|id| !label_ids.contains(id)));
        assert_eq!(
            max_abs_diff(
                &lp.narrow(0, labels.len(), p - labels.len()).unwrap(),
                &rows_of(table, &rest)
            ),
            0.0
        );
        // Fewer virtual tokens than labels: token i averages labels i, i + p, …
        let two = initial_prompt(&PromptInit::Labels(labels.clone()), 2, d, src, &mut seeded_rng(0)).unwrap();
        let mean_of = |rs: &[usize]| {
            let rows: Vec<Tensor> = rs.iter().map(|&r| lp.i(r).unwrap().unsqueeze(0).unwrap()).collect();
            Tensor::cat(&rows, 0).unwrap().mean(0).unwrap()
        };
        assert!(max_abs_diff(&two.i(0).unwrap(), &mean_of(&[0, 2])) < 1e-6);
        assert!(max_abs_diff(&two.i(1).unwrap(), &mean_of(&[1])) < 1e-6);
    }
}

#[test]
fn random_inits_have_their_ranges() {
    let (p, d) = (50, 200);
    let u = initial_prompt(&PromptInit::Random, p, d, InitSource::none(), &mut seeded_rng(5)).unwrap();
    assert_eq!((u.dims(), u.dtype()), (&[p, d][..], DType::F32));
    let v: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
    let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    println!("uniform init: min {lo:.4} max {hi:.4} mean {mean:.4}");
    assert!(lo >= -0.5 && hi <= 0.5 && lo < -0.49 && hi > 0.49);
    assert!(mean.abs() < 0.01);
    let u2 = initial_prompt(&PromptInit::Random, p, d, InitSource::none(), &mut seeded_rng(5)).unwrap();
    assert_eq!(max_abs_diff(&u, &u2), 0.0);

    let n = initial_prompt(&PromptInit::RandomNormal, p, d, InitSource::none(), &mut seeded_rng(5)).unwrap();
    let v: Vec<f32> = n.flatten_all().unwrap().to_vec1().unwrap();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
    println!("normal init: mean {mean:.4} var {var:.4}");
    assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05);

    // FromTensor keeps the matrix; a wrong shape is refused.
    let t = initial_prompt(
        &PromptInit::FromTensor(u.clone()),
        p,
        d,
        InitSource::none(),
        &mut seeded_rng(0),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&t, &u), 0.0);
    let err = initial_prompt(
        &PromptInit::FromTensor(u),
        p + 1,
        d,
        InitSource::none(),
        &mut seeded_rng(0),
    )
    .unwrap_err();
    assert!(format!("{err}").contains("[51, 200]"), "{err}");
    // Model-based inits without a model are errors, not panics.
    assert!(initial_prompt(&PromptInit::Vocab, 3, 4, InitSource::none(), &mut seeded_rng(0)).is_err());
    assert!(initial_prompt(
        &PromptInit::Text("x".into()),
        3,
        4,
        InitSource::none(),
        &mut seeded_rng(0)
    )
    .is_err());
    assert!(initial_prompt(&PromptInit::Random, 0, 4, InitSource::none(), &mut seeded_rng(0)).is_err());
}
