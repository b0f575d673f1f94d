//! `"adapters": [..]`: two prompt-tuning adapters composed give the tokens of the adapter whose
//! prompt is their concatenation, two prefixes those of the prefix that is theirs (both
//! adapters written by the test and served like any other); a multitask member takes the
//! request's task; a composition is built once and rebuilt when a member is loaded again; every
//! wrong list is a 4xx naming the problem.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::api::Params;
use super::tests::{copy_adapter, fixture, launch, model, post};
use super::*;
use softprompt::adapter::ADAPTER_WEIGHTS;
use softprompt::prompt::PROMPT_EMBEDDINGS;

/// Writes into `to` the adapter whose `prompt_embeddings` are the rows of the fixture adapters
/// `from`, in order (their first one's config, with the summed number of virtual tokens).
fn joined_adapter(to: &Path, from: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    let mut rows = Vec::new();
    for name in from {
        let tensors = softprompt::io::read_safetensors(&fixture(name).join(ADAPTER_WEIGHTS)).unwrap();
        rows.push(tensors[PROMPT_EMBEDDINGS].clone());
    }
    let joined = candle_core::Tensor::cat(&rows, 0).unwrap();
    let config_path = fixture(from[0]).join(ADAPTER_CONFIG);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
    config["num_virtual_tokens"] = json!(joined.dim(0).unwrap());
    std::fs::write(to.join(ADAPTER_CONFIG), config.to_string()).unwrap();
    softprompt::io::write_safetensors(
        &to.join(ADAPTER_WEIGHTS),
        &[(PROMPT_EMBEDDINGS.to_string(), joined)],
        None,
    )
    .unwrap();
}

/// A folder with two prompt-tuning adapters (`style`: 8 tokens, `facts`: 5), two prefixes
/// (`prefix_a`, `prefix_b`), a multitask adapter, and the joined adapters `style_facts` and
/// `prefix_ab`.
fn composition_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("softprompt-compose-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (name, folder) in [
        ("smollm2_generate_prompt_tuning", "style"),
        ("smollm2_prompt_tuning_random", "facts"),
        ("smollm2_generate_prefix_tuning", "prefix_a"),
        ("smollm2_prefix_tuning", "prefix_b"),
        ("smollm2_multitask_prompt_tuning", "multitask"),
    ] {
        copy_adapter(name, &dir.join(folder));
    }
    joined_adapter(
        &dir.join("style_facts"),
        &["smollm2_generate_prompt_tuning", "smollm2_prompt_tuning_random"],
    );
    joined_adapter(
        &dir.join("prefix_ab"),
        &["smollm2_generate_prefix_tuning", "smollm2_prefix_tuning"],
    );
    dir
}

fn options(dir: &Path) -> ServerOptions {
    ServerOptions {
        api_key: None,
        max_tokens_limit: 64,
        max_queue: 64,
        adapters_dir: Some(dir.to_path_buf()),
    }
}

/// The composition server's `/v1/completions` URL (started on first use).
fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let m = model();
        let dir = composition_dir();
        let adapters = load_adapters(&m, &dir).unwrap();
        format!("{}/v1/completions", launch(m, "smollm2", adapters, options(&dir)))
    })
}

/// `(status, body)` of a greedy completion of 12 tokens with log-probabilities.
fn complete(extra: Value) -> (u16, Value) {
    let mut body = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "logprobs": 1});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    post(url(), &body.to_string())
}

fn choices(extra: Value) -> Value {
    let (status, body) = complete(extra);
    assert_eq!(status, 200, "{body}");
    body["choices"].clone()
}

#[test]
fn two_prompts_compose_to_their_concatenation() {
    let joined = choices(json!({"model": "style_facts"}));
    assert_eq!(choices(json!({"adapters": ["style", "facts"]})), joined);
    assert_eq!(
        choices(json!({"model": "smollm2", "adapters": ["style", "facts"]})),
        joined
    );
    assert_ne!(
        choices(json!({"adapters": ["facts", "style"]})),
        joined,
        "the order matters"
    );
    let (_, body) = complete(json!({"adapters": ["style", "facts"]}));
    assert_eq!(body["model"], "style+facts");
    // a list of one is that adapter
    assert_eq!(
        choices(json!({"adapters": ["style"]})),
        choices(json!({"model": "style"}))
    );
}

#[test]
fn two_prefixes_compose_to_their_concatenation() {
    let joined = choices(json!({"model": "prefix_ab"}));
    assert_eq!(choices(json!({"adapters": ["prefix_a", "prefix_b"]})), joined);
    // a prefix and a prompt compose in either order
    for order in [["prefix_a", "style"], ["style", "prefix_a"]] {
        let (status, body) = complete(json!({"adapters": order}));
        assert_eq!(status, 200, "{order:?}: {body}");
    }
}

#[test]
fn a_multitask_member_takes_the_request_s_task() {
    for task in 0..2 {
        let (status, body) = complete(json!({"adapters": ["multitask", "style"], "task_id": task}));
        assert_eq!(status, 200, "{body}");
    }
    let a = choices(json!({"adapters": ["multitask", "style"], "task_id": 0}));
    let b = choices(json!({"adapters": ["multitask", "style"], "task_id": 2}));
    assert_ne!(a, b, "each task its own prompt");
}

#[test]
fn wrong_lists_are_refused_by_name() {
    let nine: Vec<&str> = vec!["style"; 9];
    for (extra, status, want) in [
        (json!({"adapters": []}), 400, "`adapters` is empty"),
        (
            json!({"adapters": ["style", "nope"]}),
            404,
            "the adapter `nope` named in `adapters` does not exist",
        ),
        (
            json!({"model": "style", "adapters": ["facts"]}),
            400,
            "`model` names `style` and `adapters` lists adapters",
        ),
        (
            json!({"adapters": ["smollm2", "style"]}),
            400,
            "names the base model `smollm2`",
        ),
        (json!({"adapters": nine}), 400, "at most 8 compose"),
        (
            json!({"adapters": ["multitask", "style"]}),
            400,
            "`multitask`: a multitask adapter: give `task_id`",
        ),
        (
            json!({"adapters": ["style", "facts"], "task_id": 0}),
            400,
            "none of `adapters` is a multitask adapter",
        ),
        (json!({"adapters": "style"}), 400, "field `adapters`"),
    ] {
        let (got, body) = complete(extra.clone());
        assert_eq!(got, status, "{extra}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{extra}: `{message}` lacks `{want}`");
    }
}

#[test]
fn chat_completions_compose_too() {
    let chat = url().replace("/v1/completions", "/v1/chat/completions");
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "adapters": ["style", "prefix_a"]});
    let (status, got) = post(&chat, &body.to_string());
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["model"], "style+prefix_a");
}

/// A DePT adapter's update goes to the tokens right after its own prompt: it composes only
/// last, and the composition keeps its update.
#[test]
fn a_dept_member_composes_only_last() {
    use softprompt::infer::compose::compose;
    use softprompt::infer::prompt_cache::PromptCache;
    let m = model();
    let lm = m.backbone.causal().unwrap();
    let prompt =
        |rows| candle_core::Tensor::zeros((rows, 576), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let plain = PromptCache::from_prompt(lm, &prompt(2)).unwrap();
    let mut dept = PromptCache::from_prompt(lm, &prompt(3)).unwrap();
    dept.input_update = Some(prompt(4));
    let err = compose(lm, &[("dept", &dept), ("plain", &plain)]).err().unwrap();
    assert!(format!("{err}").contains("`dept` is a DePT adapter"), "{err}");
    let last = compose(lm, &[("plain", &plain), ("dept", &dept)]).unwrap();
    assert_eq!(last.len(), 5);
    assert!(last.input_update.is_some());
    assert!(compose(lm, &[]).is_err());
}

/// A composition is built once and reused; loading a member again makes the next request
/// build it anew from the new member (replacing the stale entry).
#[test]
fn a_composition_is_kept_until_a_member_changes() {
    let m = model();
    let dir = composition_dir();
    let adapters: BTreeMap<String, Served> = load_adapters(&m, &dir).unwrap();
    let s = Arc::new(state(m.clone(), "smollm2".into(), adapters, options(&dir)).unwrap());
    let params = Params {
        model: None,
        max_tokens: 1,
        sampling: Default::default(),
        stop: vec![],
        stream: false,
        logprobs: false,
        task_id: None,
        adapters: Some(vec!["style".into(), "facts".into()]),
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ask = || rt.block_on(compose::request_prompt(&s, &params)).unwrap().1;
    let first = ask();
    assert!(Arc::ptr_eq(&first, &ask()), "built once");
    assert_eq!(s.compositions.len(), 1);
    let reloaded = load_adapter(&m, &dir, "style").unwrap();
    s.adapters.write().unwrap().insert("style".into(), reloaded);
    let second = ask();
    assert!(!Arc::ptr_eq(&first, &second), "rebuilt after `style` was loaded again");
    assert_eq!(s.compositions.len(), 1);
    assert_eq!(second.len(), 13);
}
