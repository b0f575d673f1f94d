//! `softprompt serve`: one frozen model, the adapters of a folder, an OpenAI-compatible HTTP API
//! (axum on tokio). Requests with different adapters share one batch (mixed-prompt continuous
//! batching, on the model's one worker thread); each adapter's prompt was turned into keys and
//! values once, at start-up (one per task for a multitask adapter: a request names its
//! `task_id`). An encoder (BERT, MiniLM) is served for classification only: its
//! `seq-cls` adapters answer `/v1/classify`, and the generation routes answer 400.
//!
//! Routes: `GET /` (a playground page), `GET /health`, `GET /metrics` (Prometheus text),
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming with
//! server-sent events when `stream` is true), `POST /v1/classify` (labels and probabilities,
//! for adapters trained for classification), `POST /v1/adapters` and
//! `DELETE /v1/adapters/{name}` (load and unload at run time). Safe by default: binds
//! 127.0.0.1, optional bearer key, bounded body, prompt, `max_tokens` and queue (503 with
//! Retry-After); adapter names are plain names that cannot leave the adapters folder; a client
//! that disconnects cancels its sequence; SIGTERM finishes the requests in flight and stops.

mod api;
#[cfg(test)]
mod body_tests;
#[cfg(test)]
mod browser_tests;
mod compose;
#[cfg(test)]
mod compose_tests;
#[cfg(test)]
mod embeds_tests;
mod generation;
mod json_body;
mod metrics;
mod prompt_embeds;
mod routes;
#[cfg(test)]
mod tests;
mod watch;
#[cfg(test)]
mod watch_tests;
mod worker;

use anyhow::{bail, Context, Result};
use clap::Args;
use softprompt::adapter::{self, ADAPTER_CONFIG};
use softprompt::backbone::LoadedModel;
use softprompt::infer::classify::Classifier;
use softprompt::infer::prompt_cache::PromptCache;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Arguments of `serve`.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: crate::args::ModelArg,
    /// Folder whose sub-folders are PEFT adapters; each is served under its folder name.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ routes.
    #[arg(long)]
    api_key: Option<String>,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 1024, value_parser = crate::args::whole("--max-tokens-limit", 1, "the largest max_tokens a request may ask for"))]
    max_tokens_limit: usize,
    /// Most requests queued or generating at once; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = crate::args::whole("--max-queue", 1, "requests queued or generating at once"))]
    max_queue: usize,
    /// Scan the --adapters folder every SECONDS: a new or changed adapter folder is loaded once
    /// its files have stayed the same for one period (the version served before stays until
    /// the new one has loaded), a removed one is unloaded. For replicas sharing one folder.
    #[arg(long, value_name = "SECONDS", requires = "adapters", value_parser = crate::args::whole("--watch-adapters", 1, "seconds between scans of the adapters folder"))]
    watch_adapters: Option<usize>,
}

/// One served adapter: the keys and values generation starts from and, for an adapter trained
/// for classification, its classifier.
#[derive(Clone)]
pub struct Served {
    /// The adapter's prompt as keys and values: one per task of a multitask adapter (indexed by
    /// task id), one for the others, none on an encoder (which does not generate).
    pub prompts: Vec<Arc<PromptCache>>,
    /// Whether the adapter is a multitask prompt (a request names its task).
    pub multitask: bool,
    /// Labels, template and scoring (`None`: the adapter has no labels, or is multitask).
    pub classifier: Option<Arc<Classifier>>,
}

impl Served {
    /// Loads the adapter folder `path` for `model`. On an encoder (BERT, MiniLM) only
    /// classification adapters can be served.
    fn load(model: &LoadedModel, path: &Path) -> Result<Self> {
        let peft = adapter::load_peft(path)?;
        let multitask = peft.is_multitask();
        let classifier = match multitask {
            true => None,
            false => Classifier::from_adapter(model, path)?.map(Arc::new),
        };
        let prompts = match model.backbone.causal() {
            Some(lm) => {
                let tasks: Vec<Option<usize>> = match multitask {
                    true => (0..peft.num_tasks()).map(Some).collect(),
                    false => vec![None],
                };
                tasks
                    .into_iter()
                    .map(|t| Ok(Arc::new(PromptCache::from_adapter_task(lm, &peft, t)?)))
                    .collect::<Result<_>>()
                    .with_context(|| format!("adapter {}", path.display()))?
            }
            None if classifier.is_some() => Vec::new(),
            None => bail!(
                "adapter {}: the model is an encoder, which serves only classification adapters \
                 (softprompt.json with task `seq-cls` and its labels)",
                path.display()
            ),
        };
        Ok(Self {
            prompts,
            multitask,
            classifier,
        })
    }

    /// The keys and values a request for task `task_id` starts from: a multitask adapter needs
    /// a task id in range, the others take none. The error says which.
    pub fn prompt(&self, task_id: Option<usize>) -> Result<Arc<PromptCache>, String> {
        match (self.multitask, task_id) {
            (true, None) => Err(format!(
                "a multitask adapter: give `task_id` (0 to {})",
                self.prompts.len() - 1
            )),
            (true, Some(t)) => self.prompts.get(t).cloned().ok_or_else(|| {
                format!(
                    "task_id {t} is out of range: the adapter has {} tasks (0 to {})",
                    self.prompts.len(),
                    self.prompts.len() - 1
                )
            }),
            (false, Some(t)) => Err(format!(
                "task_id {t} was given, but the adapter has one prompt for every request (task ids are for multitask adapters)"
            )),
            (false, None) => self
                .prompts
                .first()
                .cloned()
                .ok_or_else(|| "the adapter does not generate".to_string()),
        }
    }
}

/// What the handlers share.
pub struct AppState {
    /// The model (tokenizer and chat template; the network runs on the worker).
    pub model: Arc<LoadedModel>,
    /// The base model's name (its `model` field).
    pub base_name: String,
    /// Adapters by name (loaded and unloaded at run time through `/v1/adapters`).
    pub adapters: RwLock<BTreeMap<String, Served>>,
    /// Compositions of adapters built for requests (`adapters`), kept for the next ones.
    pub compositions: compose::Compositions,
    /// The folder adapters are loaded from.
    pub adapters_dir: Option<PathBuf>,
    /// The model thread.
    pub worker: worker::WorkerHandle,
    /// Counters for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Bearer key.
    pub api_key: Option<String>,
    /// Request limits.
    pub limits: api::Limits,
    /// Most requests queued or generating.
    pub max_queue: usize,
}

/// Options of a server.
pub struct ServerOptions {
    /// Bearer key.
    pub api_key: Option<String>,
    /// Largest `max_tokens`.
    pub max_tokens_limit: usize,
    /// Most requests queued or generating.
    pub max_queue: usize,
    /// The adapters folder (for loading at run time).
    pub adapters_dir: Option<PathBuf>,
}

/// Whether `name` is a plain folder name: letters, digits, `.`, `_`, `-`, not starting with a
/// dot, at most 100 bytes. Such a name cannot leave the adapters folder.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Loads adapter `name` from `dir` (a plain name whose folder, links resolved, is inside `dir`).
pub fn load_adapter(model: &LoadedModel, dir: &Path, name: &str) -> Result<Served> {
    if !plain_name(name) {
        bail!("`{name}` is not a plain adapter name (letters, digits, `.`, `_`, `-`)");
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let path = root
        .join(name)
        .canonicalize()
        .with_context(|| format!("no adapter folder `{name}`"))?;
    if path.parent() != Some(root.as_path()) || !path.join(ADAPTER_CONFIG).is_file() {
        bail!("no adapter folder `{name}` (with {ADAPTER_CONFIG})");
    }
    Served::load(model, &path).with_context(|| format!("adapter `{name}`"))
}

/// The adapter folders of a folder: those with a plain name, by name, and the paths of those
/// without one (never served).
pub type AdapterFolders = (Vec<(String, PathBuf)>, Vec<PathBuf>);

/// The adapter folders of `dir` (sub-folders holding `adapter_config.json`).
pub fn adapter_folders(dir: &Path) -> std::io::Result<AdapterFolders> {
    let (mut plain, mut other) = (vec![], vec![]);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.join(ADAPTER_CONFIG).is_file() {
            continue;
        }
        match path.file_name().and_then(|n| n.to_str()).filter(|n| plain_name(n)) {
            Some(name) => plain.push((name.to_string(), path)),
            None => other.push(path),
        }
    }
    Ok((plain, other))
}

/// Loads every adapter in `dir` (sub-folders holding `adapter_config.json`) for `model`.
pub fn load_adapters(model: &LoadedModel, dir: &Path) -> Result<BTreeMap<String, Served>> {
    let (plain, other) =
        adapter_folders(dir).with_context(|| format!("cannot read the adapters folder {}", dir.display()))?;
    for path in other {
        eprintln!("skipping adapter folder {}: not a plain name", path.display());
    }
    let mut out = BTreeMap::new();
    for (name, path) in plain {
        let served = Served::load(model, &path).with_context(|| format!("adapter `{name}`"))?;
        out.insert(name, served);
    }
    Ok(out)
}

/// The base model's name: the MODEL argument's file stem.
fn base_name(spec: &str) -> String {
    Path::new(spec)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(spec)
        .to_string()
}

/// Binds `addr` and serves until `shutdown` resolves (in-flight requests are finished).
/// Returns the bound address through `on_bound` before serving.
#[cfg(test)]
pub async fn run_server(
    state: AppState,
    addr: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_shared(Arc::new(state), addr, on_bound, shutdown).await
}

/// Binds `addr` and serves `state` (shared with the adapters folder's watcher) until `shutdown`
/// resolves (in-flight requests are finished). Returns the bound address through `on_bound`
/// before serving.
async fn run_shared(
    state: Arc<AppState>,
    addr: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    on_bound(listener.local_addr()?);
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Builds the shared state: starts the worker thread.
pub fn state(
    model: Arc<LoadedModel>,
    base_name: String,
    adapters: BTreeMap<String, Served>,
    opts: ServerOptions,
) -> Result<AppState> {
    if adapters.contains_key(&base_name) {
        bail!("an adapter folder is named like the base model (`{base_name}`); rename it");
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let worker = worker::spawn(model.clone(), metrics.clone());
    Ok(AppState {
        model,
        base_name,
        adapters: RwLock::new(adapters),
        compositions: Default::default(),
        adapters_dir: opts.adapters_dir,
        worker,
        metrics,
        api_key: opts.api_key,
        limits: api::Limits {
            max_tokens: opts.max_tokens_limit,
            default_max_tokens: 16,
            max_stops: 4,
            max_inputs: api::MAX_CLASSIFY_INPUTS,
        },
        max_queue: opts.max_queue,
    })
}

/// Runs `serve`: loads the model and the adapters, then answers HTTP until interrupted.
pub fn serve_cmd(args: ServeArgs) -> Result<()> {
    let model = args.model.load()?;
    let adapters = match &args.adapters {
        Some(dir) => load_adapters(&model, dir)?,
        None => BTreeMap::new(),
    };
    let base = base_name(&args.model.model);
    eprintln!(
        "model {base}; adapters: {}",
        if adapters.is_empty() {
            "none".to_string()
        } else {
            adapters.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    );
    let ip: std::net::IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {} is not an IP address", args.host))?;
    let state = state(
        Arc::new(model),
        base,
        adapters,
        ServerOptions {
            api_key: args.api_key,
            max_tokens_limit: args.max_tokens_limit,
            max_queue: args.max_queue,
            adapters_dir: args.adapters.clone(),
        },
    )?;
    let state = Arc::new(state);
    if let Some(seconds) = args.watch_adapters {
        watch::spawn(state.clone(), std::time::Duration::from_secs(seconds as u64));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_shared(
        state,
        SocketAddr::new(ip, args.port),
        |a| println!("listening on http://{a}"),
        shutdown_signal(),
    ))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing the requests in flight");
}
