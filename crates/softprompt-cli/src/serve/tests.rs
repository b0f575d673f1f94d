//! The server in-process on a loopback port, talked to over HTTP: the fixture adapters give
//! PEFT's greedy tokens, concurrent requests with different adapters each get their own answer,
//! streaming equals the whole answer, and bad requests get 4xx JSON errors without hurting
//! the server.

use super::*;
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(crate::model_cmds::load("smollm2-135m").expect("run `softprompt fetch` before the tests"))
        })
        .clone()
}

/// A folder with the two generation fixture adapters.
fn adapters_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("softprompt-serve-{}", std::process::id()));
    for name in ["smollm2_generate_prompt_tuning", "smollm2_generate_prefix_tuning"] {
        let to = dir.join(name.trim_start_matches("smollm2_generate_"));
        std::fs::create_dir_all(&to).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("not-an-adapter")).unwrap();
    dir
}

/// Starts a server on 127.0.0.1:0 in a thread of its own; returns its base URL.
fn start(api_key: Option<String>) -> String {
    let m = model();
    let adapters = load_adapters(&m, &adapters_dir()).unwrap();
    assert_eq!(adapters.keys().collect::<Vec<_>>(), ["prefix_tuning", "prompt_tuning"]);
    let st = state(
        m,
        "smollm2".into(),
        adapters,
        ServerOptions {
            api_key,
            max_tokens_limit: 64,
        },
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_server(
            st,
            "127.0.0.1:0".parse().unwrap(),
            |a| tx.send(a).unwrap(),
            std::future::pending(),
        ))
        .unwrap();
    });
    format!("http://{}", rx.recv().unwrap())
}

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| start(None))
}

/// `(status, JSON body)` of a POST.
fn post(url: &str, body: &str) -> (u16, Value) {
    post_with(url, body, None)
}

fn post_with(url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn get(url: &str) -> (u16, Value) {
    let resp = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    (
        resp.status(),
        serde_json::from_str(&resp.into_string().unwrap()).unwrap(),
    )
}

use serde_json::{json, Value};

/// Fixture case: (prompt text, new_ids) of `adapter`'s first case.
fn case(adapter: &str, i: usize) -> (String, Vec<u32>) {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_generate_cases.json")).unwrap()).unwrap();
    let c = &cases["cases"][adapter][i];
    (
        c["prompt"].as_str().unwrap().to_string(),
        serde_json::from_value(c["new_ids"].clone()).unwrap(),
    )
}

fn completion_body(model: &str, prompt: &str, stream: bool) -> String {
    json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream, "logprobs": 1})
        .to_string()
}

#[test]
fn health_and_models() {
    let (status, body) = get(&format!("{}/health", server()));
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    let (status, body) = get(&format!("{}/v1/models", server()));
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "prefix_tuning", "prompt_tuning"]);
}

#[test]
fn concurrent_requests_with_different_adapters_get_peft_tokens() {
    let m = model();
    let jobs = [
        ("smollm2", "plain", 0),
        ("prompt_tuning", "smollm2_generate_prompt_tuning", 0),
        ("prefix_tuning", "smollm2_generate_prefix_tuning", 1),
        ("prompt_tuning", "smollm2_generate_prompt_tuning", 2),
    ];
    let handles: Vec<_> = jobs
        .iter()
        .map(|&(model, fixture_name, i)| {
            let url = format!("{}/v1/completions", server());
            std::thread::spawn(move || {
                let (prompt, want) = case(fixture_name, i);
                let (status, body) = post(&url, &completion_body(model, &prompt, false));
                (status, body, want)
            })
        })
        .collect();
    for (h, job) in handles.into_iter().zip(jobs) {
        let (status, body, want) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["text"], m.tokenizer.decode(&want, true).unwrap(), "{job:?}");
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 12);
        assert_eq!(choice["logprobs"]["token_logprobs"].as_array().unwrap().len(), 12);
        assert_eq!(body["model"], job.0);
    }
}

/// Reads an SSE response: the `data:` payloads.
fn sse(url: &str, body: &str) -> Vec<String> {
    let resp = ureq::post(url)
        .set("Content-Type", "application/json")
        .send_string(body)
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    BufReader::new(resp.into_reader())
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn streaming_equals_whole_answer() {
    let (prompt, want) = case("smollm2_generate_prefix_tuning", 0);
    let url = format!("{}/v1/completions", server());
    let data = sse(&url, &completion_body("prefix_tuning", &prompt, true));
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, model().tokenizer.decode(&want, true).unwrap());
    assert!(chunks.len() >= 12);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    // chat: streamed deltas equal the whole message
    let url = format!("{}/v1/chat/completions", server());
    let body = |stream: bool| {
        json!({"model": "prompt_tuning", "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 10, "temperature": 0, "stream": stream})
        .to_string()
    };
    let (status, whole) = post(&url, &body(false));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    let data = sse(&url, &body(true));
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let url = format!("{}/v1/completions", server());
    let cases: [(&str, u16); 9] = [
        (r#"{"model": "nope", "prompt": "hi"}"#, 404),
        (r#"{"model": "../prompt_tuning", "prompt": "hi"}"#, 404),
        (r#"{"prompt": "hi", "#, 400),
        (r#"[1, 2]"#, 400),
        (r#"{"model": "smollm2"}"#, 400),
        (r#"{"prompt": "hi", "temperature": -1}"#, 400),
        (r#"{"prompt": "hi", "max_tokens": 100000}"#, 400),
        (r#"{"prompt": "hi", "top_p": 0}"#, 400),
        (r#"{"prompt": "", "max_tokens": 2}"#, 400),
    ];
    for (body, want) in cases {
        let (status, err) = post(&url, body);
        assert_eq!(status, want, "{body}: {err}");
        assert!(err["error"]["message"].is_string(), "{body}: {err}");
    }
    let big = json!({"prompt": "x".repeat(routes::BODY_LIMIT + 10)}).to_string();
    assert_eq!(post(&url, &big).0, 413);
    let long = json!({"prompt": "hello ".repeat(9000), "max_tokens": 1}).to_string();
    let (status, err) = post(&url, &long);
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    assert_eq!(get(&format!("{}/v1/nothing", server())).0, 404);
    // still serving
    let (status, body) = post(&url, r#"{"prompt": "Hello", "max_tokens": 2, "temperature": 0}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

#[test]
fn api_key_is_required_when_set() {
    let base = start(Some("sekrit".into()));
    let url = format!("{base}/v1/completions");
    let body = r#"{"prompt": "Hi", "max_tokens": 1}"#;
    assert_eq!(post(&url, body).0, 401);
    assert_eq!(post_with(&url, body, Some("wrong")).0, 401);
    assert_eq!(post_with(&url, body, Some("sekrit")).0, 200);
    assert_eq!(get(&format!("{base}/health")).0, 200);
}
