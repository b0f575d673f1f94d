//! Where a run writes, so that nothing is lost: a folder that already holds a run is only
//! continued (`resume`) or replaced (`overwrite`) when asked; a replacement is written into a
//! staging folder beside it and swapped in only when the new run succeeds; a failed run leaves
//! every file that was there before byte-identical and no folder of its own behind.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::adapter::run_folder;

use crate::config::{option, TrainConfig};
use crate::lock::ProcessLock;

/// The name of the checkpoint folder in an output folder.
pub const CHECKPOINT_DIR: &str = "checkpoint-last";

/// How a run uses its output folder.
#[derive(Debug)]
enum Mode {
    /// A folder without a run: written in place. `created` is the outermost folder this run
    /// created (removed again if the run fails before its first checkpoint).
    Fresh { created: Option<PathBuf> },
    /// `resume`: the run continues in place from `checkpoint-last`.
    Resume,
    /// `overwrite`: written into `staging`, swapped in on success.
    Overwrite { staging: PathBuf },
}

/// The output folder of one run (see the [module documentation](self)).
#[derive(Debug)]
pub struct OutputDir {
    target: PathBuf,
    mode: Mode,
    /// `.NAME.softprompt-lock` beside the folder (the folder itself may be swapped): one run
    /// writes it at a time.
    _lock: ProcessLock,
}

/// The step of the checkpoint in `dir/checkpoint-last`, if there is one.
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join(CHECKPOINT_DIR).join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["progress"]["step"].as_u64().map(|s| s as usize)
}

/// The options a resumed run must share with its checkpoint (they decide the shape and meaning
/// of what was learned), compared one by one so that a message can name the one that differs.
fn check_resume_options(cfg: &TrainConfig, state_json: &Path) -> Result<()> {
    let text = std::fs::read_to_string(state_json).with_context(|| format!("cannot read {}", state_json.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", state_json.display()))?;
    let Ok(saved) = serde_json::from_value::<TrainConfig>(v["config"].clone()) else {
        // A checkpoint without a readable configuration: the tensor shapes are still checked.
        return Ok(());
    };
    let uses_count =
        |c: &TrainConfig| crate::template::Template::parse(&c.template).is_ok_and(|t| t.num_virtual_tokens() == 0);
    let mut pairs: Vec<(&str, String, String)> = vec![
        ("model", json(&saved.model), json(&cfg.model)),
        ("template", json(&saved.template), json(&cfg.template)),
        ("target_field", json(&saved.target_field), json(&cfg.target_field)),
        ("task", json(&saved.task), json(&cfg.task)),
        ("verbalizer", json(&saved.verbalizer), json(&cfg.verbalizer)),
        ("method", json(&saved.method), json(&cfg.method)),
    ];
    if uses_count(&saved) || uses_count(cfg) {
        pairs.push((
            "num_virtual_tokens",
            json(&saved.num_virtual_tokens),
            json(&cfg.num_virtual_tokens),
        ));
    }
    if cfg.method == crate::config::Method::PTuning {
        pairs.push(("encoder", json(&saved.encoder), json(&cfg.encoder)));
        pairs.push(("encoder_hidden", json(&saved.encoder_hidden), json(&cfg.encoder_hidden)));
        pairs.push(("encoder_layers", json(&saved.encoder_layers), json(&cfg.encoder_layers)));
    }
    if cfg.method == crate::config::Method::ResidualPromptTuning {
        pairs.push((
            "residual_bottleneck",
            json(&saved.residual_bottleneck),
            json(&cfg.residual_bottleneck),
        ));
    }
    if cfg.method == crate::config::Method::LatePromptTuning {
        pairs.push(("insert_layer", json(&saved.insert_layer), json(&cfg.insert_layer)));
    }
    if cfg.method == crate::config::Method::Cpt {
        pairs.push(("cpt_examples", json(&saved.cpt_examples), json(&cfg.cpt_examples)));
    }
    if cfg.method == crate::config::Method::Dept {
        pairs.push(("dept_rank", json(&saved.dept_rank), json(&cfg.dept_rank)));
        pairs.push(("max_len", json(&saved.max_len), json(&cfg.max_len)));
    }
    for (name, then, now) in pairs {
        if then != now {
            bail!(
                "cannot resume {}: {} is {now} now but {then} in its checkpoint; resume with the \
                 same value, or train into another --output",
                cfg.output.display(),
                option(name)
            );
        }
    }
    Ok(())
}

/// JSON text of a value, for comparing options and showing them in messages.
fn json<T: serde::Serialize>(x: &T) -> String {
    serde_json::to_string(x).unwrap_or_default()
}

/// Creates `dir` and its missing parents; returns the outermost folder it created.
fn create_dirs(dir: &Path) -> Result<Option<PathBuf>> {
    let mut outermost = None;
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        outermost = Some(d.to_path_buf());
        p = d.parent();
    }
    std::fs::create_dir_all(dir).with_context(|| format!("output directory {} cannot be created", dir.display()))?;
    Ok(outermost)
}

/// Refuses a folder that cannot be written, before any work is done.
fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(".softprompt-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("output directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

impl OutputDir {
    /// Decides how the run of `cfg` uses option `output`, refusing what would lose a run, and
    /// creates the folder the run writes into. Reads no model and no data.
    pub fn claim(cfg: &TrainConfig) -> Result<OutputDir> {
        let target = cfg.output.clone();
        if target.exists() && !target.is_dir() {
            bail!(
                "output directory {} cannot be created: a file of that name exists",
                target.display()
            );
        }
        // The lock lives beside the folder, so its parent must exist first; a parent created
        // here is removed again with the rest if the run fails (`created`).
        let parent = run_folder::parent_of(&target).to_path_buf();
        if parent.exists() && !parent.is_dir() {
            bail!(
                "output directory {} cannot be created: {} is a file",
                target.display(),
                parent.display()
            );
        }
        let created_parent = if parent.exists() { None } else { create_dirs(&parent)? };
        let name = run_folder::folder_name(&target);
        let lock = run_folder::lock_run_folder(&target, "another training run").inspect_err(|_| {
            if let Some(c) = &created_parent {
                let _ = std::fs::remove_dir_all(c);
            }
        })?;
        for note in run_folder::recover(&target)? {
            eprintln!("note: {note}");
        }
        let existing = run_folder::run_files_in(&target);
        let mode = if cfg.resume {
            let state = target.join(CHECKPOINT_DIR).join("state.json");
            if !state.is_file() {
                bail!(
                    "cannot resume: {} holds no checkpoint ({}/state.json); was the run started \
                     with this output directory?",
                    if target.is_dir() {
                        target.display().to_string()
                    } else {
                        format!("{} does not exist and", target.display())
                    },
                    CHECKPOINT_DIR
                );
            }
            check_resume_options(cfg, &state)?;
            check_writable(&target)?;
            Mode::Resume
        } else if !existing.is_empty() {
            if !cfg.overwrite {
                bail!(
                    "output directory {} already holds a run ({}); give --overwrite (`overwrite = \
                     true`) to replace it, --resume to continue it, or another --output",
                    target.display(),
                    existing.join(", ")
                );
            }
            let staging = run_folder::staging_dir(&parent, &name, std::process::id());
            if staging.exists() {
                std::fs::remove_dir_all(&staging)
                    .with_context(|| format!("cannot remove the stale staging folder {}", staging.display()))?;
            }
            std::fs::create_dir(&staging).with_context(|| {
                format!(
                    "cannot create the staging folder {} beside the output directory",
                    staging.display()
                )
            })?;
            Mode::Overwrite { staging }
        } else {
            let created = created_parent.or(create_dirs(&target)?);
            if let Err(e) = check_writable(&target) {
                if let Some(c) = &created {
                    let _ = std::fs::remove_dir_all(c);
                }
                return Err(e);
            }
            Mode::Fresh { created }
        };
        Ok(OutputDir {
            target,
            mode,
            _lock: lock,
        })
    }

    /// The folder the run writes into.
    pub fn work(&self) -> &Path {
        match &self.mode {
            Mode::Overwrite { staging } => staging,
            _ => &self.target,
        }
    }

    /// The output folder as the user named it.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The run succeeded: a replacement takes the old run's place, file by file (files of the
    /// old run the new one did not write are removed; other files in the folder stay), so that a
    /// crash at any instant leaves a folder [`run_folder::recover`] completes.
    pub fn commit(self) -> Result<()> {
        let Mode::Overwrite { staging } = &self.mode else {
            return Ok(());
        };
        run_folder::replace(&self.target, staging).map_err(|e| {
            anyhow!(
                "{e:#}; the new run is complete in {}: the next softprompt command that uses {} \
                 completes the replacement",
                staging.display(),
                self.target.display()
            )
        })
    }

    /// The run failed with `err`: removes what this run created where nothing worth keeping was
    /// written, and says in the message what is left where. `training` tells whether the error
    /// came from the training loop (rather than from reading the data or loading the model).
    pub fn abandon(self, err: anyhow::Error, training: bool) -> anyhow::Error {
        let target = self.target.display();
        let note = match &self.mode {
            Mode::Overwrite { staging } => {
                let _ = std::fs::remove_dir_all(staging);
                Some(format!(
                    "{}{target} still holds the previous run, unchanged; the new run was discarded",
                    if training { "Training stopped; " } else { "" }
                ))
            }
            Mode::Fresh { created } if checkpoint_step(&self.target).is_none() => {
                match created {
                    Some(dir) => {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    None => {
                        for f in run_folder::run_files_in(&self.target) {
                            let _ = run_folder::remove(&self.target.join(f));
                        }
                    }
                }
                training.then(|| "Training stopped before its first checkpoint, so nothing was kept".to_string())
            }
            Mode::Fresh { .. } | Mode::Resume if training => checkpoint_step(&self.target).map(|step| {
                format!(
                    "Training stopped; the last good checkpoint (step {step}) is kept in {} and the \
                     best adapter in {target}",
                    self.target.join(CHECKPOINT_DIR).display()
                )
            }),
            Mode::Fresh { .. } | Mode::Resume => None,
        };
        match note {
            Some(n) => anyhow!("{err:#}. {n}"),
            None => err,
        }
    }
}

/// Opens `metrics.jsonl` in `dir` for this run: a fresh run starts it empty; a resumed run keeps
/// the lines of the steps up to its checkpoint's `step` and drops any later ones (written after
/// the checkpoint by a run that was then interrupted), so every step appears once.
pub fn open_metrics(dir: &Path, resume_step: Option<usize>) -> Result<std::fs::File> {
    let path = dir.join("metrics.jsonl");
    if let Some(step) = resume_step {
        if path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                crate::io::write_bytes(&path, kept.as_bytes())?;
            }
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            if resume_step.is_none() {
                f.set_len(0)?;
            }
            std::io::Write::flush(&mut f)?;
            Ok(f)
        })
        .with_context(|| format!("cannot write {}", path.display()))
}
