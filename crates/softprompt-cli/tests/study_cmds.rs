//! `eval --templates` and `inspect` from the command line: refusals in the user's terms, and
//! the real model on a few rows.

use std::path::Path;
use std::process::Command;

/// Runs the binary from the repository root: (exit status, stdout, stderr).
fn softprompt(args: &[&str]) -> (i32, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("the softprompt binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh folder for one test, removed with what it holds when the guard is dropped.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("softprompt-study-{name}-"))
        .tempdir()
        .expect("a temporary folder")
}

const DATA: &str = "data/facts-countries/capital/test.jsonl";

#[test]
fn a_bad_template_is_an_error_naming_file_and_line() {
    let tmp = scratch("bad");
    let dir = tmp.path();
    let file = dir.join("t.txt");
    std::fs::write(
        &file,
        "# comment\nThe capital of {subject} is {target}\n\nbroken {subject\n",
    )
    .unwrap();
    let file = file.to_string_lossy().into_owned();
    let (code, _, err) = softprompt(&["eval", "smollm2-135m", "--data", DATA, "--templates", &file]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("t.txt:4") && err.contains("unclosed"), "{err}");
    let (code, _, err) = softprompt(&[
        "eval",
        "smollm2-135m",
        "--data",
        DATA,
        "--templates",
        &file,
        "--adapter",
        "fixtures/peft/smollm2_prompt_tuning_text",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--templates") && err.contains("--adapter"), "{err}");
}

#[test]
fn the_capital_templates_run_zero_shot_as_json() {
    let (code, out, err) = softprompt(&[
        "eval",
        "smollm2-135m",
        "--data",
        DATA,
        "--target-field",
        "target",
        "--task",
        "generate",
        "--templates",
        "examples/capital-templates.txt",
        "--json",
        "--rows",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    let templates = v["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 10);
    assert!(templates
        .iter()
        .all(|t| t["n"] == 2 && t["template"].as_str().unwrap().contains("{subject}")));
    let accs: Vec<f64> = templates.iter().map(|t| t["accuracy"].as_f64().unwrap()).collect();
    let min = accs.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(v["spread"]["min"].as_f64().unwrap(), min);
    assert!(v["spread"]["std"].as_f64().unwrap() >= 0.0);
}

#[test]
fn inspect_lists_nearest_tokens_and_refuses_key_value_prefixes() {
    let (code, out, err) = softprompt(&[
        "inspect",
        "fixtures/peft/smollm2_prompt_tuning_text",
        "--top",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[3]["nearest"][0]["token"], " capital");
    assert_eq!(lines[3]["nearest"].as_array().unwrap().len(), 2);
    let (code, out, err) = softprompt(&["inspect", "fixtures/peft/smollm2_prompt_tuning_text", "--top", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("token") && out.contains("\" city\""), "{out}");
    let (code, _, err) = softprompt(&["inspect", "fixtures/peft/smollm2_cartridge"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("CARTRIDGE") && err.contains("not input embeddings"),
        "{err}"
    );
    let (code, _, err) = softprompt(&["inspect", "fixtures/peft/smollm2_prompt_tuning_text", "--top", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--top 0"), "{err}");
}

#[test]
fn similar_ranks_sources_and_refuses_prompts_of_another_model() {
    let (code, out, err) = softprompt(&[
        "similar",
        "fixtures/peft/smollm2_prompt_tuning_text",
        "fixtures/peft/smollm2_p_tuning_mlp",
        "fixtures/adapters/sentiment-format1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let pairs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pairs.len(), 3);
    // Both text-initialised prompts start from the same sentence's tokens: alike; the p-tuning
    // encoder's output is not.
    let avg = |i: usize| pairs[i]["average_tokens"].as_f64().unwrap();
    assert!(avg(1) > 0.3 && avg(0).abs() < 0.1, "{out}");
    let (code, _, err) = softprompt(&[
        "similar",
        "fixtures/peft/smollm2_prompt_tuning_text",
        "fixtures/peft/minilm_seqcls_prompt_tuning",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("different widths (576 and 384)"), "{err}");
}

#[test]
fn info_names_the_features_that_apply() {
    let (code, out, err) = softprompt(&["info", "fixtures/transformers/qwen3"]);
    assert_eq!(code, 0, "{err}");
    for feature in [
        "architecture:   Llama (qwen3)",
        "head_dim 32 (queries 128 wide, hidden 64)",
        "per-head RMSNorm on queries and keys",
        "untied head",
    ] {
        assert!(out.contains(feature), "{feature} missing from:\n{out}");
    }
    let (code, out, err) = softprompt(&["info", "fixtures/transformers/llama_rope_llama3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rotary scaling llama3 (factor"), "{out}");
    let (code, out, err) = softprompt(&["info", "fixtures/transformers/gpt2/model.gguf"]);
    assert_eq!(code, 0, "{err}");
    for feature in [
        "architecture:   Gpt2 (gpt2)",
        "learned absolute positions (64 rows",
        "tied head (the token embedding table)",
        "composed candle ops",
    ] {
        assert!(out.contains(feature), "{feature} missing from:\n{out}");
    }
}
