//! The request bodies of every POST route, parsed and checked without a model: a type error
//! names the field at fault by its path, and no body (arbitrary bytes, arbitrary JSON,
//! request-shaped JSON with fields of the wrong type, huge or negative numbers, nested arrays,
//! any Unicode) makes the parser or the checks panic; each gives a request or a 400.

use super::api::{self, AdapterBody, ApiError, ChatBody, ClassifyBody, CompletionBody, Limits};
use super::routes::bearer_token;
use proptest::prelude::*;
use serde_json::{json, Map, Number, Value};

/// The server's limits as `serve` sets them (a smaller `max_tokens` limit).
const LIMITS: Limits = Limits {
    max_tokens: 64,
    default_max_tokens: 16,
    max_stops: 4,
    max_inputs: api::MAX_CLASSIFY_INPUTS,
};

/// The POST routes that take a JSON body.
#[derive(Debug, Clone, Copy)]
enum Route {
    Completions,
    Chat,
    Classify,
    Adapters,
}

const ROUTES: [Route; 4] = [Route::Completions, Route::Chat, Route::Classify, Route::Adapters];

/// What the route's handler does with `bytes` before it needs the model: parse, then check.
fn accept(route: Route, bytes: &[u8]) -> Result<(), ApiError> {
    match route {
        Route::Completions => api::parse::<CompletionBody>(bytes)?.check(&LIMITS).map(drop),
        Route::Chat => api::parse::<ChatBody>(bytes)?.check(&LIMITS).map(drop),
        Route::Classify => api::parse::<ClassifyBody>(bytes)?
            .rows(&LIMITS, |text| {
                let mut row = softprompt::data::Row::new();
                row.insert("text".into(), text.into());
                Ok(row)
            })
            .map(drop),
        Route::Adapters => api::parse::<AdapterBody>(bytes).map(drop),
    }
}

/// The error message of `body` on `route` (which must refuse it with a 400).
fn refusal(route: Route, body: &str) -> String {
    match accept(route, body.as_bytes()) {
        Ok(()) => panic!("{route:?} accepted {body}"),
        Err(e) => {
            assert_eq!(e.status, 400, "{route:?} {body}: {}", e.message);
            e.message
        }
    }
}

#[test]
fn a_type_error_names_the_field() {
    let cases = [
        (
            Route::Completions,
            r#"{"prompt": "hi", "max_tokens": "ten"}"#,
            "field `max_tokens`: invalid type: string \"ten\", expected u64",
        ),
        (
            Route::Completions,
            r#"{"prompt": "hi", "max_completion_tokens": -3}"#,
            "field `max_completion_tokens`: invalid value: integer `-3`, expected u64",
        ),
        (
            Route::Completions,
            r#"{"prompt": "hi", "temperature": "hot"}"#,
            "field `temperature`",
        ),
        (Route::Completions, r#"{"prompt": "hi", "top_k": 1.5}"#, "field `top_k`"),
        (
            Route::Completions,
            r#"{"prompt": "hi", "stream": "yes"}"#,
            "field `stream`",
        ),
        (Route::Completions, r#"{"prompt": "hi", "echo": 1}"#, "field `echo`"),
        (
            Route::Completions,
            r#"{"prompt": 5}"#,
            "field `prompt`: invalid type: integer `5`, expected a string or a list of strings",
        ),
        (
            Route::Completions,
            r#"{"prompt": ["a", {"b": 1}]}"#,
            "field `prompt[1]`",
        ),
        (
            Route::Completions,
            r#"{"prompt": "hi", "stop": ["a", 3]}"#,
            "field `stop[1]`",
        ),
        (Route::Completions, r#"{"prompt": "hi", "stop": true}"#, "field `stop`"),
        (
            Route::Completions,
            r#"{"model": "m"}"#,
            "invalid request: missing field `prompt`",
        ),
        (
            Route::Chat,
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}"#,
            "field `messages[1].content`: invalid type: integer `5`, expected a string",
        ),
        (
            Route::Chat,
            r#"{"messages": [{"role": "user"}]}"#,
            "field `messages[0]`: missing field `content`",
        ),
        (Route::Chat, r#"{"messages": {"role": "user"}}"#, "field `messages`"),
        (
            Route::Chat,
            r#"{"messages": [{"role": "user", "content": "a"}], "max_tokens": "ten"}"#,
            "field `max_tokens`",
        ),
        (
            Route::Chat,
            r#"{"messages": [{"role": "user", "content": "a"}], "seed": -1}"#,
            "field `seed`",
        ),
        (Route::Classify, r#"{"model": 1, "input": "x"}"#, "field `model`"),
        (Route::Classify, r#"{"input": "x"}"#, "missing field `model`"),
        (
            Route::Adapters,
            r#"{"name": []}"#,
            "field `name`: invalid type: sequence, expected a string",
        ),
    ];
    for (route, body, want) in cases {
        let message = refusal(route, body);
        assert!(message.contains(want), "{route:?} {body}: {message:?} lacks {want:?}");
    }
}

#[test]
fn checks_after_parsing_are_400s() {
    for (route, body, want) in [
        (
            Route::Completions,
            r#"{"prompt": "hi", "max_tokens": 0}"#,
            "max_tokens must be between",
        ),
        (
            Route::Completions,
            r#"{"prompt": ["a", "b"]}"#,
            "one prompt per request",
        ),
        (Route::Completions, r#"{"prompt": "hi", "echo": true}"#, "echo"),
        (Route::Completions, r#"{"prompt": null}"#, "field `prompt`"),
        (
            Route::Completions,
            r#"{"prompt_embeds": ["a", "b"]}"#,
            "`prompt_embeds`: one prompt per request, got a list of 2",
        ),
        (
            Route::Completions,
            r#"{"adapters": ["a"]}"#,
            "missing field `prompt` (a text; or `prompt_embeds`",
        ),
        (
            Route::Completions,
            r#"{"prompt": "hi", "adapters": "a"}"#,
            "field `adapters`",
        ),
        (Route::Chat, r#"{"messages": []}"#, "`messages` is empty"),
        (Route::Classify, r#"{"model": "m", "input": []}"#, "empty list"),
        (Route::Classify, r#"{"model": "m", "input": [1]}"#, "input[0]"),
        (Route::Adapters, r#"[]"#, "must be a JSON object"),
        (Route::Adapters, r#"{"name": "#, "not valid JSON"),
    ] {
        let message = refusal(route, body);
        assert!(message.contains(want), "{route:?} {body}: {message:?} lacks {want:?}");
    }
}

#[test]
fn well_formed_bodies_are_accepted() {
    for (route, body) in [
        (Route::Completions, json!({"prompt": "hi"})),
        (
            Route::Completions,
            json!({"prompt_embeds": "AAAA", "adapters": ["a", "b"]}),
        ),
        (Route::Completions, json!({"prompt": "", "prompt_embeds": ["AAAA"]})),
        (
            Route::Completions,
            json!({"prompt": ["hi"], "max_completion_tokens": 3, "stop": null, "logprobs": 2, "user": {"x": 1}}),
        ),
        (
            Route::Completions,
            json!({"prompt": "hi", "stop": ["a", "b"], "seed": u64::MAX}),
        ),
        (
            Route::Chat,
            json!({"messages": [{"role": "user", "content": "héllo 👋"}], "stream": true}),
        ),
        (Route::Classify, json!({"model": "m", "input": ["a", {"text": "b"}]})),
        (Route::Adapters, json!({"name": "late", "extra": [1, 2]})),
    ] {
        let bytes = body.to_string();
        if let Err(e) = accept(route, bytes.as_bytes()) {
            panic!("{route:?} refused {bytes}: {}", e.message);
        }
    }
}

/// A wrong string quoted back in an error is cut short: a body may hold a megabyte of it.
#[test]
fn a_long_wrong_value_is_not_quoted_in_full() {
    let body = json!({"prompt": "hi", "max_tokens": "é".repeat(100_000)}).to_string();
    let message = refusal(Route::Completions, &body);
    assert!(message.starts_with("field `max_tokens`"), "{message}");
    assert!(message.len() < 400, "{} bytes", message.len());
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    for (value, want) in [
        ("Bearer KEY", Some("KEY")),
        ("bearer KEY", Some("KEY")),
        ("BEARER KEY", Some("KEY")),
        ("bEaReR   KEY", Some("KEY")),
        ("Bearer\tKEY ", Some("KEY")),
        ("  Bearer KEY", Some("KEY")),
        ("Bearer", None),
        ("Bearer   ", None),
        ("BearerKEY", None),
        ("Basic KEY", None),
        ("Bearerx KEY", None),
        ("", None),
    ] {
        assert_eq!(bearer_token(value), want, "{value:?}");
    }
}

/// Numbers at and beyond the edges of every integer and float type a field may have.
fn edge_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(5)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u32::MAX as u64 + 1)),
        Just(json!(0.5)),
        Just(json!(-0.0)),
        Just(json!(1e308)),
        Just(json!(f64::MIN_POSITIVE)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|x| Number::from_f64(x).map_or(Value::Null, Value::Number)),
    ]
}

/// Any JSON value: scalars (edge numbers, any Unicode text) and nested arrays and objects.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        edge_number(),
        any::<String>().prop_map(Value::String),
        "[a-z]{0,3}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}|\\PC{0,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A chat message: right-typed, or with fields missing or of any type.
fn message() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        8 => prop_oneof![Just("user".to_string()), Just("assistant".to_string()), any::<String>()]
            .prop_map(Value::String),
        1 => any_json(),
    ];
    let field = |t| prop::option::weighted(0.95, t);
    (field(text.clone()), field(text)).prop_map(|(role, content)| {
        let mut m = Map::new();
        if let Some(r) = role {
            m.insert("role".into(), r);
        }
        if let Some(c) = content {
            m.insert("content".into(), c);
        }
        Value::Object(m)
    })
}

/// A value of the type `field` has (or one the server refuses in range), sometimes.
fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    let texts = || prop::collection::vec(any::<String>().prop_map(Value::String), 0..6).prop_map(Value::Array);
    let fitting: BoxedStrategy<Value> = match field {
        "prompt" | "stop" | "prompt_embeds" | "adapters" => {
            prop_oneof![any::<String>().prop_map(Value::String), texts()].boxed()
        }
        "messages" => prop::collection::vec(message(), 0..4).prop_map(Value::Array).boxed(),
        "input" => prop_oneof![
            any::<String>().prop_map(Value::String),
            prop::collection::vec(prop_oneof![any::<String>().prop_map(Value::String), any_json()], 0..40)
                .prop_map(Value::Array),
            any_json(),
        ]
        .boxed(),
        "model" | "name" => prop_oneof![
            Just(json!("late")),
            Just(json!("../x")),
            any::<String>().prop_map(Value::String)
        ]
        .boxed(),
        "echo" | "stream" => any::<bool>().prop_map(Value::Bool).boxed(),
        "logprobs" => prop_oneof![any::<bool>().prop_map(Value::Bool), (0..=5u64).prop_map(Value::from)].boxed(),
        "max_tokens" | "max_completion_tokens" => (1..=LIMITS.max_tokens as u64).prop_map(Value::from).boxed(),
        "temperature" => (0.0..=2.0f64).prop_map(Value::from).boxed(),
        "top_p" => (0.01..=1.0f64).prop_map(Value::from).boxed(),
        "top_k" | "task_id" => (0..100u64).prop_map(Value::from).boxed(),
        "seed" => any::<u64>().prop_map(Value::from).boxed(),
        "n" => Just(json!(1)).boxed(),
        "frequency_penalty" | "presence_penalty" => Just(json!(0.0)).boxed(),
        _ => any_json().boxed(),
    };
    prop_oneof![6 => fitting, 1 => edge_number(), 1 => any_json()].boxed()
}

/// The fields a route reads (every one of [`api::CommonFields`] for the generation routes),
/// and one it does not know.
fn fields(route: Route) -> Vec<&'static str> {
    const COMMON: [&str; 18] = [
        "model",
        "adapters",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "task_id",
        "seed",
        "stop",
        "stream",
        "logprobs",
        "n",
        "user",
        "stream_options",
        "frequency_penalty",
        "presence_penalty",
        "unknown_extra",
    ];
    match route {
        Route::Completions => [&["prompt", "prompt_embeds", "echo"][..], &COMMON].concat(),
        Route::Chat => [&["messages"][..], &COMMON].concat(),
        Route::Classify => vec!["model", "input", "unknown_extra"],
        Route::Adapters => vec!["name", "unknown_extra"],
    }
}

/// An object shaped like `route`'s request: each field present or not (a required one mostly
/// present), with a fitting value, an edge number or any value.
fn request_like(route: Route) -> impl Strategy<Value = Value> {
    let required = ["prompt", "messages", "input", "name"];
    let entries: Vec<_> = fields(route)
        .into_iter()
        .map(|f| {
            let presence = match required.contains(&f) || (f == "model" && matches!(route, Route::Classify)) {
                true => 0.95,
                false => 0.25,
            };
            prop::option::weighted(presence, field_value(f)).prop_map(move |v| v.map(|v| (f, v)))
        })
        .collect();
    entries.prop_map(|entries| Value::Object(entries.into_iter().flatten().map(|(k, v)| (k.into(), v)).collect()))
}

/// `body` as text, sometimes cut short or with one byte changed.
fn damaged(body: Value) -> impl Strategy<Value = Vec<u8>> {
    let bytes = body.to_string().into_bytes();
    let n = bytes.len();
    prop_oneof![
        4 => Just(bytes.clone()),
        1 => (0..=n).prop_map({
            let bytes = bytes.clone();
            move |cut| bytes[..cut].to_vec()
        }),
        1 => (0..n.max(1), any::<u8>()).prop_map(move |(i, b)| {
            let mut bytes = bytes.clone();
            if let Some(x) = bytes.get_mut(i) {
                *x = b;
            }
            bytes
        }),
    ]
}

/// `accept` on `bytes` does not panic, and a refusal is a 400 with a message.
fn never_panics(route: Route, bytes: &[u8]) -> Result<(), TestCaseError> {
    let outcome = std::panic::catch_unwind(|| accept(route, bytes));
    let Ok(result) = outcome else {
        return Err(TestCaseError::fail(format!(
            "{route:?} panicked on {}",
            String::from_utf8_lossy(bytes)
        )));
    };
    if let Err(e) = result {
        prop_assert_eq!(e.status, 400, "{:?}: {}", route, e.message);
        prop_assert!(!e.message.is_empty());
    }
    Ok(())
}

fn route() -> impl Strategy<Value = Route> {
    prop::sample::select(ROUTES.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_give_a_request_or_a_400(route in route(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        never_panics(route, &bytes)?;
    }

    #[test]
    fn any_json_gives_a_request_or_a_400(route in route(), value in any_json()) {
        never_panics(route, value.to_string().as_bytes())?;
    }

    #[test]
    fn completion_like_bodies_give_a_request_or_a_400(bytes in request_like(Route::Completions).prop_flat_map(damaged)) {
        never_panics(Route::Completions, &bytes)?;
    }

    #[test]
    fn chat_like_bodies_give_a_request_or_a_400(bytes in request_like(Route::Chat).prop_flat_map(damaged)) {
        never_panics(Route::Chat, &bytes)?;
    }

    #[test]
    fn classify_like_bodies_give_a_request_or_a_400(bytes in request_like(Route::Classify).prop_flat_map(damaged)) {
        never_panics(Route::Classify, &bytes)?;
    }

    #[test]
    fn adapter_like_bodies_give_a_request_or_a_400(bytes in request_like(Route::Adapters).prop_flat_map(damaged)) {
        never_panics(Route::Adapters, &bytes)?;
    }

    /// A string where a number or a flag belongs is refused naming the field.
    #[test]
    fn a_string_in_a_typed_field_is_named(
        field in prop::sample::select(vec![
            "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "task_id",
            "seed", "n", "frequency_penalty", "presence_penalty", "stream", "echo",
        ]),
        text in any::<String>(),
    ) {
        let body = json!({"prompt": "hi", field: text}).to_string();
        let message = refusal(Route::Completions, &body);
        let want = format!("field `{field}`: invalid type: string");
        prop_assert!(message.starts_with(&want), "{}", message);
    }

    /// The bearer token is found whatever the scheme's case and the spaces after it.
    #[test]
    fn any_case_of_bearer_gives_the_token(
        scheme in "[bB][eE][aA][rR][eE][rR]",
        gap in "[ \t]{1,4}",
        key in "[!-~]{1,40}",
    ) {
        let value = format!("{scheme}{gap}{key}");
        prop_assert_eq!(bearer_token(&value), Some(key.as_str()));
    }
}
