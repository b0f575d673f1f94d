//! [`bar_chart`]: grouped bars, the groups along the x axis, one colour per label.

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

use super::canvas::{color, drawing, message, padded, render, styled_mesh, with_legend, FAMILY};
use super::{Bar, CHART_SIZE};

/// Draws `bars` into the PNG `path` ([`CHART_SIZE`]): the groups, in order of first appearance,
/// along the x axis with their names as tick labels; inside a group one bar per label, side by
/// side, each label with its colour and legend entry; error bars where `err` is given. The y
/// axis starts at zero unless a bar is negative. Bars with a non-finite mean are left out; with
/// none left the chart says "no data".
pub fn bar_chart(path: &Path, title: &str, y_title: &str, bars: &[Bar]) -> Result<()> {
    let bars: Vec<&Bar> = bars.iter().filter(|b| b.mean.is_finite()).collect();
    let mut groups: Vec<&str> = vec![];
    let mut labels: Vec<&str> = vec![];
    for b in &bars {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
        if !labels.contains(&b.label.as_str()) {
            labels.push(&b.label);
        }
    }
    let err = |b: &Bar| b.err.filter(|e| e.is_finite()).unwrap_or(0.0).abs();
    render(path, CHART_SIZE, |root| {
        drawing(root.fill(&WHITE))?;
        if bars.is_empty() {
            return message(root, title, "no data");
        }
        let names: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let plot = with_legend(root, &names)?;
        let lo = bars.iter().map(|b| b.mean - err(b)).fold(0.0, f64::min);
        let hi = bars.iter().map(|b| b.mean + err(b)).fold(0.0, f64::max);
        let (plo, phi) = padded(lo, hi);
        let y = (if lo >= 0.0 { 0.0 } else { plo })..(if hi <= 0.0 { 0.0 } else { phi });
        let n = groups.len();
        let x = -0.5..n as f64 - 0.5;
        let y_start = y.start;
        let mut chart = drawing(
            ChartBuilder::on(&plot)
                .caption(title, (FAMILY, 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x, y),
        )?;
        drawing(
            styled_mesh(&mut chart.configure_mesh(), (17, 14), 200)
                .disable_x_mesh()
                .y_desc(y_title)
                .x_labels(0)
                .draw(),
        )?;
        // The group names under the x axis, centred on their groups (plotters' tick labels
        // would fall on round numbers, not on the groups).
        let name_style = TextStyle::from((FAMILY, 14).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, g) in groups.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64, y_start));
            drawing(plot.draw(&PathElement::new(vec![(px, py), (px, py + 5)], BLACK)))?;
            drawing(plot.draw(&Text::new(g.to_string(), (px, py + 9), name_style.clone())))?;
        }
        let slot = 0.8 / labels.len() as f64;
        for b in &bars {
            let g = groups.iter().position(|g| *g == b.group).unwrap_or(0) as f64;
            let li = labels.iter().position(|l| *l == b.label).unwrap_or(0);
            let c = color(li, labels.len());
            let left = g - 0.4 + slot * li as f64;
            let right = left + slot * 0.92;
            drawing(chart.draw_series(std::iter::once(Rectangle::new(
                [(left, 0.0), (right, b.mean)],
                c.filled(),
            ))))?;
            let e = err(b);
            if e > 0.0 {
                let mid = (left + right) / 2.0;
                let style = ShapeStyle::from(BLACK).stroke_width(2);
                let whisker = vec![(mid, b.mean - e), (mid, b.mean + e)];
                drawing(chart.draw_series(std::iter::once(PathElement::new(whisker, style))))?;
                for end in [b.mean - e, b.mean + e] {
                    let (cx, cy) = chart.backend_coord(&(mid, end));
                    drawing(plot.draw(&PathElement::new(vec![(cx - 4, cy), (cx + 4, cy)], style)))?;
                }
            }
        }
        Ok(())
    })
}
