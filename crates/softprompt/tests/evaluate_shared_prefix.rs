//! Evaluation that computes the positions every row shares (a prepended soft prompt and the
//! template's text before the review) once and hands their keys/values to every batch gives the
//! same label scores as scoring each row on its own: one-token labels (batched) and multi-token
//! label words (row by row after the shared cache), in one batch or several.

mod common;
use candle_core::{Device, Tensor};
use softprompt::batch::{make_batch, splice_embeddings};
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::score::score_all_candidates_after;
use softprompt::task::{Task, TaskKind};
use softprompt::template::Template;
use std::collections::BTreeMap;

#[test]
fn shared_prompt_cache_gives_the_same_scores_as_separate_rows() {
    // One batch of six, then three batches of two sharing one cache.
    assert_scores_match_separate_rows(6, &BTreeMap::new());
    assert_scores_match_separate_rows(2, &BTreeMap::new());
}

#[test]
fn multi_token_labels_after_the_shared_cache_score_as_separate_rows() {
    let words = BTreeMap::from([
        ("negative".to_string(), "very bad".to_string()),
        ("positive".to_string(), "quite good".to_string()),
    ]);
    assert_scores_match_separate_rows(4, &words);
}

/// Scores six test rows with `Scorer` (batches of `batch`, label words `verbalizer`) and each
/// row alone with `score_candidates` on its full prompt; the two agree to 1e-3.
fn assert_scores_match_separate_rows(batch: usize, verbalizer: &BTreeMap<String, String>) {
    let model = common::load_model("smollm2-135m");
    let bb = model.backbone.causal().unwrap();
    let mut data = read_jsonl(&common::data("sentiment-movies/test.jsonl")).unwrap();
    data.records.truncate(6);
    let template = Template::parse("[soft:5]Review: {text}\\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let task = Task::new(TaskKind::Classify, template, labels, verbalizer, &model.tokenizer, 256).unwrap();
    let examples = task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let prompt = (Tensor::randn(0f32, 1.0, (5, 576), &Device::Cpu).unwrap() * 0.05).unwrap();
    let scorer = Scorer::new(&model, &task, Some(&prompt), None).unwrap().exhaustive();
    let batched = scorer.evaluate(&examples, batch, false).unwrap();
    let candidates = task.candidate_ids(&model.tokenizer, " ").unwrap();
    assert_eq!(candidates.iter().any(|c| c.len() > 1), !verbalizer.is_empty());
    let mut worst = 0f32;
    for (e, p) in examples.iter().zip(&batched.predictions) {
        let batch = make_batch(&[e], false, &Device::Cpu).unwrap();
        let embeds = splice_embeddings(bb, &batch, Some(&prompt)).unwrap();
        let alone = score_all_candidates_after(bb, None, &embeds, &candidates).unwrap();
        for (a, b) in alone.iter().zip(&p.scores) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("max-abs score difference: {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
}
