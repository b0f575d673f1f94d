//! Batched evaluation that computes a prepended soft prompt once and shares its keys/values
//! with every row gives the same label scores as scoring each row on its own.

mod common;
use candle_core::{Device, Tensor};
use softprompt::batch::{make_batch, splice_embeddings};
use softprompt::data::read_jsonl;
use softprompt::infer::evaluate::Scorer;
use softprompt::infer::score::score_candidates;
use softprompt::task::{Task, TaskKind};
use softprompt::template::Template;
use std::collections::BTreeMap;

#[test]
fn shared_prompt_cache_gives_the_same_scores_as_separate_rows() {
    let model = common::load_model("smollm2-135m");
    let bb = model.backbone.causal().unwrap();
    let mut data = read_jsonl(&common::data("sentiment-movies/test.jsonl")).unwrap();
    data.records.truncate(6);
    let template = Template::parse("[soft:5]Review: {text}\\nSentiment: {label}")
        .unwrap()
        .with_target("label")
        .unwrap();
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let task = Task::new(
        TaskKind::Classify,
        template,
        labels,
        &BTreeMap::new(),
        &model.tokenizer,
        256,
    )
    .unwrap();
    let examples = task.encode_set(&data, &model.tokenizer).unwrap().examples;
    let prompt = (Tensor::randn(0f32, 1.0, (5, 576), &Device::Cpu).unwrap() * 0.05).unwrap();
    let scorer = Scorer::new(&model, &task, Some(&prompt), None).unwrap();
    let batched = scorer.evaluate(&examples, 6, false).unwrap();
    let candidates = task.candidate_ids(&model.tokenizer, " ").unwrap();
    let mut worst = 0f32;
    for (e, p) in examples.iter().zip(&batched.predictions) {
        let batch = make_batch(&[e], false, &Device::Cpu).unwrap();
        let embeds = splice_embeddings(bb, &batch, Some(&prompt)).unwrap();
        let alone = score_candidates(bb, &embeds, &candidates).unwrap();
        for (a, b) in alone.iter().zip(&p.scores) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("max-abs score difference: {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
}
