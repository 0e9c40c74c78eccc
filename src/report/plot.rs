//! Training curves as PNG: `curves.png` in the run directory, redrawn at every epoch end from
//! `metrics.jsonl`. One panel per quantity against the step: the training loss (for GANs both
//! players, `d_loss` and `g_loss`, in one panel, and `d_real` / `d_fake` in another), every
//! other logged training figure, and every epoch-end evaluation figure (test -ELBO, bits/dim,
//! mode coverage, MNIST-FID, ...). Drawn with the `image` crate and the public-domain 8x8
//! bitmap font of `font8x8`, so no system font is needed.

use std::collections::BTreeMap;
use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// One curve.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title and its curves.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 280;
const LEFT: i64 = 90;
const RIGHT: i64 = 20;
const TOP: i64 = 30;
const BOTTOM: i64 = 40;
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Fields of a metrics line that are bookkeeping, not curves.
const SKIP: [&str; 6] = [
    "step",
    "epoch",
    "wall_s",
    "eval_s",
    "samples_per_s",
    "skipped_steps",
];

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Text with the 8x8 font, top-left at `(x, y)`; non-ASCII characters print as `?`.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            b'?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    put(img, x + 8 * i as i64 + col, y + row as i64, c);
                }
            }
        }
    }
}

/// A line from `a` to `b` (Bresenham), two pixels thick vertically.
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    let (mut x, mut y) = a;
    let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
    let (sx, sy) = (
        if a.0 < b.0 { 1 } else { -1 },
        if a.1 < b.1 { 1 } else { -1 },
    );
    let mut err = dx + dy;
    loop {
        put(img, x, y, c);
        put(img, x, y + 1, c);
        if (x, y) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// The value axis for data spanning `[lo, hi]`: 5% of margin on each side; a constant series
/// gets half its own magnitude on each side (a learning rate of 0.001 used to be drawn on a
/// +-0.05 axis, where it read as 0).
pub fn value_axis(lo: f64, hi: f64) -> (f64, f64) {
    let (lo, hi) = if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.5 };
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    };
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// About five round tick values covering `[lo, hi]`.
pub fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

/// A tick label: short, without trailing zeros.
pub fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn draw_panel(img: &mut RgbImage, top: i64, panel: &Panel) {
    let (x0, x1) = (LEFT, WIDTH as i64 - RIGHT);
    let (y0, y1) = (top + TOP, top + PANEL_HEIGHT as i64 - BOTTOM);
    text(img, LEFT, top + 10, &panel.title, INK);
    let pts = panel.series.iter().flat_map(|s| s.points.iter());
    let finite: Vec<&(f64, f64)> = pts.filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if finite.is_empty() {
        text(img, LEFT + 10, y0 + 20, "(no finite values yet)", INK);
        return;
    }
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in &finite {
        xlo = xlo.min(p.0);
        xhi = xhi.max(p.0);
        ylo = ylo.min(p.1);
        yhi = yhi.max(p.1);
    }
    if xhi <= xlo {
        xhi = xlo + 1.0;
    }
    let (ylo, yhi) = value_axis(ylo, yhi);
    let sx = |x: f64| x0 + ((x - xlo) / (xhi - xlo) * (x1 - x0) as f64).round() as i64;
    let sy = |y: f64| y1 - ((y - ylo) / (yhi - ylo) * (y1 - y0) as f64).round() as i64;
    for t in ticks(ylo, yhi) {
        let y = sy(t);
        line(img, (x0, y), (x1, y), GRID);
        let l = label(t);
        text(img, x0 - 6 - 8 * l.len() as i64, y - 4, &l, INK);
    }
    for t in ticks(xlo, xhi) {
        let x = sx(t);
        line(img, (x, y0), (x, y1), GRID);
        let l = label(t);
        text(img, x - 4 * l.len() as i64, y1 + 8, &l, INK);
    }
    line(img, (x0, y0), (x0, y1), INK);
    line(img, (x0, y1), (x1, y1), INK);
    text(img, (x0 + x1) / 2 - 16, y1 + 24, "step", INK);
    for (i, s) in panel.series.iter().enumerate() {
        let c = Rgb(COLOURS[i % COLOURS.len()]);
        let mut prev: Option<(i64, i64)> = None;
        for p in &s.points {
            if !(p.0.is_finite() && p.1.is_finite()) {
                prev = None;
                continue;
            }
            let q = (sx(p.0), sy(p.1));
            match prev {
                Some(a) => line(img, a, q, c),
                None => {
                    for d in -1..=1 {
                        put(img, q.0 + d, q.1, c);
                    }
                }
            }
            prev = Some(q);
        }
        if panel.series.len() > 1 {
            let lx = x1 - 8 * 18;
            let ly = y0 + 4 + 12 * i as i64;
            line(img, (lx, ly + 3), (lx + 16, ly + 3), c);
            text(img, lx + 22, ly, &s.name, INK);
        }
    }
}

/// Draws `panels` stacked vertically into `path`.
pub fn write_panels(path: &Path, panels: &[Panel]) -> Result<()> {
    let height = PANEL_HEIGHT * panels.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(WIDTH, height, Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut img, i as i64 * PANEL_HEIGHT as i64, p);
    }
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The panels of a `metrics.jsonl` text: training figures (players grouped) and evaluation
/// figures, each against the step.
pub fn panels_from_metrics(jsonl: &str) -> Vec<Panel> {
    let mut train: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut eval: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for l in jsonl.lines() {
        let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(l) else {
            continue; // a torn last line of a killed run
        };
        let Some(step) = o.get("step").and_then(|v| v.as_f64()) else {
            continue;
        };
        let into = match o.get("event").and_then(|v| v.as_str()) {
            Some("train") => &mut train,
            Some("eval") => &mut eval,
            _ => continue,
        };
        for (k, v) in &o {
            if let Some(v) = v.as_f64() {
                if !SKIP.contains(&k.as_str()) {
                    into.entry(k.clone()).or_default().push((step, v));
                }
            }
        }
    }
    let mut panels = Vec::new();
    let mut take_group =
        |map: &mut BTreeMap<String, Vec<(f64, f64)>>, names: &[&str], title: &str| {
            if names.iter().all(|n| map.contains_key(*n)) {
                panels.push(Panel {
                    title: title.into(),
                    series: names
                        .iter()
                        .map(|n| Series {
                            name: n.to_string(),
                            points: map.remove(*n).unwrap_or_default(),
                        })
                        .collect(),
                });
                true
            } else {
                false
            }
        };
    if take_group(
        &mut train,
        &["d_loss", "g_loss"],
        "GAN losses (both players)",
    ) {
        train.remove("loss"); // the same as d_loss
        take_group(
            &mut train,
            &["d_real", "d_fake"],
            "mean D(x) on real and generated rows",
        );
    } else {
        take_group(&mut train, &["loss"], "training loss");
    }
    for (prefix, map) in [("training", train), ("evaluation", eval)] {
        for (name, points) in map {
            panels.push(Panel {
                title: format!("{prefix}: {name}"),
                series: vec![Series { name, points }],
            });
        }
    }
    panels
}

/// Redraws `curves.png` in `run_dir` from its `metrics.jsonl`.
pub fn write_training_curves(run_dir: &Path) -> Result<()> {
    let src = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
    let panels = panels_from_metrics(&text);
    if panels.is_empty() {
        return Ok(());
    }
    write_panels(&run_dir.join("curves.png"), &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_series_is_drawn_on_an_axis_of_its_own_size() {
        let (lo, hi) = value_axis(0.001, 0.001);
        assert!(lo > 0.0 && hi < 0.002, "{lo} {hi}");
        let t = ticks(lo, hi);
        assert!(t.len() >= 2 && t.iter().all(|v| *v > 0.0), "{t:?}");
        assert!(t.iter().any(|v| label(*v) == "0.001"), "{t:?}");
        let (lo, hi) = value_axis(0.0, 0.0);
        assert!(lo < 0.0 && hi > 0.0);
        let (lo, hi) = value_axis(1.0, 3.0);
        assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12);
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(-3.3, 97.0);
        assert!(t.len() >= 4 && t.len() <= 7, "{t:?}");
        assert!(t.iter().all(|v| (-3.3..=97.0).contains(v)));
        assert_eq!(label(2.5), "2.5");
        assert_eq!(label(-0.0), "0");
        assert_eq!(label(120000.0), "1.2e5");
    }

    #[test]
    fn gan_metrics_give_player_panels_and_the_image_is_drawn() {
        let jsonl = [
            r#"{"event":"train","step":10,"epoch":0.1,"loss":1.3,"d_loss":1.3,"g_loss":0.8,"d_real":0.1,"d_fake":-0.1,"lr":0.001}"#,
            r#"{"event":"train","step":20,"epoch":0.2,"loss":1.2,"d_loss":1.2,"g_loss":0.9,"d_real":0.2,"d_fake":-0.2,"lr":0.001}"#,
            r#"{"event":"eval","step":20,"epoch":1.0,"modes_covered":3,"eval_s":0.1}"#,
            r#"{"event":"tr"#,
        ]
        .join("\n");
        let panels = panels_from_metrics(&jsonl);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "GAN losses (both players)",
                "mean D(x) on real and generated rows",
                "training: lr",
                "evaluation: modes_covered"
            ]
        );
        assert_eq!(panels[0].series[1].points, vec![(10.0, 0.8), (20.0, 0.9)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        write_panels(&path, &panels).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, 4 * PANEL_HEIGHT));
        // Both player colours appear.
        for c in &COLOURS[..2] {
            assert!(img.pixels().any(|p| p.0 == *c), "colour {c:?} missing");
        }
    }
}
