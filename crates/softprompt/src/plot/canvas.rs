//! What every chart shares: the embedded font, the palette, the in-memory bitmap and its atomic
//! PNG encoding, value formatting and the "no data" chart.

use anyhow::{anyhow, Context, Result};
use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::Ranged;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (Bitstream Vera licence, `assets/fonts/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The font family every text element names.
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font(FAMILY, style, FONT).is_err() {
                result = Err(anyhow!("the embedded font DejaVuSans.ttf cannot be read"));
            }
        }
    });
    result
}

/// The drawing area a chart draws on.
pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Renders `draw` on a white `size` bitmap and writes it to `path` as PNG, atomically.
pub fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    register_font()?;
    let (w, h) = size;
    let mut pixels = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        draw(&root).with_context(|| format!("cannot draw {}", path.display()))?;
        root.present()
            .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("cannot encode the chart as PNG")?;
        writer
            .write_image_data(&pixels)
            .context("cannot encode the chart as PNG")?;
    }
    crate::io::write_bytes(path, &bytes)
}

/// A tick label: [`format_value`] of the tick's value.
fn tick_label(v: &f64) -> String {
    format_value(*v)
}

/// The axes every chart draws: axis titles and tick labels in the embedded font at
/// `(title_size, label_size)`, numbers through [`format_value`], the major grid lines only, in
/// grey `grid` (0–255). Callers add their axis titles and anything particular to their chart.
pub fn styled_mesh<'m, 'a, 'b, X, Y, DB>(
    mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>,
    (title_size, label_size): (u32, u32),
    grid: u8,
) -> &'m mut MeshStyle<'a, 'b, X, Y, DB>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    DB: DrawingBackend,
{
    mesh.axis_desc_style((FAMILY, title_size))
        .label_style((FAMILY, label_size))
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(grid, grid, grid))
}

/// Turns a plotters error into an `anyhow` one.
pub fn drawing<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("plotting failed: {e}"))
}

/// Tableau's ten categorical colours: distinguishable, also in greyscale order of luminance.
const TABLEAU: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Colour `i` of `n`: Tableau's ten when they suffice, otherwise `n` hues spread evenly around
/// the colour wheel (every colour distinct).
pub fn color(i: usize, n: usize) -> RGBColor {
    if n <= TABLEAU.len() {
        let (r, g, b) = TABLEAU[i % TABLEAU.len()];
        return RGBColor(r, g, b);
    }
    let hsl = HSLColor(i as f64 / n as f64, 0.75, if i.is_multiple_of(2) { 0.40 } else { 0.55 });
    let (r, g, b) = hsl.rgb();
    RGBColor(r, g, b)
}

/// A tick label: few significant digits, no trailing zeros.
pub fn format_value(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A value range padded by 5% on each side (±1 around a single value), from finite bounds.
pub fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1.0 { lo.abs() * 0.05 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Draws `title` and a centred `message` (e.g. "no data") on `area`.
pub fn message(area: &Area, title: &str, text: &str) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let center = |size: i32| {
        TextStyle::from((FAMILY, size).into_font())
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ))
    };
    drawing(area.draw(&Text::new(title.to_string(), (w as i32 / 2, 24), center(22))))?;
    drawing(area.draw(&Text::new(text.to_string(), (w as i32 / 2, h as i32 / 2), center(28))))?;
    Ok(())
}

/// Splits `root` into the plot area (returned) and a legend column on the right naming `names`,
/// entry `i` in colour [`color`]`(i, names.len())`.
pub fn with_legend<'a>(root: &Area<'a>, names: &[String]) -> Result<Area<'a>> {
    let width = root.dim_in_pixel().0;
    let (plot, side) = root.split_horizontally(width - legend_width(names, width));
    let entries: Vec<(String, RGBColor)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), color(i, names.len())))
        .collect();
    legend(&side, &entries)?;
    Ok(plot)
}

/// Draws a legend (colour swatch + name per entry) in a column on `area`; entries that do not
/// fit are summarised as "… and N more".
fn legend(area: &Area, entries: &[(String, RGBColor)]) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let max_chars = ((w as usize).saturating_sub(46) * 2 / 17).max(4);
    let row = 22;
    let fits = ((h as i32 - 60) / row).max(1) as usize;
    let shown = if entries.len() > fits { fits - 1 } else { entries.len() };
    let style = TextStyle::from((FAMILY, 15).into_font()).color(&BLACK);
    let mut y = 60;
    for (name, c) in &entries[..shown] {
        drawing(area.draw(&Rectangle::new([(8, y - 6), (30, y + 6)], c.filled())))?;
        let name = if name.chars().count() > max_chars {
            let cut: String = name.chars().take(max_chars - 1).collect();
            format!("{cut}…")
        } else {
            name.clone()
        };
        drawing(area.draw(&Text::new(name, (38, y - 9), style.clone())))?;
        y += row;
    }
    if shown < entries.len() {
        let more = format!("… and {} more", entries.len() - shown);
        drawing(area.draw(&Text::new(more, (38, y - 9), style)))?;
    }
    Ok(())
}

/// Width in pixels of a legend column for `names` (about 8.5 px per character at 15 px, plus the
/// swatch), at most a third of `width`.
fn legend_width(names: &[String], width: u32) -> u32 {
    let chars = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    (50 + chars * 17 / 2).min(width / 3)
}
