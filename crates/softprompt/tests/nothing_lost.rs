//! Nothing lost, nothing silent (issue 7): a trained prompt is never overwritten by accident, a
//! failed run leaves what was there byte-identical, every option is checked before the model
//! loads with a message in the user's terms, and outputs are honest. One test per defect class.

mod common;
use softprompt::infer::session::{self, ScoreOptions};
use softprompt::task::{Task, TaskKind};
use softprompt::template::Template;
use softprompt::train::optim::Schedule;
use softprompt::train::{self, InitKind, Quiet, TrainConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tiny real run: 2 steps of 2 rows, checkpointed at step 2, into `dir/out`.
fn tiny(dir: &Path) -> TrainConfig {
    TrainConfig {
        model: "smollm2-135m".into(),
        train: common::data("facts-countries/capital/train.jsonl"),
        dev: Some(common::data("facts-countries/capital/dev.jsonl")),
        dev_rows: Some(2),
        template: "[soft:4]{text} {target}".into(),
        target_field: "target".into(),
        task: TaskKind::Generate,
        init: InitKind::Random,
        lr: 0.01,
        warmup: 0,
        schedule: Schedule::Constant,
        steps: Some(2),
        batch: 2,
        eval_every: 2,
        output: dir.join("out"),
        ..TrainConfig::default()
    }
}

fn train_err(cfg: &TrainConfig) -> String {
    format!(
        "{:#}",
        train::train(cfg, &mut Quiet)
            .map(|_| ())
            .expect_err("training should fail")
    )
}

/// Every file below `dir` with its bytes (folders as entries too), sorted.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push((p.clone(), None));
                stack.push(p);
            } else {
                out.push((p.clone(), Some(std::fs::read(&p).unwrap())));
            }
        }
    }
    out.sort();
    out
}

/// A folder that looks like a finished run (the files need not be valid for the refusal).
fn fake_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("checkpoint-last")).unwrap();
    std::fs::write(dir.join("adapter_config.json"), "{\"peft_type\": \"PROMPT_TUNING\"}").unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), b"weights").unwrap();
    std::fs::write(dir.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 1.0}\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
}

#[test]
fn training_into_a_folder_with_an_adapter_is_refused_without_overwrite_or_resume() {
    let tmp = common::scratch("lost");
    let cfg = tiny(&tmp.path().join("refuse"));
    fake_run(&cfg.output);
    let before = snapshot(&cfg.output);
    let e = train_err(&cfg);
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite") && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(snapshot(&cfg.output), before);
}

#[test]
fn a_failed_run_into_an_existing_adapter_leaves_it_byte_identical() {
    let tmp = common::scratch("lost");
    // A real finished run, then replacement attempts that fail in every way a run can fail.
    let cfg = tiny(&tmp.path().join("identical"));
    train::train(&cfg, &mut Quiet).unwrap();
    std::fs::write(cfg.output.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&cfg.output);
    let parent = cfg.output.parent().unwrap().to_path_buf();
    let siblings = || std::fs::read_dir(&parent).unwrap().count();
    let bad_rows = parent.join("bad.jsonl");
    std::fs::write(&bad_rows, "{\"text\": \"a\", \"target\": \"b\"}\n{oops\n").unwrap();
    let failing = [
        // an invalid option
        TrainConfig {
            lr: f64::NAN,
            ..cfg.clone()
        },
        // a bad data row
        TrainConfig {
            train: bad_rows.clone(),
            ..cfg.clone()
        },
        // divergence during training, after a checkpoint of the new run
        TrainConfig {
            lr: 1e38,
            weight_decay: 1.0,
            warmup: 1,
            clip: 0.0,
            steps: Some(4),
            eval_every: 1,
            ..cfg.clone()
        },
    ];
    let n = siblings();
    for (i, bad) in failing.into_iter().enumerate() {
        let e = train_err(&TrainConfig { overwrite: true, ..bad });
        assert_eq!(snapshot(&cfg.output), before, "changed by a failed run: {e}");
        assert_eq!(siblings(), n, "a failed run left a folder behind: {e}");
        // Past the option checks, the message says the old run is still there.
        if i > 0 {
            assert!(e.contains("still holds the previous run, unchanged"), "{e}");
        }
    }
    // A run that succeeds replaces the run's files, keeps the user's, and leaves no temp folder.
    let report = train::train(
        &TrainConfig {
            overwrite: true,
            seed: 7,
            ..cfg.clone()
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(report.adapter_dir, cfg.output);
    assert_eq!(siblings(), n);
    let after = snapshot(&cfg.output);
    assert_eq!(after.len(), before.len());
    let bytes = |s: &[(PathBuf, Option<Vec<u8>>)], f: &str| s.iter().find(|(p, _)| p.ends_with(f)).unwrap().1.clone();
    assert_ne!(
        bytes(&after, "adapter_model.safetensors"),
        bytes(&before, "adapter_model.safetensors")
    );
    assert_eq!(bytes(&after, "notes.txt"), bytes(&before, "notes.txt"));
}

#[test]
fn a_failed_fresh_run_leaves_no_empty_folder() {
    let tmp = common::scratch("lost");
    let cfg = tiny(&tmp.path().join("fresh"));
    let parent = cfg.output.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&parent).unwrap();
    let bad_rows = parent.join("bad.jsonl");
    std::fs::write(&bad_rows, "{\"text\": \"a\", \"target\": \"b\"}\n[1]\n").unwrap();
    let nested = TrainConfig {
        train: bad_rows,
        output: parent.join("a/b/out"),
        ..cfg.clone()
    };
    let e = train_err(&nested);
    assert!(e.contains("bad.jsonl:2"), "{e}");
    assert!(!parent.join("a").exists(), "left {}", parent.join("a").display());
    // Divergence before the first checkpoint: nothing worth keeping, nothing kept.
    let e = train_err(&TrainConfig {
        lr: 1e38,
        weight_decay: 1.0,
        clip: 0.0,
        steps: Some(4),
        eval_every: 4,
        ..cfg.clone()
    });
    assert!(e.contains("before its first checkpoint"), "{e}");
    assert!(!cfg.output.exists());
}

#[test]
fn batch_zero_is_an_error_naming_the_option() {
    let tmp = common::scratch("lost");
    let cfg = TrainConfig {
        batch: 0,
        ..tiny(&tmp.path().join("batch0"))
    };
    let e = train_err(&cfg);
    assert_eq!(
        e,
        "option `batch` (--batch) is 0; it must be at least 1 (rows per micro-batch)"
    );
    assert!(!cfg.output.exists());
}

#[test]
fn counts_steps_accumulation_and_epochs_must_be_at_least_one() {
    let tmp = common::scratch("lost");
    let base = tiny(&tmp.path().join("counts"));
    for (cfg, needle) in [
        (
            TrainConfig {
                steps: Some(0),
                ..base.clone()
            },
            "option `steps` (--steps) is 0",
        ),
        (
            TrainConfig {
                accumulation: 0,
                ..base.clone()
            },
            "option `accumulation` (--accumulation) is 0",
        ),
        (
            TrainConfig {
                steps: None,
                epochs: Some(0.0),
                ..base.clone()
            },
            "option `epochs` (--epochs) is 0",
        ),
        (
            TrainConfig {
                eval_batch: 0,
                ..base.clone()
            },
            "option `eval_batch` (--eval-batch) is 0",
        ),
        (
            TrainConfig {
                dev_rows: Some(0),
                ..base.clone()
            },
            "option `dev_rows` (--dev-rows) is 0",
        ),
    ] {
        let e = train_err(&cfg);
        assert!(e.starts_with(needle), "{e}");
        assert!(!cfg.output.exists());
    }
}

#[test]
fn learning_rate_must_be_finite_and_positive() {
    let tmp = common::scratch("lost");
    for (lr, shown) in [(f64::INFINITY, "inf"), (f64::NAN, "NaN"), (-0.1, "-0.1"), (0.0, "0")] {
        let e = train_err(&TrainConfig {
            lr,
            ..tiny(&tmp.path().join("lr"))
        });
        assert_eq!(
            e,
            format!("option `lr` (--lr) is {shown}; it must be a finite number > 0 (the peak learning rate)")
        );
    }
}

#[test]
fn verbaliser_words_must_be_non_empty_and_distinct() {
    let tmp = common::scratch("lost");
    let mut cfg = TrainConfig {
        train: common::data("sentiment-movies/dev.jsonl"),
        dev: None,
        template: "[soft:2]Review: {text}\nSentiment: {label}".into(),
        target_field: "label".into(),
        task: TaskKind::Classify,
        ..tiny(&tmp.path().join("verbaliser"))
    };
    cfg.verbalizer.insert("negative".into(), " good".into());
    cfg.verbalizer.insert("positive".into(), " good".into());
    let e = train_err(&cfg);
    assert!(
        e.contains("labels `negative` and `positive` both map to the word ` good`"),
        "{e}"
    );
    cfg.verbalizer.insert("positive".into(), "".into());
    let e = train_err(&cfg);
    assert!(e.contains("the word for label `positive` is empty"), "{e}");
    // Distinct words whose first tokens collide (after tokenisation).
    let tok = common::smollm2_tokenizer();
    let template = Template::parse("Review: {text}\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let words: BTreeMap<String, String> = [("a", "positive"), ("b", "positive vibes")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let labels = vec!["a".to_string(), "b".to_string()];
    let e = Task::new(TaskKind::Classify, template, labels, &words, &tok, 64)
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a first-token collision is refused");
    assert!(
        e.contains("labels `a` and `b`") && e.contains("start with the same token ` positive`"),
        "{e}"
    );
}

#[test]
fn a_label_seen_only_in_dev_is_refused() {
    let tmp = common::scratch("lost");
    let train_rows = tmp.path().join("train.jsonl");
    let dev_rows = tmp.path().join("dev.jsonl");
    std::fs::write(
        &train_rows,
        "{\"text\": \"fine\", \"label\": \"positive\"}\n{\"text\": \"bad\", \"label\": \"negative\"}\n",
    )
    .unwrap();
    std::fs::write(&dev_rows, "{\"text\": \"meh\", \"label\": \"neutral\"}\n").unwrap();
    let e = train_err(&TrainConfig {
        train: train_rows,
        dev: Some(dev_rows),
        template: "Review: {text}\nSentiment: {label}".into(),
        target_field: "label".into(),
        task: TaskKind::Classify,
        ..tiny(&tmp.path().join("dev-label-out"))
    });
    assert!(
        e.contains("dev.jsonl:1: label `neutral` appears in the dev set but in no training row"),
        "{e}"
    );
}

#[test]
fn a_template_that_reads_no_field_is_refused() {
    let tmp = common::scratch("lost");
    let e = train_err(&TrainConfig {
        template: "[soft:8] Answer: {target}".into(),
        ..tiny(&tmp.path().join("no-field"))
    });
    assert!(
        e.contains("option `template` (--template)") && e.contains("reads no field"),
        "{e}"
    );
}

#[test]
fn zero_virtual_tokens_is_reported_as_the_option() {
    let tmp = common::scratch("lost");
    let e = train_err(&TrainConfig {
        template: "{text} {target}".into(),
        num_virtual_tokens: 0,
        ..tiny(&tmp.path().join("nvt0"))
    });
    assert!(
        e.starts_with("option `num_virtual_tokens` (--num-virtual-tokens) is 0; it must be at least 1"),
        "{e}"
    );
    assert!(!e.contains("[soft:0]"), "{e}");
}

#[test]
fn resume_with_a_different_template_names_the_option() {
    let tmp = common::scratch("lost");
    let cfg = tiny(&tmp.path().join("resume-differs"));
    let last = cfg.output.join("checkpoint-last");
    std::fs::create_dir_all(&last).unwrap();
    let saved = TrainConfig {
        template: "[soft:6]{text} {target}".into(),
        ..cfg.clone()
    };
    let state = serde_json::json!({"progress": {"step": 2, "best": null, "evals_since_best": 0, "losses": [], "dev": []}, "optimizer_step": 2, "config": saved});
    std::fs::write(last.join("state.json"), state.to_string()).unwrap();
    let e = train_err(&TrainConfig {
        resume: true,
        ..cfg.clone()
    });
    assert!(
        e.contains("cannot resume") && e.contains("option `template` (--template) is"),
        "{e}"
    );
    let e = train_err(&TrainConfig {
        resume: true,
        template: saved.template.clone(),
        encoder_hidden: 3,
        method: train::Method::PTuning,
        ..cfg.clone()
    });
    assert!(e.contains("option `method` (--method)"), "{e}");
    // Resuming a folder without a checkpoint says so.
    let e = train_err(&TrainConfig {
        resume: true,
        ..tiny(&tmp.path().join("resume-nothing"))
    });
    assert!(e.contains("cannot resume") && e.contains("does not exist"), "{e}");
}

#[test]
fn resume_keeps_each_metrics_step_once_and_times_only_its_own_steps() {
    let tmp = common::scratch("lost");
    let cfg = tiny(&tmp.path().join("metrics"));
    train::train(&cfg, &mut Quiet).unwrap();
    // A run killed after step 3 was logged but before its checkpoint (written at step 4).
    let metrics = cfg.output.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\": 3, \"loss\": 9.0}\n{\"step\":");
    std::fs::write(&metrics, text).unwrap();
    let report = train::train(
        &TrainConfig {
            resume: true,
            steps: Some(4),
            eval_every: 4,
            ..cfg.clone()
        },
        &mut Quiet,
    )
    .unwrap();
    assert_eq!((report.steps, report.steps_run), (4, 2));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // The run is finished: resuming it again has nothing to do, and says so.
    let e = train_err(&TrainConfig {
        resume: true,
        steps: Some(4),
        ..cfg.clone()
    });
    assert!(e.contains("nothing to resume") && e.contains("step 4"), "{e}");
}

#[test]
fn template_given_with_an_adapter_that_has_its_own_is_refused_unless_forced() {
    let tmp = common::scratch("lost");
    let cfg = tiny(&tmp.path().join("force-template"));
    train::train(&cfg, &mut Quiet).unwrap();
    let model = common::load_model("smollm2-135m");
    let data = softprompt::data::read_jsonl(&common::data("facts-countries/capital/dev.jsonl")).unwrap();
    let opts = ScoreOptions {
        template: Some("[soft:4]Q: {text} {target}".into()),
        target_field: Some("target".into()),
        max_len: 64,
        ..ScoreOptions::default()
    };
    let e = session::open(&model, Some(&cfg.output), &opts, &[&data])
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a second template is refused");
    assert!(e.contains("its own template") && e.contains("--force-template"), "{e}");
    let forced = ScoreOptions {
        force_template: true,
        ..opts.clone()
    };
    let s = session::open(&model, Some(&cfg.output), &forced, &[&data]).unwrap();
    assert_eq!(s.task.template.source(), "[soft:4]Q: {text} {target}");
    // The same template as the adapter's is fine without forcing.
    let same = ScoreOptions {
        template: Some(cfg.template.clone()),
        ..opts
    };
    session::open(&model, Some(&cfg.output), &same, &[&data]).unwrap();
}

#[test]
fn scoring_no_rows_is_an_error() {
    let model = common::load_model("smollm2-135m");
    let template = Template::parse("{text} {target}")
        .unwrap()
        .with_target("target")
        .unwrap();
    let task = Task::new(
        TaskKind::Generate,
        template,
        vec!["Paris".into()],
        &BTreeMap::new(),
        &model.tokenizer,
        64,
    )
    .unwrap();
    let scorer = softprompt::infer::evaluate::Scorer::new(&model, &task, None, None).unwrap();
    let e = scorer.evaluate(&[], 4, false).unwrap_err();
    assert_eq!(e.to_string(), "no rows to score");
}

#[test]
fn a_long_prompt_read_in_chunks_completes_like_one_pass() {
    let model = common::load_model("smollm2-135m");
    let lm = model.backbone.causal().unwrap();
    let text = "The lighthouse keeper climbed the stairs and counted the steps. ".repeat(8);
    let ids = model.tokenizer.encode(&text, true).unwrap();
    let ids = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let embeds = model.backbone.embed(&ids).unwrap();
    let whole = softprompt::infer::generate::greedy(lm, &embeds, 4, &[]).unwrap();
    let mut seen = Vec::new();
    let chunked =
        softprompt::infer::generate::greedy_with_progress(lm, &embeds, 4, &[], 16, &mut |d, t| seen.push((d, t)))
            .unwrap();
    assert_eq!(whole, chunked);
    let t = ids.dim(1).unwrap();
    assert_eq!(seen.len(), t.div_ceil(16));
    assert_eq!(seen.last(), Some(&(t, t)));
}
