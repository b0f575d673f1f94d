//! The OpenAI-compatible request bodies, their checks, and the JSON the server answers with.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{json, Value};

pub use super::json_body::{parse, JsonBody};
use super::json_body::{typed, TextOrList, Texts};
use crate::chat::ChatMessage;

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong.
    pub message: String,
    /// OpenAI's error type.
    pub kind: &'static str,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (503 when the queue is full).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400: a request that cannot be served as it is.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            retry_after: None,
        }
    }
    /// Any status with a code.
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: Some(code),
            retry_after: None,
        }
    }
    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": Value::Null, "code": self.code}})
    }
}

/// `stop`: one string or a list (`null` or absent: none).
#[derive(Debug, Default)]
pub enum Stop {
    /// No stop strings.
    #[default]
    None,
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match d.deserialize_any(TextOrList { nullable: true })? {
            Texts::Null => Stop::None,
            Texts::One(s) => Stop::One(s),
            Texts::Many(v) => Stop::Many(v),
        })
    }
}

/// `prompt`: one string or a list of one.
#[derive(Debug)]
pub enum Prompt {
    /// A text.
    One(String),
    /// Texts (only one is served per request).
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(TextOrList { nullable: false })? {
            Texts::One(s) => Ok(Prompt::One(s)),
            Texts::Many(v) => Ok(Prompt::Many(v)),
            Texts::Null => Err(de::Error::invalid_type(
                de::Unexpected::Unit,
                &TextOrList { nullable: false },
            )),
        }
    }
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    /// Adapter folder name, or the base model's name.
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<u64>,
    /// Softmax temperature (default 1, as OpenAI's); 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Top-k (an extension).
    #[serde(default)]
    pub top_k: Option<u64>,
    /// The task of a multitask adapter (an extension; required for those, refused for others).
    #[serde(default)]
    pub task_id: Option<usize>,
    /// Adapters applied together, in order (an extension; `model` then names the base model
    /// or is left out).
    #[serde(default)]
    pub adapters: Option<Vec<String>>,
    /// Seed of the sequence's generator.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Stop,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Completions: an integer (top alternatives, only the chosen token's are given);
    /// chat: a boolean.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Only 1 is served.
    #[serde(default)]
    pub n: Option<u64>,
    /// Accepted and ignored (OpenAI clients send them).
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<Value>,
    /// Accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub stream_options: Option<Value>,
    /// Accepted if 0.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Accepted if 0.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
}

/// `POST /v1/completions`.
#[derive(Debug)]
pub struct CompletionBody {
    /// The text to continue (after `prompt_embeds`, when given).
    pub prompt: Option<Prompt>,
    /// vLLM's prompt embeddings: base64 of a `torch.save`d tensor `[tokens, hidden]`, one or
    /// a list of one.
    pub prompt_embeds: Option<Prompt>,
    /// Include the prompt in the text (`echo`): refused unless false.
    pub echo: bool,
    /// The rest.
    pub common: CommonFields,
}

/// The fields of [`CompletionBody`] that are its own. Read from the same object as
/// [`CommonFields`] rather than through `#[serde(flatten)]`, which buffers the fields and so
/// loses the name of the one at fault.
#[derive(Deserialize)]
struct CompletionOwn {
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    prompt_embeds: Option<Prompt>,
    #[serde(default)]
    echo: bool,
}

impl JsonBody for CompletionBody {
    fn from_object(object: &Value) -> Result<Self, ApiError> {
        let CompletionOwn {
            prompt,
            prompt_embeds,
            echo,
        } = typed(object)?;
        Ok(Self {
            prompt,
            prompt_embeds,
            echo,
            common: typed(object)?,
        })
    }
}

/// Longest `prompt` text (the completions route takes larger bodies, for `prompt_embeds`).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// What a completion starts from: embeddings (base64, decoded later), then text; at least one.
#[derive(Debug)]
pub struct CompletionInput {
    /// The text after the embeddings (`None`: none, or empty with embeddings).
    pub text: Option<String>,
    /// `prompt_embeds`: the base64 of a `torch.save` file.
    pub embeds: Option<String>,
}

impl CompletionBody {
    /// Checks the request: the one prompt's text and/or embeddings and the generation
    /// parameters (`max_tokens` defaults to `limits.default_max_tokens`, 16 as OpenAI's).
    pub fn check(self, limits: &Limits) -> Result<(CompletionInput, Params), ApiError> {
        if self.echo {
            return Err(ApiError::bad("echo is not supported"));
        }
        let embeds = self.prompt_embeds.map(|p| one_prompt(p, "prompt_embeds")).transpose()?;
        let text = match self.prompt.map(|p| one_prompt(p, "prompt")).transpose()? {
            Some(t) if t.is_empty() && embeds.is_some() => None,
            Some(t) => Some(t),
            None if embeds.is_some() => None,
            None => {
                return Err(ApiError::bad(
                    "invalid request: missing field `prompt` (a text; or `prompt_embeds`, or both)",
                ))
            }
        };
        if let Some(t) = text.as_ref().filter(|t| t.len() > MAX_PROMPT_BYTES) {
            return Err(ApiError::new(
                413,
                "invalid_request_error",
                "prompt_too_large",
                format!("`prompt` is {} bytes; at most {MAX_PROMPT_BYTES}", t.len()),
            ));
        }
        let params = self.common.check(limits, limits.default_max_tokens)?;
        Ok((CompletionInput { text, embeds }, params))
    }
}

/// The one entry of a `prompt` or `prompt_embeds` field (a string, or a list of one).
fn one_prompt(p: Prompt, field: &str) -> Result<String, ApiError> {
    match p {
        Prompt::One(t) => Ok(t),
        Prompt::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
        Prompt::Many(v) => Err(ApiError::bad(format!(
            "`{field}`: one prompt per request, got a list of {}",
            v.len()
        ))),
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug)]
pub struct ChatBody {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The rest.
    pub common: CommonFields,
}

/// The field of [`ChatBody`] that is its own (see [`CompletionOwn`]).
#[derive(Deserialize)]
struct ChatOwn {
    messages: Vec<ChatMessage>,
}

impl JsonBody for ChatBody {
    fn from_object(object: &Value) -> Result<Self, ApiError> {
        let ChatOwn { messages } = typed(object)?;
        Ok(Self {
            messages,
            common: typed(object)?,
        })
    }
}

impl ChatBody {
    /// Checks the request: at least one message, and the generation parameters (`max_tokens`
    /// defaults to the server's limit).
    pub fn check(self, limits: &Limits) -> Result<(Vec<ChatMessage>, Params), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad("`messages` is empty"));
        }
        Ok((self.messages, self.common.check(limits, limits.max_tokens)?))
    }
}

/// Checked generation parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Adapter or base model name (`None`: the base model).
    pub model: Option<String>,
    /// Most tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: softprompt::infer::sampling::SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream with SSE.
    pub stream: bool,
    /// Report log-probabilities.
    pub logprobs: bool,
    /// The task of a multitask adapter.
    pub task_id: Option<usize>,
    /// Adapters applied together, in order.
    pub adapters: Option<Vec<String>>,
}

/// Limits the server enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// Default `max_tokens` (completions: 16 as OpenAI's; chat: up to the limit).
    pub default_max_tokens: usize,
    /// Most stop strings.
    pub max_stops: usize,
    /// Most inputs in one `/v1/classify` request.
    pub max_inputs: usize,
}

/// Default of [`Limits::max_inputs`].
pub const MAX_CLASSIFY_INPUTS: usize = 32;

/// `POST /v1/classify`: `input` is one text, one object of the template's fields, or a list of
/// either.
#[derive(Debug, Deserialize)]
pub struct ClassifyBody {
    /// The adapter's name.
    pub model: String,
    /// What to classify.
    pub input: Value,
}

impl JsonBody for ClassifyBody {
    fn from_object(object: &Value) -> Result<Self, ApiError> {
        typed(object)
    }
}

/// `POST /v1/adapters`: the adapter folder to load (checked to be a plain name when loaded).
#[derive(Debug, Deserialize)]
pub struct AdapterBody {
    /// The folder's name in the adapters folder.
    pub name: String,
}

impl JsonBody for AdapterBody {
    fn from_object(object: &Value) -> Result<Self, ApiError> {
        typed(object)
    }
}

impl ClassifyBody {
    /// The inputs as rows: a text fills the template's one input field (`text_row`), an object
    /// is the row itself. At most `limits.max_inputs`, at least one.
    pub fn rows(
        self,
        limits: &Limits,
        text_row: impl Fn(&str) -> anyhow::Result<softprompt::data::Row>,
    ) -> Result<Vec<softprompt::data::Row>, ApiError> {
        let items = match self.input {
            Value::Array(items) => items,
            one => vec![one],
        };
        if items.is_empty() {
            return Err(ApiError::bad("input is an empty list: give at least one input"));
        }
        if items.len() > limits.max_inputs {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                "too_many_inputs",
                format!("{} inputs; at most {} per request", items.len(), limits.max_inputs),
            ));
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => text_row(&text).map_err(|e| ApiError::bad(format!("input[{i}]: {e:#}"))),
                Value::Object(row) => Ok(row),
                other => Err(ApiError::bad(format!(
                    "input[{i}] is {other}; expected a text or an object of the template's fields"
                ))),
            })
            .collect()
    }
}

impl CommonFields {
    /// Checks every field; `default_max` is the endpoint's default `max_tokens`.
    pub fn check(self, limits: &Limits, default_max: usize) -> Result<Params, ApiError> {
        let max_tokens = match self.max_tokens {
            None => default_max.min(limits.max_tokens),
            Some(n) if n as usize > limits.max_tokens || n == 0 => {
                return Err(ApiError::bad(format!(
                    "max_tokens must be between 1 and {}, got {n}",
                    limits.max_tokens
                )))
            }
            Some(n) => n as usize,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(format!(
                "temperature must be between 0 and 2, got {temperature}"
            )));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!("top_p must be in (0, 1], got {top_p}")));
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad(format!("only n = 1 is served, got {n}")));
            }
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad(format!("{name} is not supported (only 0)")));
            }
        }
        let stop = self.stop.into_vec();
        if stop.len() > limits.max_stops || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::bad(format!(
                "stop: at most {} non-empty strings of at most 256 bytes",
                limits.max_stops
            )));
        }
        let logprobs = match self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 5) => true,
            Some(other) => return Err(ApiError::bad(format!("logprobs: unexpected value {other}"))),
        };
        Ok(Params {
            model: self.model,
            max_tokens,
            sampling: softprompt::infer::sampling::SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: self.top_k.unwrap_or(0) as usize,
                seed: self.seed,
            },
            stop,
            stream: self.stream,
            logprobs,
            task_id: self.task_id,
            adapters: self.adapters,
        })
    }
}
