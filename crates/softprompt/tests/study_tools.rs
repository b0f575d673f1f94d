//! The study tools on the real model: hand-written templates scored zero-shot with their
//! spread, and an adapter's virtual tokens read back as their nearest vocabulary tokens.

mod common;

use common::{data, fixture, load_model};
use softprompt::adapter::load_peft;
use softprompt::data::read_jsonl;
use softprompt::infer::options::ScoreOptions;
use softprompt::infer::templates::{evaluate_templates, parse_templates};
use softprompt::inspect::{inspect_adapter, resolve_base_model};
use softprompt::task::TaskKind;
use std::path::Path;

#[test]
fn templates_are_scored_one_by_one_with_their_spread() {
    let model = load_model("smollm2-135m");
    let mut set = read_jsonl(&data("facts-countries/capital/test.jsonl")).unwrap();
    set.records.truncate(4);
    let text =
        "# two good prompts and a bad one\nThe capital of {subject} is {target}\n\n{subject}. Capital: {target}\n";
    let templates = parse_templates(Path::new("capitals.txt"), text).unwrap();
    let opts = ScoreOptions {
        target_field: Some("target".into()),
        task: Some(TaskKind::Generate),
        batch: 4,
        ..Default::default()
    };
    let mut calls = vec![];
    let report = evaluate_templates(&model, &set, &templates, &opts, &mut |k, done| calls.push((k, done))).unwrap();
    assert_eq!(report.templates.len(), 2);
    assert_eq!((report.templates[0].line, report.templates[1].line), (2, 4));
    assert!(report
        .templates
        .iter()
        .all(|t| t.n == 4 && (0.0..=1.0).contains(&t.accuracy)));
    // Four rows, four candidate capitals: the plain statement finds most of them.
    assert!(report.templates[0].accuracy >= 0.5, "{:?}", report.templates[0]);
    let accs: Vec<f64> = report.templates.iter().map(|t| t.accuracy).collect();
    let s = report.spread;
    assert_eq!((s.min, s.max), (accs[0].min(accs[1]), accs[0].max(accs[1])));
    assert!((s.mean - (accs[0] + accs[1]) / 2.0).abs() < 1e-12);
    assert!((s.std - (accs[0] - accs[1]).abs() / 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(calls, vec![(0, 4), (1, 4)]);

    // A template naming a field the rows do not have: the error names the file and line.
    let bad = parse_templates(
        Path::new("capitals.txt"),
        "ok {subject} {target}\nThe capital of {country} is {target}\n",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        evaluate_templates(&model, &set, &bad, &opts, &mut |_, _| {}).unwrap_err()
    );
    assert!(e.contains("capitals.txt:2") && e.contains("country"), "{e}");
}

#[test]
fn a_text_initialised_prompt_is_nearest_to_its_init_text_tokens() {
    let adapter = load_peft(&fixture("smollm2_prompt_tuning_text")).unwrap();
    // base_model_name_or_path is the GGUF file's name: it resolves to the default model.
    resolve_base_model(&adapter).unwrap();
    let model = load_model("smollm2-135m");
    let tokens = inspect_adapter(&adapter, &model, 3).unwrap();
    assert_eq!(tokens.len(), 8);
    // PEFT's TEXT init: the init text's tokens, repeated to the prompt's length.
    let text = std::fs::read_to_string(fixture("smollm2_prompt_tuning_text").join("adapter_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let init = config["prompt_tuning_init_text"].as_str().unwrap();
    assert_eq!(init, "Answer with the capital city:");
    let ids = model.tokenizer.encode(init, false).unwrap();
    assert_eq!(ids.len(), 6);
    for t in &tokens {
        assert_eq!(t.nearest.len(), 3);
        assert_eq!(
            t.nearest[0].id,
            ids[t.index % ids.len()],
            "virtual token {}: {:?}",
            t.index,
            t.nearest
        );
        assert!(t.nearest[0].cosine > 0.8 && t.nearest[0].cosine >= t.nearest[1].cosine);
        assert!(t.norm > 1.0 && t.norm.is_finite());
    }
    assert_eq!(tokens[3].nearest[0].token, " capital");
}

#[test]
fn key_value_prefix_adapters_are_refused() {
    let model = load_model("smollm2-135m");
    for name in ["smollm2_prefix_tuning", "smollm2_cartridge"] {
        let adapter = load_peft(&fixture(name)).unwrap();
        let e = format!("{:#}", inspect_adapter(&adapter, &model, 3).unwrap_err());
        assert!(e.contains(name) && e.contains("not input embeddings"), "{e}");
    }
}
