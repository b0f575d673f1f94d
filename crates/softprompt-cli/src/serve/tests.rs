//! The server in-process on a loopback port, talked to over HTTP: the fixture adapters give
//! PEFT's greedy tokens, concurrent requests with different adapters each get their own answer,
//! streaming equals the whole answer, and bad requests get 4xx JSON errors without hurting
//! the server.

use super::*;
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;

pub(super) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// The default causal model, loaded once for all the server tests.
pub(super) fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(
                crate::args::load_with("smollm2-135m", softprompt::backbone::WeightStorage::F32)
                    .expect("run `softprompt fetch` before the tests"),
            )
        })
        .clone()
}

/// Copies the PEFT files of fixture adapter `name` into a new folder `to`.
pub(super) fn copy_adapter(name: &str, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [ADAPTER_CONFIG, softprompt::adapter::ADAPTER_WEIGHTS] {
        std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
    }
}

/// Writes `softprompt.json` for a classification task of `model` (`classify` or `seq-cls`,
/// target field `label`) into `dir`.
fn write_task_file(
    dir: &std::path::Path,
    (task, model): (softprompt::task::TaskKind, &str),
    template: &str,
    labels: &[&str],
    verbalizer: &[(&str, &str)],
) {
    use softprompt::adapter::run_files::{AdapterTask, TASK_FORMAT_VERSION};
    let tf = AdapterTask {
        format_version: TASK_FORMAT_VERSION,
        critical: vec![],
        template: template.into(),
        target_field: "label".into(),
        task,
        labels: labels.iter().map(|l| l.to_string()).collect(),
        task_labels: vec![],
        verbalizer: verbalizer.iter().map(|(l, w)| (l.to_string(), w.to_string())).collect(),
        method: softprompt::prompt::Method::PromptTuning,
        num_virtual_tokens: softprompt::template::Template::parse(template)
            .unwrap()
            .num_virtual_tokens(),
        model: model.into(),
        training: serde_json::Value::Null,
        warnings: vec![],
    };
    tf.write(dir).unwrap();
}

/// The prompt-tuning fixture (8 virtual tokens) with a classification task: one input field and
/// one-token label words (`sentiment`), two fields and multi-token words (`nli`).
fn add_classifiers(dir: &std::path::Path) {
    for (name, template, labels, verbalizer) in [
        (
            "sentiment",
            "[soft:8]Review: {text}\nSentiment: {label}",
            &["negative", "positive"][..],
            &[][..],
        ),
        (
            "nli",
            "[soft:8]Premise: {premise}\nHypothesis: {hypothesis}\nRelation: {label}",
            &["contradiction", "entailment", "neutral"][..],
            &[
                ("contradiction", "contradicts it"),
                ("entailment", "follows from it"),
                ("neutral", "unrelated"),
            ][..],
        ),
    ] {
        let to = dir.join(name);
        copy_adapter("smollm2_generate_prompt_tuning", &to);
        let task = (softprompt::task::TaskKind::Classify, "smollm2-135m");
        write_task_file(&to, task, template, labels, verbalizer);
    }
}

/// A fresh folder with the three generation fixture adapters (one of them multitask) and two
/// classification adapters.
fn adapters_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("softprompt-serve-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (name, folder) in [
        ("smollm2_generate_prompt_tuning", "prompt_tuning"),
        ("smollm2_generate_prefix_tuning", "prefix_tuning"),
        ("smollm2_multitask_prompt_tuning", "multitask"),
    ] {
        copy_adapter(name, &dir.join(folder));
    }
    std::fs::create_dir_all(dir.join("not-an-adapter")).unwrap();
    add_classifiers(&dir);
    dir
}

/// Starts a server on 127.0.0.1:0 in a thread of its own; returns its base URL and adapters
/// folder.
fn start_in(api_key: Option<String>, max_queue: usize) -> (String, PathBuf) {
    let m = model();
    let dir = adapters_dir();
    let adapters = load_adapters(&m, &dir).unwrap();
    assert_eq!(
        adapters.keys().collect::<Vec<_>>(),
        ["multitask", "nli", "prefix_tuning", "prompt_tuning", "sentiment"]
    );
    let url = launch(
        m,
        "smollm2",
        adapters,
        ServerOptions {
            api_key,
            max_tokens_limit: 64,
            max_queue,
            adapters_dir: Some(dir.clone()),
        },
    );
    (url, dir)
}

/// Serves `adapters` on `model` from 127.0.0.1:0 in a thread of its own; returns the base URL.
pub(super) fn launch(
    model: Arc<LoadedModel>,
    base: &str,
    adapters: BTreeMap<String, Served>,
    opts: ServerOptions,
) -> String {
    let st = state(model, base.into(), adapters, opts).unwrap();
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

fn start(api_key: Option<String>, max_queue: usize) -> String {
    start_in(api_key, max_queue).0
}

/// The server shared by the tests and its adapters folder (started on first use).
pub(super) fn shared() -> &'static (String, PathBuf) {
    static SERVER: OnceLock<(String, PathBuf)> = OnceLock::new();
    SERVER.get_or_init(|| start_in(None, 64))
}

/// The address of the server shared by the tests (started on first use).
pub(super) fn server() -> &'static str {
    &shared().0
}

/// `(status, JSON body)` of a POST.
pub(super) fn post(url: &str, body: &str) -> (u16, Value) {
    post_with(url, body, None)
}

fn post_with(url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    post_authorized(url, body, key.map(|k| format!("Bearer {k}")).as_deref())
}

/// `(status, JSON body)` of a POST with `authorization` as its `Authorization` header.
fn post_authorized(url: &str, body: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(url).set("Content-Type", "application/json");
    if let Some(a) = authorization {
        req = req.set("Authorization", a);
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
pub(super) fn case(adapter: &str, i: usize) -> (String, Vec<u32>) {
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
    // (another test may load an adapter of its own meanwhile)
    assert_eq!(ids[0], "smollm2");
    assert!(
        ids.contains(&"prefix_tuning") && ids.contains(&"prompt_tuning"),
        "{ids:?}"
    );
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
        (r"[1, 2]", 400),
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
    // the route takes bodies large enough for `prompt_embeds`, and no larger
    let huge = json!({"prompt_embeds": "x".repeat(routes::COMPLETIONS_BODY_LIMIT + 10)}).to_string();
    assert_eq!(post(&url, &huge).0, 413);
    let large = json!({"prompt_embeds": "A".repeat(2 * routes::BODY_LIMIT)}).to_string();
    let (status, err) = post(&url, &large);
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_prompt_embeds")),
        "{err}"
    );
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
    let base = start(Some("sekrit".into()), 64);
    let url = format!("{base}/v1/completions");
    let body = r#"{"prompt": "Hi", "max_tokens": 1}"#;
    assert_eq!(post(&url, body).0, 401);
    assert_eq!(post_with(&url, body, Some("wrong")).0, 401);
    assert_eq!(post_with(&url, body, Some("sekrit")).0, 200);
    assert_eq!(get(&format!("{base}/health")).0, 200);
    // the scheme's case does not matter (RFC 7235), nor the spaces after it; the key's does
    for ok in ["bearer sekrit", "BEARER sekrit", "Bearer   sekrit"] {
        assert_eq!(post_authorized(&url, body, Some(ok)).0, 200, "{ok}");
    }
    let (_, refused) = post_with(&url, body, Some("wrong"));
    for bad in ["bearer wrong", "BEARER SEKRIT", "Basic sekrit", "sekrit", "Bearer"] {
        let (status, err) = post_authorized(&url, body, Some(bad));
        assert_eq!(status, 401, "{bad}");
        assert_eq!(err, refused, "{bad}");
    }
}

/// One malformed body per POST route over HTTP: a 400 naming the field at fault, and the
/// server keeps serving.
#[test]
fn type_errors_name_the_field_over_http() {
    let base = server();
    let cases = [
        (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": "ten"}"#,
            "field `max_tokens`: invalid type: string \"ten\", expected u64",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [1]}]}"#,
            "field `messages[1].content`: invalid type: sequence, expected a string",
        ),
        ("/v1/classify", r#"{"model": 7, "input": "x"}"#, "field `model`"),
        ("/v1/adapters", r#"{"name": {"a": 1}}"#, "field `name`"),
    ];
    for (route, body, want) in cases {
        let (status, err) = post(&format!("{base}{route}"), body);
        assert_eq!(status, 400, "{route} {body}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{route} {body}: `{message}` lacks `{want}`");
    }
    let (status, body) = post(
        &format!("{base}/v1/completions"),
        r#"{"prompt": "Hello", "max_tokens": 1, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");
}

/// Writes NaN into the first value of `dir`'s `prompt_embeddings`.
fn poison(dir: &std::path::Path) {
    use candle_core::{Device, Tensor};
    let path = dir.join(softprompt::adapter::ADAPTER_WEIGHTS);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let pe = &tensors["prompt_embeddings"];
    let mut values = pe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[0] = f32::NAN;
    let poisoned = Tensor::from_vec(values, pe.dims(), &Device::Cpu).unwrap();
    tensors.insert("prompt_embeddings".into(), poisoned);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// An adapter holding NaN is refused, naming the tensor, both when loaded at run time (400,
/// and the server keeps its other adapters) and at start-up.
#[test]
fn an_adapter_holding_nan_is_refused() {
    let (base, dir) = shared();
    let broken = dir.join("diverged");
    copy_adapter("smollm2_generate_prompt_tuning", &broken);
    poison(&broken);
    let (status, err) = post(&format!("{base}/v1/adapters"), r#"{"name": "diverged"}"#);
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "adapter_not_loaded");
    let message = err["error"]["message"].as_str().unwrap();
    for needle in [
        "adapter `diverged`",
        "tensor `prompt_embeddings` holds NaN",
        "did its training diverge",
    ] {
        assert!(message.contains(needle), "`{message}` lacks `{needle}`");
    }
    let (_, models) = get(&format!("{base}/v1/models"));
    assert!(!models.to_string().contains("diverged"), "{models}");
    // at start-up: `serve` stops with the same reason
    let alone = tempfile::tempdir().unwrap();
    copy_adapter("smollm2_generate_prompt_tuning", &alone.path().join("diverged"));
    poison(&alone.path().join("diverged"));
    let err = format!("{:#}", load_adapters(&model(), alone.path()).err().expect("refused"));
    for needle in ["adapter `diverged`", "tensor `prompt_embeddings` holds NaN"] {
        assert!(err.contains(needle), "`{err}` lacks `{needle}`");
    }
}

#[test]
fn playground_and_metrics() {
    let resp = ureq::get(&format!("{}/", server())).call().unwrap();
    assert!(resp.content_type().starts_with("text/html"));
    assert!(resp.into_string().unwrap().contains("softprompt playground"));
    let (status, _) = post(
        &format!("{}/v1/completions", server()),
        r#"{"prompt": "Hi", "max_tokens": 1}"#,
    );
    assert_eq!(status, 200);
    let text = ureq::get(&format!("{}/metrics", server()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for needle in [
        "softprompt_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "softprompt_queue_depth",
        "softprompt_generation_seconds_count",
        "softprompt_tokens_per_second",
        "softprompt_http_seconds_bucket{route=\"/v1/completions\",le=\"+Inf\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[test]
fn adapters_load_and_unload_at_run_time() {
    let (base, dir) = shared();
    let late = dir.join("late");
    copy_adapter("smollm2_generate_prompt_tuning", &late);
    let url = format!("{base}/v1/completions");
    let body = r#"{"model": "late", "prompt": "The capital of Italy is", "max_tokens": 12, "temperature": 0}"#;
    assert_eq!(post(&url, body).0, 404);
    for bad in ["../late", "", ".hidden", "a/b", "missing", "not-an-adapter"] {
        let (status, err) = post(&format!("{base}/v1/adapters"), &json!({"name": bad}).to_string());
        assert_eq!(status, 400, "{bad}: {err}");
    }
    let (status, _) = post(&format!("{base}/v1/adapters"), r#"{"name": "late"}"#);
    assert_eq!(status, 200);
    let (status, out) = post(&url, body);
    assert_eq!(status, 200, "{out}");
    let (_, want) = case("smollm2_generate_prompt_tuning", 0);
    assert_eq!(
        out["choices"][0]["text"],
        model().tokenizer.decode(&want, true).unwrap()
    );
    let resp = ureq::delete(&format!("{base}/v1/adapters/late")).call().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(post(&url, body).0, 404);
    match ureq::delete(&format!("{base}/v1/adapters/late")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("{:?}", other.map(|r| r.status())),
    }
}

/// A full queue answers 503 with Retry-After; a client that goes away cancels its sequence
/// and frees its place.
#[test]
fn full_queue_and_disconnects() {
    let base = start(None, 1);
    let url = format!("{base}/v1/completions");
    let resp = ureq::post(&url)
        .set("Content-Type", "application/json")
        .send_string(r#"{"prompt": "Once upon a time", "max_tokens": 64, "stream": true}"#)
        .unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let full = ureq::post(&url)
        .set("Content-Type", "application/json")
        .send_string(r#"{"prompt": "Hi", "max_tokens": 1}"#);
    match full {
        Err(ureq::Error::Status(503, r)) => {
            assert_eq!(r.header("retry-after"), Some("1"));
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "queue_full");
        }
        other => panic!("expected 503, got {:?}", other.map(|r| r.status())),
    }
    drop(reader); // the client goes away
    let t0 = std::time::Instant::now();
    loop {
        let (_, h) = get(&format!("{base}/health"));
        if h["in_flight"] == 0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "the dropped sequence was not cancelled");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(post(&url, r#"{"prompt": "Hi", "max_tokens": 1}"#).0, 200);
}

/// Load and fault test (loopback, bounded): clients over several adapters with malformed
/// requests mixed in; every valid request gets a complete answer equal to its answer alone.
/// Prints throughput and p50/p99 latency at 1, 4 and 16 clients and the resident set; memory
/// after a second 16-client burst stays within a margin of the first's.
#[test]
fn load_and_faults() {
    let base = server().to_string();
    let url = format!("{base}/v1/completions");
    let jobs: Vec<(&str, &str)> = vec![
        ("smollm2", "The capital of Italy is"),
        ("prompt_tuning", "Once upon a time"),
        ("prefix_tuning", "def fibonacci(n):"),
        ("prompt_tuning", "Water boils at"),
    ];
    let body = |(m, p): (&str, &str)| json!({"model": m, "prompt": p, "max_tokens": 8, "temperature": 0}).to_string();
    let alone: Vec<String> = jobs
        .iter()
        .map(|&j| {
            let (status, v) = post(&url, &body(j));
            assert_eq!(status, 200);
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    // One burst: `clients` threads, two valid requests each with malformed ones between;
    // returns a report line.
    let burst = |clients: usize| {
        let t0 = std::time::Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (url, jobs, alone) = (url.clone(), jobs.clone(), alone.clone());
                std::thread::spawn(move || {
                    let mut lat = Vec::new();
                    let mut tokens = 0u64;
                    for r in 0..2 {
                        if (c + r) % 4 == 3 {
                            // malformed requests between the valid ones
                            let (status, _) = post(&url, r#"{"prompt": "x", "max_tokens": -1}"#);
                            assert_eq!(status, 400);
                            let (status, _) = post(&url, r#"{"model": "ghost", "prompt": "x"}"#);
                            assert_eq!(status, 404);
                        }
                        let k = (c + r) % jobs.len();
                        let t = std::time::Instant::now();
                        let (status, v) = post(&url, &body(jobs[k]));
                        lat.push(t.elapsed().as_secs_f64());
                        assert_eq!(status, 200, "{v}");
                        assert_eq!(v["choices"][0]["text"], alone[k], "client {c} request {r}");
                        tokens += v["usage"]["completion_tokens"].as_u64().unwrap();
                    }
                    (lat, tokens)
                })
            })
            .collect();
        let mut lat = Vec::new();
        let mut tokens = 0;
        for h in handles {
            let (l, t) = h.join().unwrap();
            lat.extend(l);
            tokens += t;
        }
        let wall = t0.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        format!(
            "{clients:>2} clients: {} requests, {tokens} tokens in {wall:.2} s = {:.1} tokens/s; latency p50 {:.2} s, p99 {:.2} s",
            lat.len(),
            tokens as f64 / wall,
            pct(0.5),
            pct(0.99)
        )
    };
    let mut report: Vec<String> = [1usize, 4, 16].into_iter().map(burst).collect();
    // Memory stays bounded: another 16-client burst after the first leaves the resident set
    // where it was, within a generous margin (allocator slack, other tests in this process).
    let rss = || crate::memory::memory_mib().expect("/proc/self/status").0;
    let after_first = rss();
    report.push(burst(16));
    let after_second = rss();
    let peak = crate::memory::memory_mib().unwrap().1;
    report.push(format!(
        "resident set after a 16-client burst {after_first:.0} MiB, after another {after_second:.0} MiB; peak {peak:.0} MiB"
    ));
    assert!(
        after_second < after_first + 256.0,
        "memory grew from {after_first:.0} MiB to {after_second:.0} MiB across two identical bursts"
    );
    eprintln!("{}", report.join("\n"));
    let (_, h) = get(&format!("{base}/health"));
    assert_eq!(h["status"], "ok");
}

/// The library's own scores for `rows` of a classification adapter: `Scorer::evaluate` (the
/// `eval`/`predict` path) on a data set whose rows carry the first label as gold.
fn library_scores(name: &str, rows: &[Value]) -> Vec<(String, Vec<f32>)> {
    use softprompt::infer::{evaluate::Scorer, session};
    let m = model();
    let dir = shared().1.join(name);
    let s = session::open(&m, Some(&dir), &Default::default(), &[]).unwrap();
    let text: String = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["label"] = json!(s.task.labels[0]);
            format!("{r}\n")
        })
        .collect();
    let data = softprompt::data::DataSet::parse("rows.jsonl", &text).unwrap();
    let examples = s.task.encode_set(&data, &m.tokenizer).unwrap().examples;
    let scorer = Scorer::new(&m, &s.task, s.prompt.as_ref(), s.head.as_ref()).unwrap();
    let r = scorer.evaluate(&examples, 4, false).unwrap();
    r.predictions.into_iter().map(|p| (p.predicted, p.scores)).collect()
}

fn probabilities(result: &Value, labels: &[&str]) -> Vec<f32> {
    labels
        .iter()
        .map(|l| result["probabilities"][l].as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn classify_gives_the_library_labels_and_probabilities() {
    let url = format!("{}/v1/classify", server());
    let texts = [
        "a gentle, funny film that stays with you",
        "dull, long and badly acted",
        "I walked out after twenty minutes",
    ];
    let (status, body) = post(&url, &json!({"model": "sentiment", "input": texts}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["labels"], json!(["negative", "positive"]));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let rows: Vec<Value> = texts.iter().map(|t| json!({"text": t})).collect();
    for (i, (got, (label, scores))) in data.iter().zip(library_scores("sentiment", &rows)).enumerate() {
        assert_eq!(got["index"], i);
        assert_eq!(got["label"], label.as_str());
        let p = probabilities(got, &["negative", "positive"]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{got}");
        // one-token label words: softmax of the label words' log-probabilities
        let want = 1.0 / (1.0 + (scores[0] - scores[1]).exp());
        assert!((p[1] - want).abs() < 1e-4, "{got} vs {scores:?}");
    }
    // one text alone gives the same answer as in the list
    let (status, one) = post(&url, &json!({"model": "sentiment", "input": texts[1]}).to_string());
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["data"][0]["label"], data[1]["label"]);
    let (a, b) = (
        probabilities(&one["data"][0], &["positive"])[0],
        probabilities(&data[1], &["positive"])[0],
    );
    assert!((a - b).abs() < 1e-4);

    // several fields, multi-token label words (scored in full)
    let rows = vec![
        json!({"premise": "A man is playing a guitar on stage.", "hypothesis": "A man is performing music."}),
        json!({"premise": "The cat sleeps.", "hypothesis": "The cat is running a marathon."}),
    ];
    let (status, body) = post(&url, &json!({"model": "nli", "input": rows}).to_string());
    assert_eq!(status, 200, "{body}");
    let labels = ["contradiction", "entailment", "neutral"];
    for (got, (label, _)) in body["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(library_scores("nli", &rows))
    {
        assert_eq!(got["label"], label.as_str(), "{got}");
        let p = probabilities(got, &labels);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{got}");
        let best = labels.iter().position(|l| *l == label).unwrap();
        assert!(p.iter().all(|&x| x <= p[best]), "{got}");
    }
}

#[test]
fn classify_errors_are_json_4xx() {
    let url = format!("{}/v1/classify", server());
    let too_many: Vec<String> = (0..33).map(|i| format!("text {i}")).collect();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"model": "prompt_tuning", "input": "hi"}), 400, "has no labels"),
        (json!({"model": "smollm2", "input": "hi"}), 400, "base model"),
        (json!({"model": "ghost", "input": "hi"}), 404, "does not exist"),
        (json!({"model": "sentiment", "input": too_many}), 400, "at most 32"),
        (json!({"model": "sentiment", "input": []}), 400, "empty list"),
        (json!({"model": "sentiment", "input": 5}), 400, "input[0] is 5"),
        (json!({"model": "sentiment"}), 400, "missing field `input`"),
        (json!({"input": "hi"}), 400, "missing field `model`"),
        (
            json!({"model": "sentiment", "input": [{"review": "x"}]}),
            400,
            "input[0]: no field `text`",
        ),
        (
            json!({"model": "nli", "input": "just a text"}),
            400,
            "`premise`, `hypothesis`",
        ),
        (
            json!({"model": "nli", "input": [{"premise": "p", "hypothesis": "h"}, {"premise": "p"}]}),
            400,
            "input[1]: no field `hypothesis`",
        ),
    ];
    for (body, want, needle) in cases {
        let (status, err) = post(&url, &body.to_string());
        assert_eq!(status, want, "{body}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_else(|| panic!("{err}"));
        assert!(message.contains(needle), "{body}: `{message}` lacks `{needle}`");
    }
    let (status, body) = post(&url, r#"{"model": "sentiment", "input": "fine"}"#);
    assert_eq!(status, 200, "{body}");
    // the models list says which adapters classify and what they need
    let (_, models) = get(&format!("{}/v1/models", server()));
    let nli = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "nli")
        .unwrap();
    assert_eq!(nli["labels"], json!(["contradiction", "entailment", "neutral"]));
    assert_eq!(nli["input_fields"], json!(["premise", "hypothesis"]));
}

/// MiniLM served with PEFT's seq-cls fixture adapter (plus its labels): `/v1/classify` gives the
/// library's own scores as probabilities, the generation routes answer 400, a generation
/// adapter is refused at load, and the models list says nothing generates.
#[test]
fn an_encoder_serves_its_seq_cls_adapters() {
    let m = Arc::new(
        crate::args::load_with("minilm-l6", softprompt::backbone::WeightStorage::F32).expect("run `softprompt fetch`"),
    );
    let dir = std::env::temp_dir().join(format!("softprompt-serve-encoder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let to = dir.join("sentiment");
    copy_adapter("minilm_seqcls_prompt_tuning", &to);
    let task = (softprompt::task::TaskKind::SeqCls, "minilm-l6");
    write_task_file(&to, task, "[soft:6]{text}", &["negative", "positive"], &[]);

    // a generation adapter cannot be served by an encoder
    let bad = dir.join("generation");
    copy_adapter("minilm_seqcls_prompt_tuning", &bad);
    let err = format!(
        "{:#}",
        load_adapters(&m, &dir)
            .err()
            .expect("a generation adapter on an encoder")
    );
    assert!(err.contains("serves only classification adapters"), "{err}");
    std::fs::remove_dir_all(&bad).unwrap();

    let adapters = load_adapters(&m, &dir).unwrap();
    let opts = ServerOptions {
        api_key: None,
        max_tokens_limit: 64,
        max_queue: 8,
        adapters_dir: Some(dir.clone()),
    };
    let base = launch(m.clone(), "minilm", adapters, opts);

    let texts = ["a gentle, funny film that stays with you", "dull, long and badly acted"];
    let (status, body) = post(
        &format!("{base}/v1/classify"),
        &json!({"model": "sentiment", "input": texts}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    // the library's scores of the same rows: the head's logits, softmaxed
    let session = softprompt::infer::session::open(&m, Some(&to), &Default::default(), &[]).unwrap();
    let data_text: String = texts
        .iter()
        .map(|t| format!("{}\n", json!({"text": t, "label": "negative"})))
        .collect();
    let data = softprompt::data::DataSet::parse("rows.jsonl", &data_text).unwrap();
    let examples = session.task.encode_set(&data, &m.tokenizer).unwrap().examples;
    let scorer =
        softprompt::infer::evaluate::Scorer::new(&m, &session.task, session.prompt.as_ref(), session.head.as_ref())
            .unwrap();
    let want = scorer.evaluate(&examples, 4, false).unwrap().predictions;
    for (got, want) in body["data"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(got["label"], want.predicted.as_str(), "{got}");
        let p = probabilities(got, &["negative", "positive"]);
        let logit_gap = want.scores[0] - want.scores[1];
        assert!(
            (p[1] - 1.0 / (1.0 + logit_gap.exp())).abs() < 1e-5,
            "{got} vs {:?}",
            want.scores
        );
    }

    for (route, body) in [
        ("completions", json!({"model": "sentiment", "prompt": "hi"})),
        (
            "chat/completions",
            json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let (status, err) = post(&format!("{base}/v1/{route}"), &body.to_string());
        assert_eq!(status, 400, "{route}: {err}");
        assert_eq!(err["error"]["code"], "model_does_not_generate", "{route}: {err}");
    }
    let (_, models) = get(&format!("{base}/v1/models"));
    let models = models["data"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert!(models.iter().all(|m| m["generates"] == false), "{models:?}");
    assert_eq!(models[1]["labels"], json!(["negative", "positive"]));
    // the server still answers after the refusals
    let (status, _) = post(
        &format!("{base}/v1/classify"),
        &json!({"model": "sentiment", "input": "fine"}).to_string(),
    );
    assert_eq!(status, 200);
}

/// PEFT's multitask fixture (3 tasks) served: each `task_id` gets the library's greedy tokens
/// for that task's prompt, and a missing, out-of-range or misplaced task id is a 400.
#[test]
fn a_multitask_adapter_serves_each_task() {
    use softprompt::infer::engine::{generate, GenRequest};
    let m = model();
    let base = server();
    let url = format!("{base}/v1/completions");
    let text = "The capital of Italy is";
    let lm = m.backbone.causal().unwrap();
    let peft = softprompt::adapter::load_peft(&shared().1.join("multitask")).unwrap();
    for task in 0..3 {
        let req = GenRequest {
            ids: m.tokenizer.encode(text, true).unwrap(),
            prompt: Arc::new(PromptCache::from_adapter_task(lm, &peft, Some(task)).unwrap()),
            max_tokens: 8,
            sampling: Default::default(),
            stop: vec![],
            stop_ids: m.tokenizer.eos_id().into_iter().collect(),
        };
        let want = generate(lm, &m.tokenizer, req, |_| Ok(())).unwrap();
        let body = json!({"model": "multitask", "prompt": text, "max_tokens": 8, "temperature": 0, "task_id": task});
        let (status, got) = post(&url, &body.to_string());
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["text"], want.text.as_str(), "task {task}");
    }
    for (body, needle) in [
        (json!({"model": "multitask", "prompt": text}), "give `task_id` (0 to 2)"),
        (
            json!({"model": "multitask", "prompt": text, "task_id": 3}),
            "out of range",
        ),
        (json!({"model": "smollm2", "prompt": text, "task_id": 0}), "base model"),
    ] {
        let (status, err) = post(&url, &body.to_string());
        assert_eq!(status, 400, "{body}: {err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: `{message}` lacks `{needle}`");
    }
    let (_, models) = get(&format!("{base}/v1/models"));
    let multitask = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "multitask");
    assert_eq!(multitask.unwrap()["tasks"], 3, "{models}");
}
