//! The prompt a generation request starts from: the base model, one adapter (`model`), or
//! several applied together, in order (`adapters`, as Cartridges' reference server composes
//! cartridges: [`softprompt::infer::compose`]). A composition is built once, off the async
//! threads, and kept beside the adapters' own caches, keyed by the ordered names and the task;
//! an entry holds the members' caches it was built from, so an adapter loaded again or
//! unloaded makes it stale (rebuilt on the next request) rather than wrong.

use softprompt::infer::prompt_cache::PromptCache;
use std::sync::{Arc, Mutex};

use super::api::{ApiError, Params};
use super::routes::{server_error, unknown_model};
use super::AppState;

/// Most adapters one request may compose.
pub const MAX_MEMBERS: usize = 8;

/// Most compositions kept (the least recently used one goes first).
pub const KEPT: usize = 32;

/// One kept composition.
struct Entry {
    names: Vec<String>,
    task: Option<usize>,
    /// The members' caches it was built from.
    members: Vec<Arc<PromptCache>>,
    prompt: Arc<PromptCache>,
}

impl Entry {
    fn is(&self, names: &[String], task: Option<usize>, members: &[Arc<PromptCache>]) -> bool {
        self.names == names
            && self.task == task
            && self.members.len() == members.len()
            && self.members.iter().zip(members).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The compositions built so far, most recently used last.
#[derive(Default)]
pub struct Compositions {
    entries: Mutex<Vec<Entry>>,
}

impl Compositions {
    /// The composition of `members` (named `names`, for `task`), if it was built from these
    /// very caches; it becomes the most recently used.
    fn get(&self, names: &[String], task: Option<usize>, members: &[Arc<PromptCache>]) -> Option<Arc<PromptCache>> {
        let mut entries = self.entries.lock().unwrap();
        let i = entries.iter().position(|e| e.is(names, task, members))?;
        let entry = entries.remove(i);
        let prompt = entry.prompt.clone();
        entries.push(entry);
        Some(prompt)
    }

    /// Keeps `entry`, replacing one of the same names and task, dropping the least recently
    /// used past [`KEPT`].
    fn put(&self, entry: Entry) {
        let mut entries = self.entries.lock().unwrap();
        entries.retain(|e| !(e.names == entry.names && e.task == entry.task));
        entries.push(entry);
        let extra = entries.len().saturating_sub(KEPT);
        entries.drain(..extra);
    }

    /// Number of compositions kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// The name a request's answer reports and the prompt it starts from: `adapters` composed
/// (`model` then names the base model or is left out), else the adapter or base model `model`.
pub(super) async fn request_prompt(s: &Arc<AppState>, params: &Params) -> Result<(String, Arc<PromptCache>), ApiError> {
    let Some(names) = &params.adapters else {
        let name = params.model.clone().unwrap_or_else(|| s.base_name.clone());
        let prompt = single(s, &name, params.task_id)?;
        return Ok((name, prompt));
    };
    if let Some(model) = params.model.as_ref().filter(|m| **m != s.base_name) {
        return Err(ApiError::bad(format!(
            "`model` names `{model}` and `adapters` lists adapters: give the adapters in one of \
             them (with `adapters`, `model` is the base model `{}` or left out)",
            s.base_name
        )));
    }
    if names.is_empty() {
        return Err(ApiError::bad("`adapters` is empty: name at least one adapter"));
    }
    if names.len() > MAX_MEMBERS {
        return Err(ApiError::bad(format!(
            "`adapters` names {} adapters; at most {MAX_MEMBERS} compose",
            names.len()
        )));
    }
    let members = members(s, names, params.task_id)?;
    if names.len() == 1 {
        return Ok((names[0].clone(), members[0].clone()));
    }
    let task = params.task_id;
    if let Some(prompt) = s.compositions.get(names, task, &members) {
        return Ok((names.join("+"), prompt));
    }
    let (st, ns, ms) = (s.clone(), names.clone(), members.clone());
    let built = tokio::task::spawn_blocking(move || {
        let lm = (st.model.backbone.causal()).ok_or_else(|| anyhow::anyhow!("the model does not generate"))?;
        let refs: Vec<(&str, &PromptCache)> = ns.iter().map(String::as_str).zip(ms.iter().map(|m| &**m)).collect();
        softprompt::infer::compose::compose(lm, &refs)
    })
    .await
    .map_err(|e| server_error(format!("{e}")))?
    .map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            "adapters_do_not_compose",
            format!("`adapters`: {e:#}"),
        )
    })?;
    let prompt = Arc::new(built);
    s.compositions.put(Entry {
        names: names.clone(),
        task,
        members,
        prompt: prompt.clone(),
    });
    Ok((names.join("+"), prompt))
}

/// The prompt of the base model or of adapter `name` (for task `task_id` of a multitask one).
fn single(s: &AppState, name: &str, task_id: Option<usize>) -> Result<Arc<PromptCache>, ApiError> {
    if name == s.base_name {
        if let Some(t) = task_id {
            return Err(ApiError::bad(format!(
                "task_id {t} was given for the base model (task ids are for multitask adapters)"
            )));
        }
        return Ok(Arc::new(PromptCache::none()));
    }
    let found = s.adapters.read().unwrap().get(name).map(|a| a.prompt(task_id));
    found.ok_or_else(|| unknown_model(name))?.map_err(ApiError::bad)
}

/// The caches of the adapters `names`, in order: `task_id` goes to the multitask ones (and must
/// go to one); an unknown name is a 404, the base model's name a 400.
fn members(s: &AppState, names: &[String], task_id: Option<usize>) -> Result<Vec<Arc<PromptCache>>, ApiError> {
    let adapters = s.adapters.read().unwrap();
    let mut any_multitask = false;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if *name == s.base_name {
            return Err(ApiError::bad(format!(
                "`adapters` names the base model `{name}`; list only adapters"
            )));
        }
        let served = adapters.get(name).ok_or_else(|| {
            ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!("the adapter `{name}` named in `adapters` does not exist (see GET /v1/models)"),
            )
        })?;
        any_multitask |= served.multitask;
        let task = if served.multitask { task_id } else { None };
        out.push(
            served
                .prompt(task)
                .map_err(|e| ApiError::bad(format!("`adapters`: `{name}`: {e}")))?,
        );
    }
    if let (Some(t), false) = (task_id, any_multitask) {
        return Err(ApiError::bad(format!(
            "task_id {t} was given, but none of `adapters` is a multitask adapter"
        )));
    }
    Ok(out)
}
