//! Every example configuration (`examples/*.toml`, `examples/studies/*.toml`) is one the trainer
//! accepts: it parses into a `TrainConfig` (no unknown option, every value of the right type)
//! and passes `TrainConfig::validate`, and the data files it names exist.
//!
//! The file is read as `softprompt train --config FILE` reads it: the path options are resolved
//! from the file's folder before the table becomes a `TrainConfig`, and those of each
//! `[[tasks]]` table too. No model is loaded.

use softprompt::config::TrainConfig;
use std::path::{Path, PathBuf};

/// The options that hold a path, resolved from the file's folder (as the CLI does).
const PATH_OPTIONS: &[&str] = &["train", "dev", "test", "init_from", "output"];

/// The data-set options whose files must exist.
const DATA_OPTIONS: &[&str] = &["train", "dev", "test", "init_from"];

/// The repository's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `*.toml` files of `dir`, sorted.
fn tomls(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Resolves the relative path options of `table` from `base`; returns the data files named.
fn resolve(table: &mut toml::Table, base: &Path) -> Vec<PathBuf> {
    let mut data = Vec::new();
    for (key, value) in table.iter_mut() {
        let toml::Value::String(s) = value else { continue };
        if !PATH_OPTIONS.contains(&key.as_str()) || s.is_empty() {
            continue;
        }
        let resolved = base.join(s.as_str());
        if DATA_OPTIONS.contains(&key.as_str()) {
            data.push(resolved.clone());
        }
        *s = resolved.to_string_lossy().into_owned();
    }
    data
}

/// Reads `path` into the configuration the trainer would run, and the data files it names.
fn read_config(path: &Path) -> (TrainConfig, Vec<PathBuf>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
    let base = path.parent().unwrap();
    let mut data = resolve(&mut table, base);
    if let Some(toml::Value::Array(tasks)) = table.get_mut("tasks") {
        for task in tasks {
            if let toml::Value::Table(t) = task {
                data.extend(resolve(t, base));
            }
        }
    }
    let cfg: TrainConfig = toml::Value::Table(table)
        .try_into()
        .unwrap_or_else(|e| panic!("{} is not a training configuration: {e}", path.display()));
    (cfg, data)
}

#[test]
fn every_example_config_parses_and_passes_its_checks() {
    let examples = root().join("examples");
    let files: Vec<PathBuf> = [examples.clone(), examples.join("studies")]
        .iter()
        .flat_map(|dir| tomls(dir))
        .collect();
    assert!(
        files.len() >= 10,
        "expected the example configurations under {}, found {files:?}",
        examples.display()
    );
    for path in &files {
        let (cfg, data) = read_config(path);
        cfg.validate()
            .unwrap_or_else(|e| panic!("{} fails its checks: {e:#}", path.display()));
        for file in data {
            assert!(
                file.is_file(),
                "{} names {}, which does not exist",
                path.display(),
                file.display()
            );
        }
    }
}
