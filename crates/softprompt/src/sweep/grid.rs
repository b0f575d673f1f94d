//! The grid of a sweep: `KEY=V1,V2,…` axes over training options, their cartesian product
//! times seeds, and each cell's options and folder name.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::config::TrainConfig;

/// Options a grid may not vary: the sweep decides them for every cell.
const SWEEP_OWNED: &[&str] = &["output", "resume", "overwrite"];

/// One axis of the grid: a training option and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// The option's name, as in the TOML file (`num_virtual_tokens`, `init`, `template`, …).
    pub key: String,
    /// Its values, in the order given.
    pub values: Vec<Value>,
}

impl Axis {
    /// Parses `KEY=V1,V2,…` (or `KEY=["v1", "v2"]`, a JSON array, for values that contain
    /// commas). Each value is read as JSON when it is a number, boolean or quoted string, and as
    /// text otherwise (`init=text,vocab` and `lr=0.3,0.03` both work).
    pub fn parse(spec: &str) -> Result<Axis> {
        let Some((key, list)) = spec.split_once('=') else {
            bail!("--grid `{spec}`: expected KEY=V1,V2,… (e.g. --grid num_virtual_tokens=5,20)");
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            bail!("--grid `{spec}`: the option name before `=` is empty");
        }
        let values: Vec<Value> = match serde_json::from_str::<Value>(list.trim()) {
            Ok(Value::Array(items)) => items,
            _ => list.split(',').map(read_value).collect(),
        };
        if values.is_empty() || values.iter().any(|v| v.as_str().is_some_and(|s| s.trim().is_empty())) {
            bail!("--grid `{spec}`: every value must be non-empty (a list of V1,V2,…)");
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                bail!("--grid `{spec}`: value {v} is given twice");
            }
        }
        Ok(Axis { key, values })
    }
}

/// A value as typed on the command line: JSON when it is a number, a boolean or a quoted string,
/// otherwise the text itself.
fn read_value(text: &str) -> Value {
    let t = text.trim();
    match serde_json::from_str::<Value>(t) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => v,
        _ => Value::String(t.to_string()),
    }
}

/// The whole grid: its axes and how many seeds each combination runs with.
#[derive(Debug, Clone)]
pub struct Grid {
    /// The axes, outermost first.
    pub axes: Vec<Axis>,
    /// Seeds per combination: the base configuration's `seed`, `seed + 1`, …
    pub seeds: usize,
}

/// One cell of the grid: a value for every axis and a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// `(key, value)` per axis, in the grid's order.
    pub settings: Vec<(String, Value)>,
    /// The run's seed.
    pub seed: u64,
    /// The cell's folder name inside the sweep's output folder.
    pub name: String,
}

impl Cell {
    /// The settings without the seed, as one label (`init=text num_virtual_tokens=5`), which
    /// names the group of seeds the cell belongs to.
    pub fn group_label(&self) -> String {
        self.settings
            .iter()
            .map(|(k, v)| format!("{k}={}", show_value(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A value for a table or a legend: strings without quotes, on one line (a newline shown as
/// `\n`, as templates are written).
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.replace('\n', "\\n"),
        other => other.to_string(),
    }
}

impl Grid {
    /// Checks the axes against the options of `base` (every key a training option, none the
    /// sweep's own, no key twice, every value accepted by the option) and the seed count.
    pub fn new(axes: Vec<Axis>, seeds: usize, base: &TrainConfig) -> Result<Grid> {
        if seeds == 0 {
            bail!("--seeds is 0; it must be at least 1 (runs per grid cell)");
        }
        if axes.is_empty() {
            bail!("no --grid given: name at least one option to vary, e.g. --grid init=text,vocab");
        }
        let fields = base_fields(base)?;
        for (i, axis) in axes.iter().enumerate() {
            if !fields.contains_key(&axis.key) {
                let known: Vec<&str> = fields.keys().map(String::as_str).collect();
                bail!(
                    "--grid {}: `{}` is not a training option (options: {})",
                    axis.key,
                    axis.key,
                    known.join(", ")
                );
            }
            if SWEEP_OWNED.contains(&axis.key.as_str()) {
                bail!(
                    "--grid {}: the sweep sets `{}` itself for every cell",
                    axis.key,
                    axis.key
                );
            }
            if axes[..i].iter().any(|a| a.key == axis.key) {
                bail!("--grid {}: the option is given twice", axis.key);
            }
            if axis.key == "seed" && seeds > 1 {
                bail!("--grid seed=… and --seeds {seeds} both set the seed: use one of them");
            }
        }
        let grid = Grid { axes, seeds };
        for axis in &grid.axes {
            for v in &axis.values {
                grid.config_with(base, &[(axis.key.clone(), v.clone())], base.seed)
                    .with_context(|| format!("--grid {}: value {}", axis.key, show_value(v)))?;
            }
        }
        Ok(grid)
    }

    /// Every cell: the cartesian product of the axes (the last axis varying fastest), each with
    /// every seed.
    pub fn cells(&self, base_seed: u64) -> Vec<Cell> {
        let mut combos: Vec<Vec<(String, Value)>> = vec![vec![]];
        for axis in &self.axes {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    axis.values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((axis.key.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let mut cells = vec![];
        for settings in combos {
            for s in 0..self.seeds as u64 {
                let seed = settings
                    .iter()
                    .find(|(k, _)| k == "seed")
                    .and_then(|(_, v)| v.as_u64())
                    .unwrap_or(base_seed + s);
                let name = self.folder_name(&settings, seed);
                cells.push(Cell {
                    settings: settings.clone(),
                    seed,
                    name,
                });
            }
        }
        cells
    }

    /// A readable folder name: `key-value` parts joined by `_`, a value that is long or holds
    /// other characters than letters, digits, `.` and `-` named by its position on its axis.
    fn folder_name(&self, settings: &[(String, Value)], seed: u64) -> String {
        let mut parts = vec![];
        for ((key, v), axis) in settings.iter().zip(&self.axes) {
            if key == "seed" {
                continue;
            }
            let text = show_value(v);
            let plain = text.len() <= 24 && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            let label = if plain {
                text
            } else {
                let i = axis.values.iter().position(|x| x == v).unwrap_or(0);
                format!("v{}", i + 1)
            };
            parts.push(format!("{key}-{label}"));
        }
        parts.push(format!("seed-{seed}"));
        parts.join("_")
    }

    /// The options of a cell: `base` with the cell's settings and seed (output, resume and
    /// overwrite are set by the caller).
    pub fn config_with(&self, base: &TrainConfig, settings: &[(String, Value)], seed: u64) -> Result<TrainConfig> {
        let mut fields = base_fields(base)?;
        fields.insert("seed".into(), Value::from(seed));
        for (key, v) in settings {
            fields.insert(key.clone(), v.clone());
            if serde_json::from_value::<TrainConfig>(Value::Object(fields.clone())).is_err() {
                // `5` for a text option (or `true` for a string): read the value as its text.
                fields.insert(key.clone(), Value::String(show_value(v)));
            }
        }
        let cfg: TrainConfig = serde_json::from_value(Value::Object(fields)).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(cfg)
    }
}

/// The options of `base` as a JSON object (every field, `null` for those not set).
fn base_fields(base: &TrainConfig) -> Result<Map<String, Value>> {
    match serde_json::to_value(base)? {
        Value::Object(m) => Ok(m),
        _ => bail!("training options do not serialise to an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_read_numbers_words_and_json_lists() {
        let a = Axis::parse("num_virtual_tokens=1,5,20").unwrap();
        assert_eq!(a.values, vec![Value::from(1), Value::from(5), Value::from(20)]);
        let a = Axis::parse("init=text, vocab").unwrap();
        assert_eq!(a.values, vec![Value::from("text"), Value::from("vocab")]);
        let a = Axis::parse(r#"template=["a, {text} {label}", "[soft:2]{text} {label}"]"#).unwrap();
        assert_eq!(a.values.len(), 2);
        assert!(Axis::parse("init").is_err());
        assert!(Axis::parse("init=a,,b").is_err());
        assert!(Axis::parse("init=a,a").is_err());
    }

    #[test]
    fn cells_are_the_product_times_seeds_with_readable_names() {
        let base = TrainConfig::default();
        let axes = vec![
            Axis::parse("num_virtual_tokens=1,5").unwrap(),
            Axis::parse("init=text,vocab,random").unwrap(),
        ];
        let grid = Grid::new(axes, 2, &base).unwrap();
        let cells = grid.cells(42);
        assert_eq!(cells.len(), 12);
        assert_eq!(cells[0].name, "num_virtual_tokens-1_init-text_seed-42");
        assert_eq!(cells[1].seed, 43);
        assert_eq!(cells[11].group_label(), "num_virtual_tokens=5 init=random");
        let cfg = grid.config_with(&base, &cells[3].settings, cells[3].seed).unwrap();
        assert_eq!((cfg.num_virtual_tokens, cfg.seed), (1, 43));
        assert_eq!(cfg.init, crate::config::InitKind::Vocab);
    }

    #[test]
    fn a_number_for_a_text_option_is_read_as_text() {
        let base = TrainConfig::default();
        let grid = Grid::new(vec![Axis::parse("init_text=12,ab").unwrap()], 1, &base).unwrap();
        let cells = grid.cells(1);
        let cfg = grid.config_with(&base, &cells[0].settings, 1).unwrap();
        assert_eq!(cfg.init_text.as_deref(), Some("12"));
    }

    #[test]
    fn bad_grids_are_refused_with_the_option_named() {
        let base = TrainConfig::default();
        let err = |axes: Vec<Axis>, seeds| format!("{:#}", Grid::new(axes, seeds, &base).unwrap_err());
        let e = err(vec![Axis::parse("lenght=1,2").unwrap()], 1);
        assert!(e.contains("`lenght` is not a training option"), "{e}");
        let e = err(vec![Axis::parse("output=a,b").unwrap()], 1);
        assert!(e.contains("sets `output` itself"), "{e}");
        let e = err(vec![Axis::parse("init=text,warm").unwrap()], 1);
        assert!(e.contains("--grid init: value warm"), "{e}");
        let e = err(vec![Axis::parse("seed=1,2").unwrap()], 2);
        assert!(e.contains("--seeds 2"), "{e}");
        let e = err(vec![Axis::parse("init=text").unwrap()], 0);
        assert!(e.contains("--seeds is 0"), "{e}");
    }
}
