//! A small PNG plot of the run: training loss (top panel, blue) and dev accuracy (bottom panel,
//! red), each with its range written on the axis in a built-in 3×5 pixel font.

use anyhow::{Context, Result};
use std::path::Path;

const W: usize = 640;
const H: usize = 480;
const MARGIN: usize = 48;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..2 {
                            for dx in 0..2 {
                                self.set(x + i as i64 * 8 + col as i64 * 2 + dx, y + row as i64 * 2 + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3×5 glyphs for digits, a few letters and punctuation (unknown characters are blank).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '%' => [5, 1, 2, 4, 5],
        '-' => [0, 0, 7, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'C' => [7, 4, 4, 4, 7],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'L' => [4, 4, 4, 4, 7],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'V' => [5, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

/// One panel of the plot: its vertical extent, series style and title.
struct Panel<'a> {
    top: usize,
    bottom: usize,
    color: [u8; 3],
    title: &'a str,
    percent: bool,
}

fn panel(c: &mut Canvas, spec: Panel, points: &[(f64, f64)], x_max: f64) {
    let Panel {
        top,
        bottom,
        color,
        title,
        percent,
    } = spec;
    let (left, right) = (MARGIN as i64, (W - 16) as i64);
    let (t, b) = (top as i64, bottom as i64);
    let axis = [90, 90, 90];
    c.line((left, t), (left, b), axis);
    c.line((left, b), (right, b), axis);
    c.text(left + 8, t - 14, title, [0, 0, 0]);
    if points.is_empty() {
        return;
    }
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = if percent { 0.05 } else { 0.5 };
    let (lo, hi) = if hi - lo < 1e-9 { (lo - pad, hi + pad) } else { (lo, hi) };
    let (lo, hi) = if percent { (lo.max(0.0), hi.min(1.0)) } else { (lo, hi) };
    let fmt = |v: f64| {
        if percent {
            format!("{:.1}%", v * 100.0)
        } else {
            format!("{v:.2}")
        }
    };
    c.text(2, t, &fmt(hi), [0, 0, 0]);
    c.text(2, b - 10, &fmt(lo), [0, 0, 0]);
    c.text(right - 40, b + 6, &format!("{x_max:.0}"), [0, 0, 0]);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = left + ((x / x_max.max(1.0)) * (right - left) as f64) as i64;
        let py = b - (((y - lo) / (hi - lo)) * (b - t) as f64) as i64;
        (px, py)
    };
    for w in points.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), color);
    }
    // Markers only where there are few points (evaluations), not on the per-step loss.
    for &p in points.iter().filter(|_| points.len() <= 40) {
        let (x, y) = to_px(p);
        for dy in -2..=2 {
            for dx in -2..=2 {
                c.set(x + dx, y + dy, color);
            }
        }
    }
}

/// Writes the plot of `losses` (step, loss) and `dev` (step, accuracy) to `path` atomically.
pub fn write_plot(path: &Path, losses: &[(usize, f32)], dev: &[(usize, f64)]) -> Result<()> {
    let mut c = Canvas {
        px: vec![[255, 255, 255]; W * H],
    };
    let x_max = losses
        .iter()
        .map(|p| p.0)
        .chain(dev.iter().map(|p| p.0))
        .max()
        .unwrap_or(1) as f64;
    // Smooth the loss with a running mean over 10 steps so the trend is visible.
    let smooth: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let from = i.saturating_sub(9);
            let mean = losses[from..=i].iter().map(|p| p.1 as f64).sum::<f64>() / (i - from + 1) as f64;
            (s as f64, mean)
        })
        .collect();
    let loss_panel = Panel {
        top: 24,
        bottom: H / 2 - 16,
        color: [30, 80, 200],
        title: "LOSS",
        percent: false,
    };
    panel(&mut c, loss_panel, &smooth, x_max);
    let acc: Vec<(f64, f64)> = dev.iter().map(|&(s, a)| (s as f64, a)).collect();
    let acc_panel = Panel {
        top: H / 2 + 24,
        bottom: H - 24,
        color: [200, 40, 40],
        title: "DEV ACC",
        percent: true,
    };
    panel(&mut c, acc_panel, &acc, x_max);
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("cannot encode the plot")?;
        let flat: Vec<u8> = c.px.iter().flatten().copied().collect();
        w.write_image_data(&flat).context("cannot encode the plot")?;
    }
    crate::io::write_bytes(path, &bytes)
}
