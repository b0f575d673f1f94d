//! `prompt_embeds`: the fixtures torch wrote (`fixtures/prompt_embeds`, vLLM's encoding) decode
//! to the tensor they hold, in every dtype and layout; every broken one is a 400 naming the
//! problem; the same request with the embeddings of an adapter's prompt gives that adapter's
//! tokens, with or without text after them and after another adapter; crafted pickles and
//! archives give errors, never a panic.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;

use super::prompt_embeds::{decode, Expect, MAX_EMBEDS_BYTES};
use super::tests::{case, fixture, model, post, server};

const SMOLLM2: Expect = Expect {
    hidden: 576,
    max_tokens: 8191,
};

/// The base64 text of fixture `name` (`fixtures/prompt_embeds/NAME.b64`).
fn b64(name: &str) -> String {
    let path = fixture("../prompt_embeds").join(format!("{name}.b64"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The prompt of the PEFT fixture adapter the valid fixtures were made from, `[8, 576]` f32.
fn adapter_prompt() -> Tensor {
    let peft = softprompt::adapter::load_peft(&fixture("smollm2_generate_prompt_tuning")).unwrap();
    peft.input_prompt().unwrap().to_dtype(DType::F32).unwrap()
}

fn values(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

#[test]
fn every_dtype_and_layout_decodes_to_the_saved_tensor() {
    let prompt = adapter_prompt();
    let rounded = |dtype| prompt.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    for (name, want) in [
        ("f32", prompt.clone()),
        ("batch_of_one", prompt.clone()),
        ("transposed", prompt.clone()),
        ("f16", rounded(DType::F16)),
        ("bf16", rounded(DType::BF16)),
    ] {
        let got = decode(&b64(name), SMOLLM2).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(values(&got), values(&want), "{name}");
    }
}

#[test]
fn every_broken_tensor_is_refused_naming_the_problem() {
    let not_zip = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"not a zip");
    let huge = "A".repeat(MAX_EMBEDS_BYTES / 3 * 4 + 8);
    let cases: Vec<(String, Expect, &str)> = vec![
        (
            b64("one_dim"),
            SMOLLM2,
            "has shape [576]; expected 2-D [tokens, hidden]",
        ),
        (b64("batch_of_two"), SMOLLM2, "has shape [2, 1, 576]"),
        (
            b64("f64"),
            SMOLLM2,
            "has dtype F64; prompt_embeds must be float32, float16 or bfloat16",
        ),
        (b64("int64"), SMOLLM2, "has dtype I64"),
        (b64("hidden_500"), SMOLLM2, "hidden size 500, the model's is 576"),
        (b64("nan"), SMOLLM2, "holds NaN at row 1, column 7"),
        (
            b64("f32"),
            Expect {
                hidden: 576,
                max_tokens: 4,
            },
            "has 8 rows; at most 4",
        ),
        ("@@@@".into(), SMOLLM2, "is not base64"),
        (not_zip, SMOLLM2, "is not a file written by torch.save (a zip archive)"),
        (huge, SMOLLM2, "bytes of base64; at most"),
    ];
    for (text, expect, want) in cases {
        let message = decode(&text, expect).expect_err(want);
        assert!(message.contains(want), "`{message}` lacks `{want}`");
    }
}

/// A completion body for the shared server: greedy, 12 tokens, log-probabilities.
fn body(extra: Value) -> String {
    let mut b = json!({"max_tokens": 12, "temperature": 0, "logprobs": 1});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b.to_string()
}

fn complete(extra: Value) -> Value {
    let (status, got) = post(&format!("{}/v1/completions", server()), &body(extra));
    assert_eq!(status, 200, "{got}");
    got
}

/// The embeddings of the prompt-tuning adapter's prompt on the base model give the adapter's
/// tokens (PEFT's, from the fixture) and log-probabilities, as a string or a list of one; the
/// usage counts the embeddings as prompt tokens.
#[test]
fn embeddings_of_an_adapter_s_prompt_give_its_tokens() {
    let m = model();
    let (prompt, want) = case("smollm2_generate_prompt_tuning", 0);
    let adapter = complete(json!({"model": "prompt_tuning", "prompt": prompt}));
    assert_eq!(adapter["choices"][0]["text"], m.tokenizer.decode(&want, true).unwrap());
    for (name, embeds) in [
        ("f32", json!(b64("f32"))),
        ("a list of one", json!([b64("f32")])),
        ("transposed", json!(b64("transposed"))),
    ] {
        let got = complete(json!({"model": "smollm2", "prompt": prompt, "prompt_embeds": embeds}));
        assert_eq!(got["choices"], adapter["choices"], "{name}");
        let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(tokens(&got), tokens(&adapter) + 8);
    }
    // bfloat16 embeddings are served too (their rounding may change the tokens)
    let got = complete(json!({"prompt": prompt, "prompt_embeds": b64("bf16")}));
    assert_eq!(got["usage"]["completion_tokens"], 12, "{got}");
}

/// Embeddings alone: the tokens greedy decoding gives after those embeddings run as one
/// sequence (the library's `greedy`, no cache reused).
#[test]
fn embeddings_without_text_continue_the_embeddings() {
    let m = model();
    let lm = m.backbone.causal().unwrap();
    let embeds = adapter_prompt().unsqueeze(0).unwrap();
    let want = softprompt::infer::generate::greedy(lm, &embeds, 6, &[]).unwrap();
    let got = complete(json!({"prompt_embeds": b64("f32"), "max_tokens": 6}));
    assert_eq!(
        got["choices"][0]["text"],
        m.tokenizer.decode(&want, true).unwrap(),
        "{got}"
    );
    assert_eq!(got["usage"]["prompt_tokens"], 8);
    // an empty text is no text
    let empty = complete(json!({"prompt": "", "prompt_embeds": b64("f32"), "max_tokens": 6}));
    assert_eq!(empty["choices"], got["choices"]);
}

/// Embeddings after an adapter: the prefix-tuning adapter, then the embeddings of the
/// prompt-tuning adapter's prompt = the two adapters composed in that order.
#[test]
fn embeddings_after_an_adapter_equal_the_composition() {
    let (prompt, _) = case("smollm2_generate_prompt_tuning", 1);
    let embeds = complete(json!({"model": "prefix_tuning", "prompt": prompt, "prompt_embeds": b64("f32")}));
    let composed = complete(json!({"adapters": ["prefix_tuning", "prompt_tuning"], "prompt": prompt}));
    assert_eq!(embeds["choices"], composed["choices"]);
    assert_eq!(composed["model"], "prefix_tuning+prompt_tuning");
}

/// Over HTTP every broken tensor is a 400 with the field and the problem, and the server goes
/// on serving.
#[test]
fn broken_embeddings_are_400s_over_http() {
    let url = format!("{}/v1/completions", server());
    for (embeds, want) in [
        (json!(b64("nan")), "`prompt_embeds` holds NaN at row 1, column 7"),
        (json!(b64("hidden_500")), "`prompt_embeds` has shape [1, 500]"),
        (json!(b64("one_dim")), "expected 2-D"),
        (json!("not base64!"), "`prompt_embeds` is not base64"),
        (
            json!([b64("f32"), b64("f32")]),
            "`prompt_embeds`: one prompt per request, got a list of 2",
        ),
        (json!(7), "field `prompt_embeds`"),
    ] {
        let (status, err) = post(&url, &body(json!({"prompt": "Hi", "prompt_embeds": embeds})));
        assert_eq!(status, 400, "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "`{message}` lacks `{want}`");
    }
    let (status, err) = post(&url, &body(json!({"model": "smollm2"})));
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"].as_str().unwrap().contains("`prompt_embeds`"),
        "{err}"
    );
    let (status, _) = post(&url, &body(json!({"prompt": "Hi"})));
    assert_eq!(status, 200);
}

/// A request's embeddings run at its prefill, after its adapter's cache: the same tokens as the
/// adapter whose prompt they are, in the library's engine too.
#[test]
fn the_engine_runs_embeddings_as_an_adapter_s_prompt() {
    use softprompt::infer::engine::{generate, GenRequest};
    use softprompt::infer::prompt_cache::PromptCache;
    let m = model();
    let lm = m.backbone.causal().unwrap();
    let prompt = adapter_prompt();
    let ids = m.tokenizer.encode("The capital of France is", true).unwrap();
    let run = |cache: PromptCache| {
        let req = GenRequest {
            ids: ids.clone(),
            prompt: Arc::new(cache),
            max_tokens: 8,
            sampling: Default::default(),
            stop: vec![],
            stop_ids: vec![],
        };
        generate(lm, &m.tokenizer, req, |_| Ok(())).unwrap()
    };
    let adapter = run(PromptCache::from_prompt(lm, &prompt).unwrap());
    let embeds = run(PromptCache::none().with_embeds(lm, prompt.clone()).unwrap());
    assert_eq!(embeds, adapter);
    let wrong = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let err = PromptCache::none().with_embeds(lm, wrong).err().unwrap();
    assert!(format!("{err}").contains("[2, 5]"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Any bytes as the pickle of a saved tensor, as the archive, or a fixture with a few
    /// bytes changed: an error or a tensor, never a panic.
    #[test]
    fn crafted_inputs_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let _ = super::prompt_embeds::pickled_tensor(&bytes, std::path::Path::new("archive/data"));
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
        let _ = decode(&encoded, SMOLLM2);
        let mut file = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64("bf16")).unwrap();
        for (at, value) in flips {
            let n = file.len();
            file[at % n] = value;
        }
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &file);
        let _ = decode(&encoded, SMOLLM2);
    }

    /// Opcodes torch writes, in any order and with any small arguments: an error or an
    /// object, never a panic.
    #[test]
    fn pickle_opcodes_in_any_order_never_panic(
        ops in proptest::collection::vec(
            prop_oneof![
                Just(vec![b'(']), Just(vec![b't']), Just(vec![b')']), Just(vec![b'R']),
                Just(vec![b'Q']), Just(vec![0x85]), Just(vec![0x86]), Just(vec![0x87]),
                Just(vec![b'}']), Just(vec![b's']), Just(vec![b'u']), Just(vec![b'b']),
                Just(vec![b'h', 0]), Just(vec![b'q', 0]), Just(vec![b'K', 3]),
                Just(vec![0x8a, 2, 1, 1]), Just(b"ctorch._utils\n_rebuild_tensor_v2\n".to_vec()),
                Just(b"ctorch\nFloatStorage\n".to_vec()), Just(vec![b'X', 1, 0, 0, 0, b'0']),
            ],
            0..40,
        ),
    ) {
        let mut pickle: Vec<u8> = vec![0x80, 2];
        pickle.extend(ops.concat());
        pickle.push(b'.');
        let _ = super::prompt_embeds::pickled_tensor(&pickle, std::path::Path::new("archive/data"));
    }
}
