//! A sweep's plots: the metric against each grid key — a line per combination of the other keys
//! for a numeric key, grouped bars for a categorical one (`plot-KEY.png`).

use anyhow::Result;
use serde_json::Value;
use std::path::Path;

use super::grid::{show_value, Axis, Grid};
use super::report::Group;
use crate::plot::{bar_chart, line_chart, Bar, Point, Series};

/// Longest label drawn on an axis or in a legend; longer values are cut with `…`.
const LABEL_CHARS: usize = 32;

/// Writes one plot per grid key (the seed excepted).
pub fn write_plots(dir: &Path, grid: &Grid, groups: &[Group]) -> Result<()> {
    let y_title = "accuracy (%)";
    for axis in grid.axes.iter().filter(|a| a.key != "seed") {
        let path = dir.join(format!("plot-{}.png", axis.key));
        let title = format!("accuracy vs {}", axis.key);
        let others = |g: &Group| -> String {
            let rest: Vec<String> = g
                .settings
                .iter()
                .filter(|(k, _)| *k != axis.key)
                .map(|(k, v)| {
                    let other = grid.axes.iter().find(|a| a.key == *k).unwrap_or(axis);
                    format!("{k}={}", short(other, v))
                })
                .collect();
            if rest.is_empty() {
                "all".into()
            } else {
                rest.join(" ")
            }
        };
        let value_of = |g: &Group| -> Value {
            g.settings
                .iter()
                .find(|(k, _)| *k == axis.key)
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Null)
        };
        let err = |g: &Group| (g.n > 1).then_some(100.0 * g.std);
        let numbers: Option<Vec<f64>> = axis.values.iter().map(Value::as_f64).collect();
        match numbers {
            Some(xs) => {
                let mut series: Vec<Series> = vec![];
                for g in groups {
                    let Some(x) = value_of(g).as_f64() else { continue };
                    let point = Point {
                        x,
                        y: 100.0 * g.mean,
                        err: err(g),
                    };
                    let name = others(g);
                    match series.iter_mut().find(|s| s.name == name) {
                        Some(s) => s.points.push(point),
                        None => series.push(Series {
                            name,
                            points: vec![point],
                        }),
                    }
                }
                for s in &mut series {
                    s.points.sort_by(|a, b| a.x.total_cmp(&b.x));
                }
                let (lo, hi) = xs.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                let x_log = lo > 0.0 && hi / lo >= 20.0;
                line_chart(&path, &title, &axis.key, y_title, x_log, &series)?;
            }
            None => {
                let bars: Vec<Bar> = groups
                    .iter()
                    .map(|g| Bar {
                        group: short(axis, &value_of(g)),
                        label: others(g),
                        mean: 100.0 * g.mean,
                        err: err(g),
                    })
                    .collect();
                bar_chart(&path, &title, y_title, &bars)?;
            }
        }
    }
    Ok(())
}

/// A value as a label: itself when it has at most `LABEL_CHARS` (32) characters, otherwise `vN`,
/// its position on its axis (results.md lists what each `vN` stands for).
pub fn short(axis: &Axis, v: &Value) -> String {
    let text = show_value(v);
    if text.chars().count() <= LABEL_CHARS {
        return text;
    }
    let i = axis.values.iter().position(|x| x == v).unwrap_or(0);
    format!("v{}", i + 1)
}
