//! [`line_chart`]: one coloured line with markers and error bars per series, legend on the right.

use anyhow::{bail, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use std::path::Path;

use super::canvas::{color, drawing, message, padded, render, styled_mesh, with_legend, Area, FAMILY};
use super::{Series, CHART_SIZE};

/// A series' name and its finite points as (x, y, error-bar half-height, 0 for none).
type Kept<'a> = (&'a str, Vec<(f64, f64, f64)>);

/// Draws `series` against a linear (or, with `x_log`, logarithmic) x axis into the PNG `path`
/// ([`CHART_SIZE`]), with the axis titles, ticks, a legend naming each series in its colour, a
/// marker per point and an error bar where the point has `err`. Non-finite points are left out;
/// with no point left the chart says "no data". A log axis refuses an `x` that is not positive.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_title: &str,
    y_title: &str,
    x_log: bool,
    series: &[Series],
) -> Result<()> {
    let finite = |v: f64| v.is_finite();
    let kept: Vec<Kept> = series
        .iter()
        .map(|s| {
            let pts = s
                .points
                .iter()
                .filter(|p| finite(p.x) && finite(p.y))
                .map(|p| (p.x, p.y, p.err.filter(|e| e.is_finite()).unwrap_or(0.0).abs()))
                .collect();
            (s.name.as_str(), pts)
        })
        .collect();
    if x_log {
        if let Some(x) = kept.iter().flat_map(|s| &s.1).map(|p| p.0).find(|&x| x <= 0.0) {
            bail!(
                "{}: a log x axis needs positive values, got {x} ({title})",
                path.display()
            );
        }
    }
    let all: Vec<(f64, f64, f64)> = kept.iter().flat_map(|s| s.1.iter().copied()).collect();
    render(path, CHART_SIZE, |root| {
        drawing(root.fill(&WHITE))?;
        if all.is_empty() {
            return message(root, title, "no data");
        }
        let x_lo = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let x_hi = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let y_lo = all.iter().map(|p| p.1 - p.2).fold(f64::INFINITY, f64::min);
        let y_hi = all.iter().map(|p| p.1 + p.2).fold(f64::NEG_INFINITY, f64::max);
        let names: Vec<String> = kept.iter().map(|s| s.0.to_string()).collect();
        let plot = with_legend(root, &names)?;
        let y = padded(y_lo, y_hi);
        if x_log {
            let (lo, hi) = if x_hi / x_lo < 1.0 + 1e-9 {
                (x_lo / 2.0, x_hi * 2.0)
            } else {
                (x_lo / 1.2, x_hi * 1.2)
            };
            draw_lines(&plot, (lo..hi).log_scale(), y.0..y.1, title, x_title, y_title, &kept)
        } else {
            let x = padded(x_lo, x_hi);
            draw_lines(&plot, x.0..x.1, y.0..y.1, title, x_title, y_title, &kept)
        }
    })
}

/// The chart itself on `area`, for either kind of x coordinate.
fn draw_lines<X>(
    area: &Area,
    x: X,
    y: std::ops::Range<f64>,
    title: &str,
    x_title: &str,
    y_title: &str,
    series: &[Kept],
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = drawing(
        ChartBuilder::on(area)
            .caption(title, (FAMILY, 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x, y),
    )?;
    drawing(
        styled_mesh(&mut chart.configure_mesh(), (17, 14), 200)
            .x_desc(x_title)
            .y_desc(y_title)
            .draw(),
    )?;
    for (i, (_, pts)) in series.iter().enumerate() {
        let c = color(i, series.len());
        let style = ShapeStyle::from(c).stroke_width(2);
        drawing(chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), style)))?;
        drawing(chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled()))))?;
        for &(px, py, e) in pts.iter().filter(|p| p.2 > 0.0) {
            drawing(chart.draw_series(std::iter::once(PathElement::new(
                vec![(px, py - e), (px, py + e)],
                style,
            ))))?;
            // Caps: short horizontal strokes in pixels around the bar's ends.
            for end in [py - e, py + e] {
                let (cx, cy) = chart.backend_coord(&(px, end));
                let cap = PathElement::new(vec![(cx - 5, cy), (cx + 5, cy)], style);
                drawing(area.draw(&cap))?;
            }
        }
    }
    Ok(())
}
