//! The charts: each kind renders a PNG of the documented size with something drawn on it,
//! many series get distinct colours, empty input gives a "no data" chart, bad input an error.

mod common;
use softprompt::plot::{bar_chart, line_chart, training_chart, Bar, Point, Series, CHART_SIZE, TRAINING_SIZE};
use std::path::Path;

/// Decodes an RGB PNG: (width, height, pixels).
fn read_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn count(px: &[[u8; 3]], c: [u8; 3]) -> usize {
    px.iter().filter(|p| **p == c).count()
}

fn dark(px: &[[u8; 3]]) -> usize {
    px.iter().filter(|p| p.iter().all(|&v| v < 80)).count()
}

/// Only the chart itself is left in the folder (the temporary file was renamed).
fn only_file(dir: &Path, name: &str) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![name.to_string()]);
}

const TABLEAU: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

#[test]
fn eight_series_line_chart_has_eight_colours_error_bars_and_text() {
    let tmp = common::scratch("plots-line");
    let dir = tmp.path();
    let path = dir.join("lines.png");
    let series: Vec<Series> = (0..8)
        .map(|s| Series {
            name: format!("init=vocab lr=0.{s} seeds=2"),
            points: [1.0, 5.0, 20.0, 50.0]
                .iter()
                .enumerate()
                .map(|(i, &x)| Point {
                    x,
                    y: 50.0 + 5.0 * s as f64 + 3.0 * i as f64,
                    err: Some(2.0),
                })
                .collect(),
        })
        .collect();
    line_chart(
        &path,
        "accuracy vs num_virtual_tokens",
        "num_virtual_tokens",
        "accuracy (%)",
        true,
        &series,
    )
    .unwrap();
    let (w, h, px) = read_png(&path);
    assert_eq!((w, h), CHART_SIZE);
    for (i, c) in TABLEAU.iter().enumerate() {
        // Legend swatch (23×13 = 299 px) plus the line and markers.
        assert!(
            count(&px, *c) > 300,
            "series {i} colour {c:?} drawn on {} px",
            count(&px, *c)
        );
    }
    assert!(dark(&px) > 2000, "titles, ticks and legend text: {} dark px", dark(&px));
    only_file(dir, "lines.png");
}

#[test]
fn more_series_than_the_palette_still_get_distinct_colours() {
    let tmp = common::scratch("plots-many");
    let dir = tmp.path();
    let path = dir.join("many.png");
    let series: Vec<Series> = (0..14)
        .map(|s| Series {
            name: format!("s{s}"),
            points: vec![
                Point {
                    x: 0.0,
                    y: s as f64,
                    err: None,
                },
                Point {
                    x: 1.0,
                    y: s as f64 + 1.0,
                    err: None,
                },
            ],
        })
        .collect();
    line_chart(&path, "many", "x", "y", false, &series).unwrap();
    let (_, _, px) = read_png(&path);
    let mut colours: Vec<[u8; 3]> = px.clone();
    colours.sort();
    colours.dedup();
    // Each series' swatch is a solid rectangle of its own colour.
    let solid = colours
        .iter()
        .filter(|c| count(&px, **c) >= 250 && c.iter().any(|&v| v != c[0]))
        .count();
    assert!(solid >= 14, "only {solid} distinct saturated colours for 14 series");
}

#[test]
fn bar_chart_draws_each_label_in_its_colour() {
    let tmp = common::scratch("plots-bar");
    let dir = tmp.path();
    let path = dir.join("bars.png");
    let mut bars = vec![];
    for group in ["random", "vocab", "labels", "text"] {
        for (j, label) in ["len=5", "len=20"].iter().enumerate() {
            bars.push(Bar {
                group: group.into(),
                label: label.to_string(),
                mean: 60.0 + 10.0 * j as f64,
                err: Some(3.0),
            });
        }
    }
    bar_chart(&path, "accuracy vs init", "accuracy (%)", &bars).unwrap();
    let (w, h, px) = read_png(&path);
    assert_eq!((w, h), CHART_SIZE);
    // Eight bars of two colours: each colour covers far more than its legend swatch.
    assert!(count(&px, TABLEAU[0]) > 5000, "{}", count(&px, TABLEAU[0]));
    assert!(count(&px, TABLEAU[1]) > 5000, "{}", count(&px, TABLEAU[1]));
    assert!(dark(&px) > 1000);
    only_file(dir, "bars.png");
}

#[test]
fn empty_or_non_finite_input_gives_a_no_data_chart() {
    let tmp = common::scratch("plots-empty");
    let dir = tmp.path();
    line_chart(&dir.join("a.png"), "t", "x", "y", true, &[]).unwrap();
    let nan = Series {
        name: "nan".into(),
        points: vec![Point {
            x: 1.0,
            y: f64::NAN,
            err: None,
        }],
    };
    line_chart(&dir.join("b.png"), "t", "x", "y", false, &[nan]).unwrap();
    bar_chart(&dir.join("c.png"), "t", "y", &[]).unwrap();
    training_chart(&dir.join("d.png"), &[], &[]).unwrap();
    for name in ["a.png", "b.png", "c.png"] {
        let (w, h, px) = read_png(&dir.join(name));
        assert_eq!((w, h), CHART_SIZE);
        // "no data" is written in the middle of the image.
        let (w, h) = (w as usize, h as usize);
        let middle = (h / 3..2 * h / 3)
            .flat_map(|y| px[y * w + w / 3..y * w + 2 * w / 3].to_vec())
            .collect::<Vec<_>>();
        assert!(dark(&middle) > 100, "{name}: no text in the middle");
    }
    let (w, h, px) = read_png(&dir.join("d.png"));
    assert_eq!((w, h), TRAINING_SIZE);
    assert!(dark(&px) > 100);
}

#[test]
fn bad_input_and_bad_paths_are_errors_naming_the_file() {
    let tmp = common::scratch("plots-bad");
    let dir = tmp.path();
    let s = Series {
        name: "zero".into(),
        points: vec![Point {
            x: 0.0,
            y: 1.0,
            err: None,
        }],
    };
    let path = dir.join("log.png");
    let e = format!("{:#}", line_chart(&path, "t", "x", "y", true, &[s]).unwrap_err());
    assert!(e.contains("log.png") && e.contains("positive"), "{e}");
    let missing = dir.join("no-such-folder").join("x.png");
    let e = format!("{:#}", bar_chart(&missing, "t", "y", &[]).unwrap_err());
    assert!(e.contains("x.png"), "{e}");
    assert!(std::fs::read_dir(dir).unwrap().next().is_none(), "nothing left behind");
}

#[test]
fn training_chart_draws_raw_loss_its_average_and_dev_markers() {
    let tmp = common::scratch("plots-training");
    let dir = tmp.path();
    let path = dir.join("training.png");
    let losses: Vec<(usize, f32)> = (1..=200)
        .map(|s| (s, 3.0 / (1.0 + s as f32 / 20.0) + 0.3 * ((s * 7) % 5) as f32 / 5.0))
        .collect();
    let dev: Vec<(usize, f64)> = (1..=5).map(|i| (i * 40, 0.5 + 0.08 * i as f64)).collect();
    training_chart(&path, &losses, &dev).unwrap();
    let (w, h, px) = read_png(&path);
    assert_eq!((w, h), TRAINING_SIZE);
    let (w, h) = (w as usize, h as usize);
    let raw = [150, 190, 235];
    let smooth = [20, 70, 170];
    let red = [200, 40, 40];
    let top: Vec<[u8; 3]> = px[..w * h / 2].to_vec();
    let bottom: Vec<[u8; 3]> = px[w * h / 2..].to_vec();
    assert!(count(&top, raw) > 200, "raw loss {}", count(&top, raw));
    assert!(count(&top, smooth) > 500, "smoothed loss {}", count(&top, smooth));
    assert!(count(&bottom, red) > 5 * 60, "dev markers {}", count(&bottom, red));
    assert_eq!(count(&top, red), 0);
    only_file(dir, "training.png");
}

#[test]
fn ema_smooths_from_the_first_value() {
    let m = softprompt::plot::ema(&[1.0, 0.0, 0.0], 0.5);
    assert_eq!(m, vec![1.0, 0.5, 0.25]);
}
