//! The HTTP routes: parsing and checking a request, handing it to the worker, and answering
//! with OpenAI's JSON (whole, or as server-sent events).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::api::{self, ApiError};
use super::worker::{ClassifyJob, Job};
use super::{generation, AppState, Served};

/// Largest request body.
pub const BODY_LIMIT: usize = 1 << 20;

/// Largest `/v1/completions` body: room for `prompt_embeds` of
/// [`super::prompt_embeds::MAX_EMBEDS_BYTES`] in base64, and the rest of the request.
pub const COMPLETIONS_BODY_LIMIT: usize = super::prompt_embeds::MAX_EMBEDS_BYTES / 3 * 4 + BODY_LIMIT;

/// All routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route(
            "/v1/completions",
            post(generation::completions).layer(DefaultBodyLimit::max(COMPLETIONS_BODY_LIMIT)),
        )
        .route("/v1/chat/completions", post(generation::chat_completions))
        .route("/v1/classify", post(classify))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// Counts every request by route and status, with its time to the response head.
async fn track(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let route = match path {
        "/"
        | "/health"
        | "/metrics"
        | "/v1/models"
        | "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/classify"
        | "/v1/adapters" => path.to_string(),
        p if p.starts_with("/v1/adapters/") => "/v1/adapters/{name}".to_string(),
        _ => "other".to_string(),
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .http(&route, resp.status().as_u16(), start.elapsed().as_secs_f64());
    resp
}

async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// `POST /v1/adapters {"name": NAME}`: loads (or reloads) adapter folder NAME of the adapters
/// folder, turning its prompt into keys and values off the async threads.
async fn load_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let api::AdapterBody { name } = api::parse(&body_bytes(body)?)?;
    let dir = s
        .adapters_dir
        .clone()
        .ok_or_else(|| ApiError::bad("the server was started without --adapters"))?;
    if name == s.base_name {
        return Err(ApiError::bad(format!("`{name}` is the base model's name")));
    }
    let st = s.clone();
    let n = name.clone();
    let served = tokio::task::spawn_blocking(move || super::load_adapter(&st.model, &dir, &n))
        .await
        .map_err(|e| server_error(format!("{e}")))?
        .map_err(|e| ApiError::new(400, "invalid_request_error", "adapter_not_loaded", format!("{e:#}")))?;
    s.adapters.write().unwrap().insert(name.clone(), served);
    Ok(Json(json!({"id": name, "object": "model", "loaded": true})))
}

/// `DELETE /v1/adapters/NAME`: requests already running keep their copy.
async fn unload_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let removed = s.adapters.write().unwrap().remove(&name);
    match removed {
        Some(_) => Ok(Json(json!({"id": name, "object": "model", "deleted": true}))),
        None => Err(ApiError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("no adapter `{name}` is loaded"),
        )),
    }
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "in_flight": s.metrics.queue_depth.load(Ordering::SeqCst)}))
}

async fn not_found() -> ApiError {
    ApiError::new(404, "invalid_request_error", "not_found", "no such route")
}

/// 401 unless the request carries the server's key (when it has one) as
/// `Authorization: Bearer KEY`; the scheme's case does not matter (RFC 7235).
pub(super) fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if given.is_some_and(|g| same_secret(g, key)) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key (Authorization: Bearer KEY)",
        ))
    }
}

/// The token of an `Authorization` value with the `Bearer` scheme, in any case (`bearer`,
/// `BEARER`), with any spaces or tabs between the scheme and the token; `None` for another
/// scheme or no token.
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_matches([' ', '\t']);
    let (scheme, token) = value.split_once([' ', '\t'])?;
    let token = token.trim_start_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether `given` equals `key`, in a time that does not depend on where they differ.
fn same_secret(given: &str, key: &str) -> bool {
    let (a, b) = (given.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let generates = s.model.backbone.causal().is_some();
    let entry = |id: &str, kind: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "softprompt", "kind": kind, "generates": generates});
    let mut data = vec![entry(&s.base_name, "base")];
    for (name, served) in s.adapters.read().unwrap().iter() {
        let mut e = entry(name, "adapter");
        // classification adapters say what /v1/classify answers and what an input needs
        if let Some(c) = &served.classifier {
            e["labels"] = json!(c.labels());
            e["input_fields"] = json!(c.input_fields());
        }
        if served.multitask {
            e["tasks"] = json!(served.prompts.len());
        }
        data.push(e);
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status().as_u16();
        let code = if status == 413 { "body_too_large" } else { "bad_body" };
        ApiError::new(status, "invalid_request_error", code, e.body_text())
    })
}

/// 404 for a name that is neither the base model nor a loaded adapter.
pub(super) fn unknown_model(name: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        "model_not_found",
        format!("the model `{name}` does not exist (see GET /v1/models)"),
    )
}

/// 503 when the worker's queue is full (with Retry-After) or the worker is gone.
pub(super) fn unavailable(full: bool, max_queue: usize) -> ApiError {
    if full {
        let mut e = ApiError::new(
            503,
            "server_error",
            "queue_full",
            format!("{max_queue} requests are already queued or generating; retry later"),
        );
        e.retry_after = Some(1);
        e
    } else {
        ApiError::new(503, "server_error", "unavailable", "the model thread has stopped")
    }
}

/// `POST /v1/classify {"model": ADAPTER, "input": TEXT | {FIELD: TEXT, ..} | [..]}`: the label
/// and the probability of every label for each input, scored on the model thread.
async fn classify(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let body: api::ClassifyBody = api::parse(&body_bytes(body)?)?;
    let name = body.model.clone();
    let served = s.adapters.read().unwrap().get(&name).cloned();
    let classifier = match served {
        Some(Served {
            classifier: Some(c), ..
        }) => c,
        Some(_) => {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                "not_a_classifier",
                format!(
                    "the adapter `{name}` has no labels: /v1/classify serves adapters trained for \
                     classification (softprompt.json with task `classify` or `seq-cls` and its labels)"
                ),
            ))
        }
        None if name == s.base_name => {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                "not_a_classifier",
                format!("`{name}` is the base model, which has no labels; name a classification adapter"),
            ))
        }
        None => return Err(unknown_model(&name)),
    };
    let rows = body.rows(&s.limits, |t| classifier.row_from_text(t))?;
    let examples = classifier
        .encode(&s.model.tokenizer, &rows)
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job::Classify(ClassifyJob {
        classifier: classifier.clone(),
        examples,
        tx,
    });
    s.worker
        .submit(job, s.max_queue)
        .map_err(|full| unavailable(full, s.max_queue))?;
    let results = rx
        .await
        .map_err(|_| server_error("the model thread stopped".into()))?
        .map_err(server_error)?;
    let labels = classifier.labels();
    let data: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let probs: serde_json::Map<String, Value> = labels
                .iter()
                .zip(&r.probabilities)
                .map(|(l, p)| (l.clone(), json!(p)))
                .collect();
            json!({"index": i, "label": r.label, "probabilities": probs})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "model": name, "labels": labels, "data": data,
    })))
}

/// 400 unless the served model generates (an encoder only classifies).
pub(super) fn require_generating(s: &AppState) -> Result<(), ApiError> {
    if s.model.backbone.causal().is_some() {
        return Ok(());
    }
    Err(ApiError::new(
        400,
        "invalid_request_error",
        "model_does_not_generate",
        format!(
            "the served model `{}` is an encoder, which does not generate text; \
             classify with POST /v1/classify and a seq-cls adapter",
            s.base_name
        ),
    ))
}

pub(super) fn server_error(message: String) -> ApiError {
    ApiError::new(500, "server_error", "generation_failed", message)
}
