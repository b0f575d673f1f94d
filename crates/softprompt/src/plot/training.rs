//! [`training_chart`]: `training.png`, the training loss (raw, faint, with its exponential
//! moving average) above the dev accuracy (line with markers), sharing the step axis.

use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use std::ops::Range;

use super::canvas::{drawing, message, padded, render, styled_mesh, Area, FAMILY};
use super::TRAINING_SIZE;

/// Weight of the newest loss in the moving average drawn over the raw loss.
pub const EMA_ALPHA: f64 = 0.1;

/// The exponential moving average of `values` (`m_0 = v_0`, `m_i = α v_i + (1 − α) m_{i−1}`).
pub fn ema(values: &[f64], alpha: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut m = None;
    for &v in values {
        let next = match m {
            None => v,
            Some(prev) => alpha * v + (1.0 - alpha) * prev,
        };
        m = Some(next);
        out.push(next);
    }
    out
}

/// Writes the training plot to the PNG `path` ([`TRAINING_SIZE`]): top panel the loss per
/// optimiser step (`losses`: step, loss) in light blue with its moving average ([`EMA_ALPHA`])
/// in dark blue; bottom panel the dev accuracy (`dev`: step, accuracy in [0, 1]) in percent with
/// a marker per evaluation. A panel with nothing to show says so.
pub fn training_chart(path: &Path, losses: &[(usize, f32)], dev: &[(usize, f64)]) -> Result<()> {
    let loss: Vec<(f64, f64)> = losses
        .iter()
        .map(|&(s, l)| (s as f64, l as f64))
        .filter(|p| p.1.is_finite())
        .collect();
    let acc: Vec<(f64, f64)> = dev
        .iter()
        .map(|&(s, a)| (s as f64, 100.0 * a))
        .filter(|p| p.1.is_finite())
        .collect();
    let x_max = loss.iter().chain(&acc).map(|p| p.0).fold(1.0, f64::max);
    render(path, TRAINING_SIZE, |root| {
        drawing(root.fill(&WHITE))?;
        let (top, bottom) = root.split_vertically(TRAINING_SIZE.1 / 2);
        loss_panel(&top, &loss, x_max)?;
        dev_panel(&bottom, &acc, x_max)
    })
}

/// The upper panel: raw loss and its moving average.
fn loss_panel(area: &Area, loss: &[(f64, f64)], x_max: f64) -> Result<()> {
    let title = "training loss";
    if loss.is_empty() {
        return message(area, title, "no training steps");
    }
    let lo = loss.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = loss.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = padded(lo, hi);
    let mut chart = panel(area, title, "loss", x_max, lo..hi)?;
    let raw = RGBColor(150, 190, 235);
    let smooth = RGBColor(20, 70, 170);
    drawing(chart.draw_series(LineSeries::new(
        loss.iter().copied(),
        ShapeStyle::from(raw).stroke_width(1),
    )))?
    .label("loss")
    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw.stroke_width(2)));
    let values: Vec<f64> = loss.iter().map(|p| p.1).collect();
    let avg = ema(&values, EMA_ALPHA);
    let line = loss.iter().zip(avg).map(|(p, m)| (p.0, m));
    drawing(chart.draw_series(LineSeries::new(line, ShapeStyle::from(smooth).stroke_width(3))))?
        .label(format!("moving average (EMA, α = {EMA_ALPHA})"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], smooth.stroke_width(3)));
    drawing(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw(),
    )
}

/// The lower panel: dev accuracy in percent with a marker per evaluation.
fn dev_panel(area: &Area, acc: &[(f64, f64)], x_max: f64) -> Result<()> {
    let title = "dev accuracy";
    if acc.is_empty() {
        return message(area, title, "no dev evaluation");
    }
    let lo = acc.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = acc.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = padded(lo, hi);
    let (lo, hi) = (lo.max(0.0), hi.min(100.0).max(lo.max(0.0) + 1.0));
    let mut chart = panel(area, title, "accuracy (%)", x_max, lo..hi)?;
    let red = RGBColor(200, 40, 40);
    drawing(chart.draw_series(LineSeries::new(
        acc.iter().copied(),
        ShapeStyle::from(red).stroke_width(2),
    )))?;
    drawing(chart.draw_series(acc.iter().map(|&p| Circle::new(p, 5, red.filled()))))?;
    Ok(())
}

/// One panel's chart: its caption, the step axis `0..x_max`, the value axis `y` titled `y_title`.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    y_title: &str,
    x_max: f64,
    y: Range<f64>,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = drawing(
        ChartBuilder::on(area)
            .caption(title, (FAMILY, 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, y),
    )?;
    drawing(
        styled_mesh(&mut chart.configure_mesh(), (16, 13), 205)
            .x_desc("step")
            .y_desc(y_title)
            .draw(),
    )?;
    Ok(chart)
}
