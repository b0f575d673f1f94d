//! `train`'s options as flags and a TOML file: [`TrainArgs`] (one flag per [`TrainConfig`]
//! field, with `--config FILE.toml` and the repeatable `--verbalizer`) and the merge of the
//! file with the flags ([`config`]; flags win, the file's relative paths resolve from its
//! folder; `init` left out of both is the method's default, [`config_from_table`]). Shared by
//! `train`, `sweep` and `bench --recipe`.

use anyhow::{Context, Result};
use softprompt::config::{InitKind, Method};
use softprompt::train::TrainConfig;
use std::path::{Path, PathBuf};

use crate::args::parse_pair;

/// Arguments of `train`: `--config FILE.toml`, then one flag per [`TrainConfig`] field (derived
/// from it, so no option can be missing; flags win over the file). `--verbalizer` is repeatable.
pub struct TrainArgs {
    /// TOML file with any of the options.
    config: Option<PathBuf>,
    /// The options as parsed (defaults where no flag was given).
    options: TrainConfig,
    /// `--verbalizer LABEL=WORD` entries.
    verbalizer: Vec<(String, String)>,
    /// Names of the options given on the command line.
    pub given: Vec<String>,
}

/// The default configuration as TOML values, by option name.
fn default_values() -> toml::Table {
    toml::Table::try_from(TrainConfig::default()).expect("the default configuration serialises")
}

/// A TOML value as the flag text that parses back to it.
fn flag_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

impl clap::Args for TrainArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = cmd
            .arg(
                clap::Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML file with any of the options below (same names, snake_case; flags win)"),
            )
            .arg(
                clap::Arg::new("verbalizer")
                    .long("verbalizer")
                    .action(clap::ArgAction::Append)
                    .value_parser(parse_pair)
                    .help("LABEL=WORD verbaliser entry (repeatable); default: each label is its own word"),
            );
        // Every field of TrainConfig is a flag; the defaults shown (and used) are Default's.
        // `--lr -0.1` and `--steps -1` are values (refused by the option's parser or check with
        // its range), not unknown flags.
        let mut cmd = crate::args::allow_negative_numbers(TrainConfig::augment_args(cmd));
        for (name, value) in default_values() {
            let Some(text) = flag_text(&value) else { continue };
            // clap keeps &'static str defaults; the few default strings live as long as the process.
            let text: &'static str = Box::leak(text.into_boxed_str());
            if cmd.get_arguments().any(|a| a.get_id() == name.as_str()) {
                cmd = cmd.mut_arg(name.as_str(), |a| a.required(false).default_value(text));
            }
        }
        // The default of `init` depends on the method; its help says which.
        cmd.mut_arg("init", |a| a.hide_default_value(true))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for TrainArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let given = m
            .ids()
            .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
            .map(|id| id.to_string())
            .collect();
        Ok(Self {
            config: m.get_one::<PathBuf>("config").cloned(),
            options: <TrainConfig as clap::FromArgMatches>::from_arg_matches(m)?,
            verbalizer: m
                .get_many::<(String, String)>("verbalizer")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            given,
        })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// The options that name files or folders.
const PATH_OPTIONS: &[&str] = &["train", "dev", "test", "init_from", "output"];

/// Reads a training TOML file into a table whose relative paths are resolved from the file's
/// folder (so a configuration works from any current directory). `model` is resolved too when
/// it names a file or folder there (it may also be a short name).
pub fn read_config_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut table = text
        .parse::<toml::Table>()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    resolve_paths(&mut table, base, true);
    // The data sets of each `[[tasks]]` table, too.
    if let Some(toml::Value::Array(tasks)) = table.get_mut("tasks") {
        for task in tasks {
            if let toml::Value::Table(t) = task {
                resolve_paths(t, base, false);
            }
        }
    }
    Ok(table)
}

/// Resolves the path options of `table` from `base` (and `model` when `with_model` and it
/// names a file or folder there).
fn resolve_paths(table: &mut toml::Table, base: &Path, with_model: bool) {
    for (key, value) in table.iter_mut() {
        let toml::Value::String(s) = value else { continue };
        let p = Path::new(s.as_str());
        if p.is_absolute() || s.is_empty() {
            continue;
        }
        let resolved = base.join(p);
        let is_path = PATH_OPTIONS.contains(&key.as_str()) || (with_model && key == "model" && resolved.exists());
        if is_path {
            *s = resolved.to_string_lossy().into_owned();
        }
    }
}

/// Merges the TOML file (if any) with the flags (flags win) into a configuration. Paths in the
/// file are relative to the file's folder; paths given as flags to the current directory.
pub fn config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut table = match &args.config {
        Some(path) => read_config_table(path)?,
        None => toml::Table::new(),
    };
    let flags = toml::Table::try_from(&args.options).context("cannot read the flags")?;
    for name in &args.given {
        if name == "verbalizer" {
            let m: toml::Table = args
                .verbalizer
                .iter()
                .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
                .collect();
            table.insert(name.clone(), toml::Value::Table(m));
        } else if let Some(v) = flags.get(name) {
            table.insert(name.clone(), v.clone());
        }
    }
    let origin = args
        .config
        .as_ref()
        .map_or("the flags".to_string(), |p| format!("{} and the flags", p.display()));
    config_from_table(table, &origin)
}

/// The configuration of a table of options (a TOML file's, merged with the flags); `origin`
/// names where they come from in errors. Option `init`, when neither gives it, is the method's
/// default ([`InitKind::default_for`]: `random-normal` for a key/value prefix, `vocab` for an
/// input prompt), as `--help` says.
pub fn config_from_table(mut table: toml::Table, origin: &str) -> Result<TrainConfig> {
    if !table.contains_key("init") {
        let method = table
            .get("method")
            .and_then(|m| m.clone().try_into::<Method>().ok())
            .unwrap_or(TrainConfig::default().method);
        table.insert("init".into(), toml::Value::String(InitKind::default_for(method).name()));
    }
    toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("invalid training options in {origin}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use softprompt::train;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(argv: &[&str]) -> TrainArgs {
        Wrapper::try_parse_from(std::iter::once("train").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flags_override_the_toml_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("softprompt-cli-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            "lr = 0.5\nsteps = 7\nmethod = \"p-tuning\"\nencoder = \"lstm\"\n[verbalizer]\npositive = \" good\"\n",
        )
        .unwrap();
        let cfg = config(&parse(&[
            "--config",
            path.to_str().unwrap(),
            "--lr",
            "0.1",
            "--verbalizer",
            "negative= bad",
        ]))
        .unwrap();
        assert_eq!(cfg.lr, 0.1);
        assert_eq!(cfg.steps, Some(7));
        assert_eq!(cfg.method, train::Method::PTuning);
        assert_eq!(cfg.encoder, train::EncoderKind::Lstm);
        assert_eq!(cfg.batch, TrainConfig::default().batch);
        // A flag given as a table replaces the file's table.
        assert_eq!(cfg.verbalizer.get("negative").map(String::as_str), Some(" bad"));
    }

    #[test]
    fn paths_in_a_config_file_resolve_from_its_folder_and_flags_from_the_current_one() {
        let dir = std::env::temp_dir().join(format!("softprompt-cli-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            "model = \"smollm2-135m\"\ntrain = \"rows.jsonl\"\ntest = \"/abs/test.jsonl\"\noutput = \"../runs/x\"\n",
        )
        .unwrap();
        let cfg = config(&parse(&["--config", path.to_str().unwrap(), "--dev", "d.jsonl"])).unwrap();
        assert_eq!(cfg.train, dir.join("rows.jsonl"));
        assert_eq!(cfg.output, dir.join("../runs/x"));
        assert_eq!(cfg.test, Some(PathBuf::from("/abs/test.jsonl")));
        assert_eq!(cfg.dev, Some(PathBuf::from("d.jsonl")));
        assert_eq!(cfg.model, "smollm2-135m");
        // A flag wins over the file and stays relative to the current directory.
        let cfg = config(&parse(&["--config", path.to_str().unwrap(), "--train", "t.jsonl"])).unwrap();
        assert_eq!(cfg.train, PathBuf::from("t.jsonl"));
        // The files of `[[tasks]]` tables resolve from the file's folder as well.
        std::fs::write(
            &path,
            "method = \"multitask-prompt-tuning\"\n[[tasks]]\ntrain = \"a/train.jsonl\"\ndev = \"a/dev.jsonl\"\n[[tasks]]\ntrain = \"b.jsonl\"\n",
        )
        .unwrap();
        let cfg = config(&parse(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(cfg.tasks.len(), 2);
        assert_eq!(cfg.tasks[0].train, dir.join("a/train.jsonl"));
        assert_eq!(cfg.tasks[0].dev, Some(dir.join("a/dev.jsonl")));
        assert_eq!(cfg.tasks[1].train, dir.join("b.jsonl"));
        assert_eq!(cfg.tasks[1].test, None);
        // The repeatable flag: TRAIN[,DEV[,TEST]] per task, in task-id order.
        let cfg = config(&parse(&["--tasks", "x.jsonl,,z.jsonl", "--tasks", "y.jsonl"])).unwrap();
        assert_eq!(cfg.tasks[0].dev, None);
        assert_eq!(cfg.tasks[0].test, Some(PathBuf::from("z.jsonl")));
        assert_eq!(cfg.tasks[1].train, PathBuf::from("y.jsonl"));
        let e = Wrapper::try_parse_from(["train", "--tasks", ",d.jsonl"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("TRAIN.jsonl[,DEV.jsonl[,TEST.jsonl]]"), "{e}");
    }

    #[test]
    fn unknown_or_malformed_options_name_the_file() {
        let dir = std::env::temp_dir().join(format!("softprompt-cli-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "learning_rate = 0.1\n").unwrap();
        let e = format!(
            "{:#}",
            config(&parse(&["--config", path.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
        std::fs::write(&path, "lr = [oops\n").unwrap();
        let e = format!(
            "{:#}",
            config(&parse(&["--config", path.to_str().unwrap()])).unwrap_err()
        );
        assert!(e.contains("bad.toml") && e.contains("not valid TOML"), "{e}");
        let e = Wrapper::try_parse_from(["train", "--method", "lora"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lora"), "{e}");
    }

    /// Every option of the library's TrainConfig (every field of its serialised form) has a
    /// flag that sets it, and `--help` lists it with its default.
    #[test]
    fn every_option_is_a_flag_with_its_default_in_the_help() {
        use clap::CommandFactory;
        // Optional fields are left out of the serialised default, so fill them first.
        let full = TrainConfig {
            dev: Some("d.jsonl".into()),
            test: Some("t.jsonl".into()),
            baseline_template: Some("{text} {label}".into()),
            init_text: Some("x".into()),
            init_from: Some("a".into()),
            tasks: vec!["t.jsonl".parse().unwrap()],
            steps: Some(1),
            epochs: Some(1.0),
            dev_rows: Some(1),
            test_rows: Some(1),
            patience: Some(1),
            ..TrainConfig::default()
        };
        let names: Vec<String> = match serde_json::to_value(&full).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("{other}"),
        };
        assert!(names.len() >= 40, "{names:?}");
        let mut cmd = Wrapper::command();
        let help = cmd.render_long_help().to_string();
        for name in &names {
            let flag = format!("--{}", name.replace('_', "-"));
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(&flag[2..]))
                .unwrap_or_else(|| panic!("option `{name}` has no flag {flag}"));
            assert!(help.contains(&flag), "{flag} missing from --help");
            if let Some(text) = default_values().get(name).and_then(flag_text) {
                assert_eq!(arg.get_default_values(), [text.as_str()], "{flag}");
                if name == "init" {
                    // Its default depends on the method: the help says both, clap's none.
                    assert!(help.contains("Default: `vocab` for an input prompt"), "{help}");
                    assert!(!help.contains("[default: vocab]"), "{help}");
                    continue;
                }
                // clap quotes a default with spaces (and may wrap it): look for its start.
                let shown = match text.split_once(' ') {
                    Some((first, _)) => format!("[default: \"{first}"),
                    None => format!("[default: {text}]"),
                };
                assert!(help.contains(&shown), "{flag}: default {text} not shown");
            }
        }
        // Each flag sets its option; a value different from the default shows it went through.
        let argv = [
            "--model",
            "m",
            "--train",
            "a.jsonl",
            "--dev",
            "b.jsonl",
            "--test",
            "c.jsonl",
            "--template",
            "T {label}",
            "--baseline-template",
            "B {label}",
            "--target-field",
            "y",
            "--task",
            "seq-cls",
            "--verbalizer",
            "a=b",
            "--method",
            "p-tuning",
            "--num-virtual-tokens",
            "3",
            "--encoder",
            "lstm",
            "--encoder-hidden",
            "5",
            "--encoder-layers",
            "3",
            "--encoder-dropout",
            "0.25",
            "--prefix-projection",
            "--residual-bottleneck",
            "7",
            "--dept-rank",
            "2",
            "--dept-lr",
            "0.5",
            "--insert-layer",
            "3",
            "--cache-lower-layers",
            "false",
            "--cpt-examples",
            "8",
            "--cpt-weighted-loss",
            "decay",
            "--cpt-loss-decay-factor",
            "0.5",
            "--cpt-projection-epsilon",
            "0.3",
            "--cpt-projection-format-epsilon",
            "0.2",
            "--num-frozen-tokens",
            "2",
            "--weights",
            "file",
            "--init",
            "from",
            "--init-text",
            "t",
            "--init-from",
            "dir",
            "--init-task",
            "2",
            "--tasks",
            "a.jsonl,b.jsonl",
            "--tasks",
            "c.jsonl",
            "--num-ranks",
            "3",
            "--lr",
            "0.5",
            "--weight-decay",
            "0.1",
            "--beta1",
            "0.8",
            "--beta2",
            "0.95",
            "--adam-eps",
            "1e-6",
            "--warmup",
            "2",
            "--schedule",
            "cosine",
            "--steps",
            "9",
            "--epochs",
            "2.5",
            "--batch",
            "3",
            "--accumulation",
            "2",
            "--clip",
            "0.5",
            "--eval-every",
            "4",
            "--dev-rows",
            "6",
            "--test-rows",
            "7",
            "--patience",
            "2",
            "--seed",
            "1",
            "--output",
            "out",
            "--max-len",
            "64",
            "--exact-match",
            "--eval-batch",
            "5",
            "--resume",
            "--overwrite",
            "--device",
            "cuda:1",
            "--kernels",
            "composed",
        ];
        let cfg = config(&parse(&argv)).unwrap();
        let set = serde_json::to_value(&cfg).unwrap();
        let default = serde_json::to_value(TrainConfig::default()).unwrap();
        for name in &names {
            assert_ne!(set[name], default[name], "flag for `{name}` did not set it");
        }
    }

    /// A key/value prefix without `init` starts from random-normal (as `--help` says), from the
    /// flags and from a file; an input prompt from vocab; a given init is kept.
    #[test]
    fn init_left_out_is_the_method_s_default() {
        use softprompt::config::InitKind;
        let cfg = config(&parse(&["--method", "prefix-tuning"])).unwrap();
        assert_eq!(cfg.init, InitKind::RandomNormal);
        cfg.validate().unwrap();
        assert_eq!(config(&parse(&[])).unwrap().init, InitKind::Vocab);
        assert_eq!(config(&parse(&["--method", "p-tuning"])).unwrap().init, InitKind::Vocab);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run.toml");
        std::fs::write(&path, "method = \"cartridge\"\n").unwrap();
        let file = path.to_str().unwrap();
        assert_eq!(
            config(&parse(&["--config", file])).unwrap().init,
            InitKind::RandomNormal
        );
        let cfg = config(&parse(&["--config", file, "--init", "zero"])).unwrap();
        assert_eq!(cfg.init, InitKind::Zero);
        // The file's method with the flag's init, or the flag's method with the file's init.
        std::fs::write(&path, "init = \"vocab\"\n").unwrap();
        let cfg = config(&parse(&["--config", file, "--method", "prefix-tuning"])).unwrap();
        assert_eq!(cfg.init, InitKind::Vocab);
        let e = format!("{:#}", cfg.validate().unwrap_err());
        assert!(
            e.contains("does not apply to a key/value prefix") && e.contains("random-normal"),
            "{e}"
        );
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        /// The option names of the file, and a few that are not.
        fn keys() -> Vec<String> {
            let mut keys: Vec<String> = default_values().keys().cloned().collect();
            for k in [
                "dev",
                "test",
                "baseline_template",
                "verbalizer",
                "init_text",
                "init_from",
                "tasks",
                "steps",
                "epochs",
                "dev_rows",
                "test_rows",
                "patience",
                "kernels",
                "learning_rate",
                "",
            ] {
                keys.push(k.to_string());
            }
            keys
        }

        /// Strings the options hold: every choice of the typed options, paths, templates.
        const WORDS: &[&str] = &[
            "prompt-tuning",
            "p-tuning",
            "prefix-tuning",
            "cartridge",
            "multitask-prompt-tuning",
            "random",
            "random-normal",
            "zero",
            "vocab",
            "labels",
            "text",
            "from",
            "exact-source-task",
            "mlp",
            "lstm",
            "classify",
            "generate",
            "seq-cls",
            "cosine",
            "cpu",
            "cuda:7",
            "f32",
            "q8_0",
            "fused",
            "{text} {label}",
            "[soft:3]{text} {label}",
            "[soft:99999999999999]{text}",
            "{label}",
            "",
            "/",
            "..",
            "a.jsonl,b.jsonl",
        ];

        fn toml_value() -> impl Strategy<Value = toml::Value> {
            let leaf = prop_oneof![
                any::<i64>().prop_map(toml::Value::Integer),
                (-3i64..40).prop_map(toml::Value::Integer),
                any::<f64>().prop_map(toml::Value::Float),
                any::<bool>().prop_map(toml::Value::Boolean),
                prop::sample::select(WORDS).prop_map(|w| toml::Value::String(w.to_string())),
                ".{0,8}".prop_map(toml::Value::String),
            ];
            leaf.prop_recursive(2, 12, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
                    prop::collection::btree_map(prop::sample::select(vec!["train", "dev", "test", "x"]), inner, 0..3)
                        .prop_map(|m| toml::Value::Table(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
                ]
            })
        }

        /// A table of real option names (and a few others) holding values of any type.
        fn option_table() -> impl Strategy<Value = toml::Table> {
            prop::collection::btree_map(prop::sample::select(keys()), toml_value(), 0..8)
                .prop_map(|m| m.into_iter().collect())
        }

        /// A value of the type of `default` (numbers of any size and sign, strings among the
        /// choices of the typed options).
        fn typed_value(default: Option<&toml::Value>) -> BoxedStrategy<toml::Value> {
            match default {
                Some(toml::Value::Integer(_)) => prop_oneof![
                    4 => (0i64..30).prop_map(toml::Value::Integer),
                    1 => (-2i64..0).prop_map(toml::Value::Integer),
                    1 => any::<i64>().prop_map(toml::Value::Integer),
                ]
                .boxed(),
                Some(toml::Value::Float(_)) => prop_oneof![
                    4 => (0.0f64..1.0).prop_map(toml::Value::Float),
                    1 => any::<f64>().prop_map(toml::Value::Float),
                ]
                .boxed(),
                Some(toml::Value::Boolean(_)) => any::<bool>().prop_map(toml::Value::Boolean).boxed(),
                Some(v) => prop_oneof![
                    2 => Just(v.clone()),
                    1 => prop::sample::select(WORDS).prop_map(|w| toml::Value::String(w.to_string())),
                ]
                .boxed(),
                None => prop::sample::select(WORDS)
                    .prop_map(|w| toml::Value::String(w.to_string()))
                    .boxed(),
            }
        }

        /// A table of real option names, each holding a value of its own type: most reach the
        /// checks.
        fn typed_table() -> impl Strategy<Value = toml::Table> {
            let names: Vec<String> = default_values().keys().cloned().collect();
            let n = names.len();
            prop::sample::subsequence(names, 0..=n.min(8))
                .prop_flat_map(|chosen| {
                    let defaults = default_values();
                    chosen
                        .into_iter()
                        .map(|name| {
                            let value = typed_value(defaults.get(&name));
                            (Just(name), value)
                        })
                        .collect::<Vec<_>>()
                })
                .prop_map(|pairs| pairs.into_iter().collect())
        }

        /// Text drawn from the characters TOML gives meaning to, and some option names.
        fn toml_like() -> impl Strategy<Value = String> {
            let pieces = vec![
                "=", "\"", "'", "[", "]", "[[", "]]", "{", "}", ",", ".", "#", "\\", "\n", " ", "-", "+", "0", "1e9",
                "inf", "nan", "true", "lr", "steps", "method", "tasks", "init", "train", "\"\"\"", "é", "\u{feff}",
                "\r",
            ];
            prop::collection::vec(prop::sample::select(pieces), 0..40).prop_map(|p| p.concat())
        }

        /// `train --config FILE` of a file holding `text`: the configuration or an error, and
        /// the checks of the configuration, without a panic.
        fn read(text: &str) {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("run.toml");
            std::fs::write(&path, text).unwrap();
            let args = parse(&["--config", path.to_str().unwrap()]);
            if let Ok(cfg) = config(&args) {
                let _ = cfg.validate();
            }
            let _ = read_config_table(&path);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn the_config_file_reader_never_panics_on_toml_like_text(text in toml_like()) {
                read(&text);
            }

            #[test]
            fn the_config_file_reader_never_panics_on_options_of_any_type(table in option_table()) {
                if let Ok(text) = toml::to_string(&table) {
                    read(&text);
                }
            }

            #[test]
            fn the_config_file_reader_never_panics_on_options_of_their_own_type(table in typed_table()) {
                if let Ok(text) = toml::to_string(&table) {
                    read(&text);
                }
            }

            #[test]
            fn the_config_file_reader_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
                read(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}
