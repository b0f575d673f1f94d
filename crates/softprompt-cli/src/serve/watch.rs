//! `serve --watch-adapters SECONDS`: the adapters folder is the list of adapters. A folder that
//! appears or changes is loaded (replacing the served version only once the new one has loaded);
//! one that disappears is unloaded. Several replicas watching one shared folder (on one host or
//! a network file system) serve the same adapters without a restart.
//!
//! A half-copied adapter is never served: a folder is loaded only once its files (names, sizes,
//! modification times) are the same in two scans a period apart, and the load itself checks
//! every file (an incomplete safetensors file or JSON is refused). A folder that fails to load is
//! said once per version on stderr and the version served before (if any) stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::{adapter_folders, AppState, Served};

/// What an adapter folder holds: each file's name, size and modification time.
type Signature = Vec<(String, u64, Option<SystemTime>)>;

/// The adapters folder's state as the watcher knows it.
pub struct Watcher {
    dir: PathBuf,
    /// The name of the base model (never an adapter's).
    base_name: String,
    /// The version of each adapter the watcher loaded or found loaded.
    served: BTreeMap<String, Signature>,
    /// The previous scan: a version is loaded once it is seen twice.
    previous: BTreeMap<String, Signature>,
    /// Versions that failed to load (said once).
    failed: BTreeMap<String, Signature>,
}

impl Watcher {
    /// A watcher of `dir` whose adapters, as they are now, are those already served (loaded at
    /// start-up).
    pub fn new(dir: &Path, base_name: &str) -> Watcher {
        let now = scan(dir);
        Watcher {
            dir: dir.to_path_buf(),
            base_name: base_name.to_string(),
            served: now.clone(),
            previous: now,
            failed: BTreeMap::new(),
        }
    }

    /// One scan: loads the folders that are new or changed and have settled, unloads the
    /// adapters whose folders are gone. Returns what it did, a line each, for the log.
    pub fn step(
        &mut self,
        adapters: &RwLock<BTreeMap<String, Served>>,
        load: impl Fn(&str) -> anyhow::Result<Served>,
    ) -> Vec<String> {
        let now = scan(&self.dir);
        let mut said = vec![];
        for (name, version) in &now {
            let settled = self.previous.get(name) == Some(version);
            if self.served.get(name) == Some(version) || !settled || self.failed.get(name) == Some(version) {
                continue;
            }
            if *name == self.base_name {
                said.push(format!(
                    "adapter folder `{name}` is named like the base model; not served"
                ));
                self.failed.insert(name.clone(), version.clone());
                continue;
            }
            match load(name) {
                Ok(served) => {
                    let replaced = adapters.write().unwrap().insert(name.clone(), served).is_some();
                    said.push(format!(
                        "adapter `{name}` {}",
                        if replaced { "reloaded" } else { "loaded" }
                    ));
                    self.served.insert(name.clone(), version.clone());
                    self.failed.remove(name);
                }
                Err(e) => {
                    let kept = match adapters.read().unwrap().contains_key(name) {
                        true => "; the version loaded before is still served",
                        false => "",
                    };
                    said.push(format!("adapter `{name}` not loaded: {e:#}{kept}"));
                    self.failed.insert(name.clone(), version.clone());
                }
            }
        }
        let gone: Vec<String> = self.served.keys().filter(|n| !now.contains_key(*n)).cloned().collect();
        for name in gone {
            self.served.remove(&name);
            if adapters.write().unwrap().remove(&name).is_some() {
                said.push(format!("adapter `{name}` unloaded: its folder is gone"));
            }
        }
        self.failed.retain(|name, _| now.contains_key(name));
        self.previous = now;
        said
    }
}

/// The adapter folders of `dir` (plain names holding `adapter_config.json`) and what each holds.
/// A folder that cannot be read is left out (as if not there yet).
fn scan(dir: &Path) -> BTreeMap<String, Signature> {
    let Ok((plain, _)) = adapter_folders(dir) else {
        return BTreeMap::new();
    };
    plain
        .into_iter()
        .filter_map(|(name, path)| Some((name, signature(&path)?)))
        .collect()
}

/// The files directly in `folder` with their sizes and modification times, by name.
fn signature(folder: &Path) -> Option<Signature> {
    let mut files = vec![];
    for entry in std::fs::read_dir(folder).ok()?.flatten() {
        let meta = entry.metadata().ok()?;
        if meta.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((name, meta.len(), meta.modified().ok()));
        }
    }
    files.sort();
    Some(files)
}

/// Watches the adapters folder of `state` every `every` on a thread of its own, for the life of
/// the process, saying on stderr what it loads, reloads, unloads or refuses.
pub fn spawn(state: Arc<AppState>, every: Duration) {
    let Some(dir) = state.adapters_dir.clone() else {
        return;
    };
    let mut watcher = Watcher::new(&dir, &state.base_name);
    std::thread::spawn(move || loop {
        std::thread::sleep(every);
        for line in watcher.step(&state.adapters, |name| super::load_adapter(&state.model, &dir, name)) {
            eprintln!("{line}");
        }
    });
}
