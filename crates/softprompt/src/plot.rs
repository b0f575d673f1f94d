//! TEMPORARY shim until the plotters module lands (not to be committed).
#![allow(missing_docs)]
use anyhow::Result;
use std::path::Path;
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub err: Option<f64>,
}
pub fn line_chart(
    _path: &Path,
    _title: &str,
    _x_title: &str,
    _y_title: &str,
    _x_log: bool,
    _series: &[Series],
) -> Result<()> {
    Ok(())
}
pub struct Bar {
    pub group: String,
    pub label: String,
    pub mean: f64,
    pub err: Option<f64>,
}
pub fn bar_chart(_path: &Path, _title: &str, _y_title: &str, _bars: &[Bar]) -> Result<()> {
    Ok(())
}
