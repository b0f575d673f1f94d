//! The generation routes, `POST /v1/completions` and `POST /v1/chat/completions`: a request
//! becomes a job for the model's worker thread, whose replies come back as one JSON answer or
//! as server-sent events.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use softprompt::infer::engine::{Completion, Event, GenRequest};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, ApiError, ChatBody, CompletionBody, Params};
use super::routes::{authorize, body_bytes, require_generating, server_error, unavailable};
use super::worker::{GenJob, Job, Reply};
use super::{compose, prompt_embeds, AppState};

/// `POST /v1/completions`: a text prompt, and/or embeddings before it (`prompt_embeds`),
/// completed with the named adapter or adapters.
pub(super) async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_generating(&s)?;
    let (input, params) = api::parse::<CompletionBody>(&body_bytes(body)?)?.check(&s.limits)?;
    let ids = match &input.text {
        Some(text) => s
            .model
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::bad(format!("{e:#}")))?,
        None => Vec::new(),
    };
    let embeds = match input.embeds {
        Some(b64) => {
            let info = s.model.backbone.info();
            let expect = prompt_embeds::Expect {
                hidden: info.hidden,
                max_tokens: info.max_positions.saturating_sub(1),
            };
            // up to 8 MiB to decode and convert: off the async threads
            let decoded = tokio::task::spawn_blocking(move || prompt_embeds::decode(&b64, expect))
                .await
                .map_err(|e| server_error(format!("{e}")))?;
            let tensor = decoded.map_err(|e| {
                ApiError::new(
                    400,
                    "invalid_request_error",
                    "invalid_prompt_embeds",
                    format!("`prompt_embeds` {e}"),
                )
            })?;
            Some(tensor)
        }
        None => None,
    };
    run(s, params, ids, embeds, Kind::Completion).await
}

/// `POST /v1/chat/completions`: the messages rendered through the model's chat template, then
/// completed like a text prompt.
pub(super) async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    require_generating(&s)?;
    let (messages, params) = api::parse::<ChatBody>(&body_bytes(body)?)?.check(&s.limits)?;
    let text = crate::chat::render(&s.model, &messages).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let ids = s
        .model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    run(s, params, ids, None, Kind::Chat).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Resolves the adapter(s), puts the request's embeddings (if any) after their prompt,
/// checks the lengths, hands the request to the worker and answers.
async fn run(
    s: Arc<AppState>,
    params: Params,
    ids: Vec<u32>,
    embeds: Option<candle_core::Tensor>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let (name, mut prompt) = compose::request_prompt(&s, &params).await?;
    let adapter_positions = prompt.len();
    if let Some(e) = embeds {
        let lm = s
            .model
            .backbone
            .causal()
            .ok_or_else(|| server_error("the model does not generate".into()))?;
        let with = prompt.with_embeds(lm, e).map_err(|e| {
            ApiError::new(
                400,
                "invalid_request_error",
                "invalid_prompt_embeds",
                format!("`prompt_embeds` with `{name}`: {e:#}"),
            )
        })?;
        prompt = Arc::new(with);
    }
    if ids.is_empty() && prompt.embeds.is_none() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    let context = s.model.backbone.info().max_positions;
    if prompt.len() + ids.len() >= context {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "context_length_exceeded",
            format!(
                "the prompt has {} tokens and {} embeddings (+{adapter_positions} adapter positions); the model's context is {context}",
                ids.len(),
                prompt.embeds_len(),
            ),
        ));
    }
    let req = GenRequest {
        ids,
        prompt,
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop.clone(),
        stop_ids: s.model.tokenizer.eos_id().into_iter().collect(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job::Generate(GenJob {
        req,
        tx,
        submitted: Instant::now(),
    });
    s.worker
        .submit(job, s.max_queue)
        .map_err(|full| unavailable(full, s.max_queue))?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        NEXT_ID.fetch_add(1, Ordering::SeqCst)
    );
    let meta = Meta {
        id,
        created: now(),
        model: name,
        kind,
        logprobs: params.logprobs,
        state: s,
    };
    if params.stream {
        Ok(stream(meta, rx).into_response())
    } else {
        whole(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    logprobs: bool,
    state: Arc<AppState>,
}

impl Meta {
    fn token_text(&self, id: u32) -> String {
        self.state.model.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    fn logprobs_json(&self, ids: &[u32], lps: &[f32]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tokens: Vec<String> = ids.iter().map(|&i| self.token_text(i)).collect();
        match self.kind {
            Kind::Completion => {
                json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": Value::Null, "text_offset": Value::Null})
            }
            Kind::Chat => {
                json!({"content": tokens.iter().zip(lps).map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": []})).collect::<Vec<_>>()})
            }
        }
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// One streamed chunk.
    fn chunk(&self, text: &str, ids: &[u32], lps: &[f32], finish: Option<&str>, first: bool) -> Value {
        let logprobs = self.logprobs_json(ids, lps);
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if !text.is_empty() || finish.is_none() {
                    delta.insert("content".into(), json!(text));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                })
            }
        }
    }
}

/// Waits for the whole completion and answers with one JSON object.
async fn whole(meta: Meta, mut rx: UnboundedReceiver<Reply>) -> Result<Response, ApiError> {
    let mut out = Completion::default();
    let mut usage = Value::Null;
    while let Some(reply) = rx.recv().await {
        let event = reply.map_err(server_error)?;
        out.push(&event);
        if let Event::Done {
            prompt_tokens,
            completion_tokens,
            ..
        } = event
        {
            usage = Meta::usage(prompt_tokens, completion_tokens);
            break;
        }
    }
    let finish = out
        .finish
        .ok_or_else(|| server_error("the model thread stopped".into()))?
        .as_str();
    let logprobs = meta.logprobs_json(&out.ids, &out.logprobs);
    let body = match meta.kind {
        Kind::Completion => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
}

enum Phase {
    Running { first: bool },
    SendDone,
    End,
}

/// Answers with server-sent events: one chunk per token (text made final), a last chunk with
/// `finish_reason`, then `[DONE]`. Dropping the stream (client gone) drops the receiver, and
/// the worker cancels the sequence.
fn stream(meta: Meta, rx: UnboundedReceiver<Reply>) -> impl IntoResponse {
    let meta = Arc::new(meta);
    let events = futures_util::stream::unfold((rx, Phase::Running { first: true }), move |(mut rx, phase)| {
        let meta = meta.clone();
        async move {
            let first = match phase {
                Phase::End => return None,
                Phase::SendDone => {
                    return Some((
                        Ok::<_, Infallible>(SseEvent::default().data("[DONE]")),
                        (rx, Phase::End),
                    ))
                }
                Phase::Running { first } => first,
            };
            let data = match rx.recv().await {
                None => return None,
                Some(Err(message)) => {
                    let err = server_error(message).body();
                    return Some((Ok(SseEvent::default().data(err.to_string())), (rx, Phase::SendDone)));
                }
                Some(Ok(Event::Token { id, logprob, text })) => meta.chunk(&text, &[id], &[logprob], None, first),
                Some(Ok(Event::Done {
                    reason,
                    text,
                    prompt_tokens,
                    completion_tokens,
                })) => {
                    let mut last = meta.chunk(&text, &[], &[], Some(reason.as_str()), first);
                    last["usage"] = Meta::usage(prompt_tokens, completion_tokens);
                    return Some((Ok(SseEvent::default().data(last.to_string())), (rx, Phase::SendDone)));
                }
            };
            Some((
                Ok(SseEvent::default().data(data.to_string())),
                (rx, Phase::Running { first: false }),
            ))
        }
    });
    Sse::new(events)
}
