//! Charts as PNG files, drawn with [plotters](https://docs.rs/plotters): line charts (a sweep's
//! metric against a numeric key, log x axis optional), grouped bar charts (against a categorical
//! key) and the training plot (`training.png`: loss with its moving average, dev accuracy).
//!
//! Text is drawn with DejaVu Sans, embedded in the library (`assets/fonts`, Bitstream Vera
//! licence beside it) and handed to plotters' `ab_glyph` renderer, so no system font is looked
//! up: the charts look the same on a bare CI machine. A chart is rendered into memory, encoded
//! as PNG and written atomically (a temporary file in the same folder, then a rename). A chart
//! with nothing to draw says "no data" instead of failing, so a sweep's first partial report
//! still gets its plots.

mod bar;
mod canvas;
mod line;
mod training;

pub use bar::bar_chart;
pub use line::line_chart;
pub use training::{ema, training_chart, EMA_ALPHA};

/// Width and height in pixels of [`line_chart`] and [`bar_chart`] images.
pub const CHART_SIZE: (u32, u32) = (960, 560);
/// Width and height in pixels of [`training_chart`] images.
pub const TRAINING_SIZE: (u32, u32) = (900, 640);

/// One named line of a [`line_chart`], one colour and one legend entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend's text for this line.
    pub name: String,
    /// The points, drawn in the given order (sort them by `x`).
    pub points: Vec<Point>,
}

/// A point of a [`Series`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Horizontal position (must be positive on a log axis).
    pub x: f64,
    /// Vertical position.
    pub y: f64,
    /// Half-height of an error bar drawn around `y` (e.g. the standard deviation over seeds).
    pub err: Option<f64>,
}

/// One bar of a [`bar_chart`]: bars of the same `group` stand side by side above the group's
/// name; bars of the same `label` share a colour and a legend entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// The x-axis category the bar stands in.
    pub group: String,
    /// The legend entry (colour) of the bar.
    pub label: String,
    /// The bar's height.
    pub mean: f64,
    /// Half-height of an error bar drawn on the bar's top (e.g. the standard deviation).
    pub err: Option<f64>,
}
