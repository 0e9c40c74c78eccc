//! Training curves as PNG: `curves.png` in the run directory, redrawn at every epoch end from
//! `metrics.jsonl`. One panel per quantity against the step: the training loss (for GANs both
//! players, `d_loss` and `g_loss`, in one panel, and `d_real` / `d_fake` in another), every
//! other logged training figure, and every epoch-end evaluation figure (test -ELBO, bits/dim,
//! mode coverage, MNIST-FID, ...). Drawn with `plotters` on its bitmap backend, with text set by
//! `ab_glyph` in DejaVu Sans, which is compiled in (the `dejavu` crate): no system font,
//! fontconfig or freetype is needed. The pixels are encoded by the `image` crate.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, Glyph, PxScale, ScaleFont};
use image::RgbImage;
use plotters::coord::ranged1d::{KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

use crate::error::{Error, Result};

/// One curve.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// A bound drawn around the series before it (e.g. +-1 standard error): thin, in that
    /// series' colour, with no legend entry of its own (the panel's `x_desc` says what it is).
    pub companion: bool,
}

impl Series {
    /// A curve of its own (not a [`Series::companion`]).
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            companion: false,
        }
    }
}

/// The colour index of each series: the curves of their own in order, each companion sharing
/// the index of the curve before it.
fn colour_indices(series: &[Series]) -> Vec<usize> {
    let mut next = 0;
    series
        .iter()
        .map(|s| {
            if !s.companion || next == 0 {
                next += 1;
            }
            next - 1
        })
        .collect()
}

/// One panel: a title and its curves.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    /// The x axis's description (`step` for training curves).
    pub x_desc: String,
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 280;
/// Series colours (matplotlib's first six).
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];
const INK: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(225, 225, 225);
const WARN: RGBColor = RGBColor(180, 30, 30);
/// The font family named in text styles; [`Canvas`] sets all text in the compiled-in DejaVu Sans.
const FONT: &str = "DejaVu Sans";
const TITLE_PX: f64 = 18.0;
const TEXT_PX: f64 = 15.0;
/// Series with at most this many points get a marker on each point (evaluation figures,
/// short runs).
const MARKERS_UP_TO: usize = 40;

/// Fields of a metrics line that are bookkeeping, not curves.
const SKIP: [&str; 6] = [
    "step",
    "epoch",
    "wall_s",
    "eval_s",
    "samples_per_s",
    "skipped_steps",
];

/// The unit of a logged figure, where it has one.
fn unit(name: &str) -> Option<&'static str> {
    Some(match name {
        "bound" | "nll" | "test_nll" | "valid_nll" | "test_elbo" | "valid_elbo" => "nats",
        "bits_per_dim" | "test_bits_per_dim" => "bits/dim",
        "modes_covered" => "modes",
        "high_quality_fraction" | "min_class_fraction" => "fraction",
        _ => return None,
    })
}

/// A number of a metrics line: a JSON number, or one of the strings `"NaN"`, `"inf"`, `"-inf"`
/// that stand for the non-finite values (see `report::json::float`).
fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        v => v.as_f64(),
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

/// How the tick labels of one axis are written: all in fixed point with the same number of
/// decimals (`0.0008`, `0.0010`, `0.0012`), or all in scientific notation with the same number
/// of mantissa decimals (`8.0e-5`, `1.0e-4`; zero is plain `0`). One format per axis: never
/// `8.0e-4` next to `0.001`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickFormat {
    Fixed(usize),
    Scientific(usize),
}

impl TickFormat {
    /// The format for labelling all of `values`: fixed point when the largest magnitude is in
    /// `[1e-3, 1e5)` and at most four decimals (six from 0.1 up) show every value exactly, or
    /// when all are whole and below 1e7; scientific otherwise. In each case with the fewest
    /// decimals that show every value (up to a limit).
    pub fn for_values(values: &[f64]) -> TickFormat {
        let vs: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let max = vs.iter().fold(0f64, |m, v| m.max(v.abs()));
        let tol = 1e-9 * max.max(f64::MIN_POSITIVE);
        let exact = |f: TickFormat| {
            vs.iter().all(|v| {
                f.write(*v)
                    .parse::<f64>()
                    .is_ok_and(|w| (w - v).abs() <= tol)
            })
        };
        if max == 0.0 || (1e-3..1e5).contains(&max) {
            // Up to six decimals where the leading digits show (1.00012), four below 0.1.
            let most = if max >= 0.1 { 6 } else { 4 };
            if let Some(d) = (0..=most).find(|d| exact(TickFormat::Fixed(*d))) {
                return TickFormat::Fixed(d);
            }
        }
        // Whole numbers (steps) up to seven digits read best as they are.
        if max < 1e7 && exact(TickFormat::Fixed(0)) {
            return TickFormat::Fixed(0);
        }
        let d = (0..=6)
            .find(|d| exact(TickFormat::Scientific(*d)))
            .unwrap_or(6);
        TickFormat::Scientific(d)
    }

    /// `v` in this format.
    pub fn write(self, v: f64) -> String {
        let s = match self {
            TickFormat::Scientific(_) if v == 0.0 => return "0".into(),
            TickFormat::Fixed(d) => format!("{v:.d$}"),
            TickFormat::Scientific(d) => format!("{v:.d$e}"),
        };
        // No "-0.0" for a value that rounds to zero.
        match s.strip_prefix('-') {
            Some(z) if z.chars().all(|c| c == '0' || c == '.') => z.into(),
            _ => s,
        }
    }
}

/// The labels of one axis's ticks, all in one [`TickFormat`].
pub fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let f = TickFormat::for_values(ticks);
    ticks.iter().map(|t| f.write(*t)).collect()
}

/// A single value as a tick label: short, without trailing zeros.
pub fn label(v: f64) -> String {
    TickFormat::for_values(&[v]).write(v)
}

fn colour(i: usize) -> RGBColor {
    let [r, g, b] = COLOURS[i % COLOURS.len()];
    RGBColor(r, g, b)
}

/// DejaVu Sans, parsed once per process.
fn font() -> Result<&'static FontRef<'static>> {
    static FONT_DATA: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT_DATA
        .get_or_init(|| FontRef::try_from_slice(dejavu::sans::regular()).ok())
        .as_ref()
        .ok_or_else(|| Error::Data("the bundled DejaVu Sans font does not parse".into()))
}

/// plotters' bitmap backend with its text set here: plotters 0.3.7's own `ab_glyph` text drops
/// each glyph's side bearing, which spaces letters unevenly ("gener ated r ows"). Text is laid
/// out with the font's advances and kerning, anchored as plotters asks, and anti-aliased onto
/// the pixels; everything else is the bitmap backend's.
struct Canvas<'a> {
    inner: BitMapBackend<'a>,
    font: &'static FontRef<'static>,
}

/// The positioned glyphs of `text` at `px` pixels (the font's ascent-to-descent height), the
/// baseline at `y = ascent`; with the width and height of its box.
fn layout(font: &FontRef<'static>, text: &str, px: f32) -> (Vec<Glyph>, f32, f32) {
    let f = font.as_scaled(PxScale::from(px));
    let (mut x, mut prev) = (0f32, None);
    let mut glyphs = Vec::with_capacity(text.len());
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(px, point(x, f.ascent())));
        x += f.h_advance(id);
        prev = Some(id);
    }
    (glyphs, x, f.ascent() - f.descent())
}

impl<'a> DrawingBackend for Canvas<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        c: BackendColor,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(p, c)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (_, w, h) = layout(self.font, text, style.size() as f32);
        Ok((w.ceil() as u32, h.ceil() as u32))
    }

    /// Horizontal text only (nothing here is rotated).
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> std::result::Result<(), DrawingErrorKind<Self::ErrorType>> {
        let colour = style.color();
        if colour.alpha == 0.0 {
            return Ok(());
        }
        let (glyphs, w, h) = layout(self.font, text, style.size() as f32);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let (x0, y0) = ((pos.0 as f32 + dx).round(), (pos.1 as f32 + dy).round());
        for g in glyphs {
            let Some(outline) = self.font.outline_glyph(g) else {
                continue; // a space
            };
            let b = outline.px_bounds();
            let mut pixels = Vec::new();
            outline.draw(|x, y, cover| {
                if cover > 0.0 {
                    pixels.push((
                        (x0 + b.min.x) as i32 + x as i32,
                        (y0 + b.min.y) as i32 + y as i32,
                        cover.min(1.0) as f64,
                    ));
                }
            });
            for (x, y, cover) in pixels {
                let c = BackendColor {
                    alpha: colour.alpha * cover,
                    rgb: colour.rgb,
                };
                self.inner.draw_pixel((x, y), c)?;
            }
        }
        Ok(())
    }
}

fn style(px: f64, c: RGBColor) -> TextStyle<'static> {
    TextStyle {
        font: (FONT, px).into_font(),
        color: c.to_backend_color(),
        pos: Pos::new(HPos::Left, VPos::Top),
    }
}

/// A linear axis over `lo..hi` whose grid lines and labels are exactly `ticks` (plotters would
/// pick its own ticks, and label each value on its own).
#[derive(Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + ((limit.1 - limit.0) as f64 * t).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

type Area<'a> = DrawingArea<Canvas<'a>, Shift>;
type Drawn<T> = std::result::Result<
    T,
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

fn text_width(area: &Area<'_>, s: &str, st: &TextStyle<'_>) -> Drawn<i32> {
    Ok(area.estimate_text_size(s, st)?.0 as i32)
}

/// The header row of a panel: its title and, in red, how many non-finite values were skipped
/// on the left; the legend (for more than one series) on the right.
fn draw_header(area: &Area<'_>, panel: &Panel, skipped: usize) -> Drawn<()> {
    let (w, _) = area.dim_in_pixel();
    let left = 14;
    let y = 8;
    let title = style(TITLE_PX, INK);
    area.draw(&Text::new(panel.title.clone(), (left, y), title.clone()))?;
    if skipped > 0 {
        let x = left + text_width(area, &panel.title, &title)? + 14;
        let note = format!(
            "{skipped} non-finite value{} (NaN/inf) not drawn",
            if skipped == 1 { "" } else { "s" }
        );
        area.draw(&Text::new(note, (x, y + 2), style(TEXT_PX, WARN)))?;
    }
    let colours = colour_indices(&panel.series);
    if panel.series.iter().filter(|s| !s.companion).count() > 1 {
        let st = style(TEXT_PX, INK);
        let mut x = w as i32 - 20;
        for (s, &i) in panel.series.iter().zip(&colours).rev() {
            if s.companion {
                continue;
            }
            x -= text_width(area, &s.name, &st)?;
            area.draw(&Text::new(s.name.clone(), (x, y + 2), st.clone()))?;
            x -= 26;
            let mid = y + 2 + (TEXT_PX as i32) / 2;
            area.draw(&Rectangle::new(
                [(x, mid - 1), (x + 20, mid + 1)],
                colour(i).filled(),
            ))?;
            x -= 18;
        }
    }
    Ok(())
}

/// The runs of finite points of a series: its line breaks where a value is not finite.
fn segments(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for p in points {
        if p.0.is_finite() && p.1.is_finite() {
            out.last_mut().expect("never empty").push(*p);
        } else if !out.last().expect("never empty").is_empty() {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn draw_panel(area: &Area<'_>, panel: &Panel) -> Drawn<()> {
    let all = panel.series.iter().flat_map(|s| s.points.iter());
    let finite: Vec<&(f64, f64)> = all
        .clone()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let skipped = all.count() - finite.len();
    if finite.is_empty() {
        draw_header(area, panel, skipped)?;
        let (w, h) = area.dim_in_pixel();
        let centre = style(TEXT_PX, MUTED).pos(Pos::new(HPos::Center, VPos::Center));
        area.draw(&Text::new(
            "(no finite values yet)",
            (w as i32 / 2, h as i32 / 2),
            centre,
        ))?;
        return Ok(());
    }
    let ((xlo, xhi, xt), (ylo, yhi, yt)) = axes(&finite);
    let (xf, yf) = (TickFormat::for_values(&xt), TickFormat::for_values(&yt));
    let label_style = style(TEXT_PX, INK);
    let mut ylabel_w = 0;
    for t in &yt {
        ylabel_w = ylabel_w.max(text_width(area, &yf.write(*t), &label_style)?);
    }
    let y_area = (ylabel_w + 14).max(40);
    draw_header(area, panel, skipped)?;

    let mut chart = ChartBuilder::on(area)
        .margin_top(36)
        .margin_left(10)
        .margin_right(28)
        .margin_bottom(4)
        .x_label_area_size(46)
        .y_label_area_size(y_area)
        .build_cartesian_2d(
            Axis {
                lo: xlo,
                hi: xhi,
                ticks: xt,
            },
            Axis {
                lo: ylo,
                hi: yhi,
                ticks: yt,
            },
        )?;
    let fx = move |v: &f64| xf.write(*v);
    let fy = move |v: &f64| yf.write(*v);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .axis_style(INK)
        .label_style(label_style.clone())
        .axis_desc_style(style(TEXT_PX, MUTED))
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .x_desc(panel.x_desc.as_str())
        .draw()?;
    for (s, &i) in panel.series.iter().zip(&colour_indices(&panel.series)) {
        let c = colour(i);
        let width = if s.companion { 1 } else { 2 };
        let n = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .count();
        for seg in segments(&s.points) {
            if seg.len() > 1 {
                chart.draw_series(LineSeries::new(
                    seg.iter().copied(),
                    Color::stroke_width(&c, width),
                ))?;
            }
            if !s.companion && (seg.len() == 1 || n <= MARKERS_UP_TO) {
                chart.draw_series(seg.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
            }
        }
    }
    Ok(())
}

/// The x axis `(lo, hi, ticks)` (steps, whole-step ticks when every step is whole; a single step
/// in the middle with its tick alone) and the value axis ([`value_axis`]) of the finite points.
#[allow(clippy::type_complexity)]
fn axes(finite: &[&(f64, f64)]) -> ((f64, f64, Vec<f64>), (f64, f64, Vec<f64>)) {
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in finite {
        xlo = xlo.min(p.0);
        xhi = xhi.max(p.0);
        ylo = ylo.min(p.1);
        yhi = yhi.max(p.1);
    }
    let x = if xhi <= xlo {
        // One step (a first evaluation): that step in the middle, and its tick alone.
        let pad = (xlo.abs() * 0.05).max(1.0);
        (xlo - pad, xhi + pad, vec![xlo])
    } else {
        let pad = (xhi - xlo) * 0.015;
        let mut xt = ticks(xlo - pad, xhi + pad);
        if finite.iter().all(|p| p.0.fract() == 0.0) {
            // Steps are whole: no tick at step 12.5.
            xt.retain(|t| (t - t.round()).abs() < 1e-9);
        }
        (xlo - pad, xhi + pad, xt)
    };
    let (ylo, yhi) = value_axis(ylo, yhi);
    let yt = ticks(ylo, yhi);
    (x, (ylo, yhi, yt))
}

/// Draws `panels` stacked vertically into `path`.
pub fn write_panels(path: &Path, panels: &[Panel]) -> Result<()> {
    let font = font()?;
    let (w, h) = (WIDTH, PANEL_HEIGHT * panels.len().max(1) as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let drawn: Drawn<()> = (|| {
        let root = Canvas {
            inner: BitMapBackend::with_buffer(&mut buf, (w, h)),
            font,
        }
        .into_drawing_area();
        root.fill(&WHITE)?;
        if !panels.is_empty() {
            for (area, p) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
                draw_panel(area, p)?;
            }
        }
        root.present()
    })();
    drawn.map_err(|e| Error::Data(format!("drawing {}: {e}", path.display())))?;
    let img = RgbImage::from_raw(w, h, buf).expect("the buffer has w * h * 3 bytes");
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The panels of a `metrics.jsonl` text: training figures (players grouped) and evaluation
/// figures, each against the step, titled with the metric's name and its unit where known.
/// Non-finite values (written as `"NaN"`, `"inf"`, `"-inf"`) are kept: the drawing skips them
/// and says how many it skipped.
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
            if let Some(v) = number(v) {
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
                        .map(|n| Series::new(*n, map.remove(*n).unwrap_or_default()))
                        .collect(),
                    x_desc: "step".into(),
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
            let title = match unit(&name) {
                Some(u) => format!("{prefix}: {name} ({u})"),
                None => format!("{prefix}: {name}"),
            };
            panels.push(Panel {
                title,
                series: vec![Series::new(name, points)],
                x_desc: "step".into(),
            });
        }
    }
    panels
}

/// Plots a likelihood k-sweep: the estimated NLL (nats, with +- one standard error over images
/// as two thin lines in its colour) against `log10 k`, titled with `title` (the estimator and images).
/// Each point is `(k, nll, nll_stderr)`.
///
/// # Errors
/// An empty sweep, or a failure to draw or write `path`.
pub fn write_k_sweep(path: &Path, title: &str, points: &[(usize, f64, f64)]) -> Result<()> {
    if points.is_empty() {
        return Err(Error::Config("the k-sweep has no points to plot".into()));
    }
    let at = |f: &dyn Fn(f64, f64) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|&(k, nll, se)| ((k as f64).log10(), f(nll, se)))
            .collect()
    };
    let panel = Panel {
        title: title.to_string(),
        series: vec![
            Series::new("NLL (nats)", at(&|nll, _| nll)),
            Series {
                companion: true,
                ..Series::new("+1 s.e.", at(&|nll, se| nll + se))
            },
            Series {
                companion: true,
                ..Series::new("-1 s.e.", at(&|nll, se| nll - se))
            },
        ],
        x_desc: "log10 k (draws per image); y: NLL (nats), thin lines +-1 s.e. over images".into(),
    };
    write_panels(path, &[panel])
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
    fn a_companion_takes_the_colour_of_the_curve_before_it() {
        let s = |companion| Series {
            companion,
            ..Series::new("s", vec![(0.0, 1.0)])
        };
        assert_eq!(
            colour_indices(&[s(false), s(true), s(true), s(false)]),
            [0, 0, 0, 1]
        );
        // A companion with no curve before it is a curve's colour of its own.
        assert_eq!(colour_indices(&[s(true), s(false)]), [0, 1]);
    }

    /// Whether `labels` are written in one format: all fixed point with the same number of
    /// decimals, or all scientific (zero aside).
    fn one_format(labels: &[String]) -> bool {
        let sci = |l: &String| l.contains('e');
        let decimals = |l: &String| {
            l.split('e')
                .next()
                .unwrap()
                .split('.')
                .nth(1)
                .map_or(0, str::len)
        };
        let rest: Vec<&String> = labels.iter().filter(|l| *l != "0").collect();
        let same_kind = rest.iter().all(|l| sci(l)) || labels.iter().all(|l| !sci(l));
        let same_decimals = labels
            .iter()
            .filter(|l| *l != "0" || !rest.iter().any(|l| sci(l)))
            .map(decimals)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            <= 1;
        same_kind && same_decimals
    }

    #[test]
    fn a_constant_series_is_drawn_on_an_axis_of_its_own_size() {
        let (lo, hi) = value_axis(0.001, 0.001);
        assert!(lo > 0.0 && hi < 0.002, "{lo} {hi}");
        let t = ticks(lo, hi);
        assert!(t.len() >= 2 && t.iter().all(|v| *v > 0.0), "{t:?}");
        assert!(t.iter().any(|v| label(*v) == "0.001"), "{t:?}");
        let labels = tick_labels(&t);
        assert_eq!(labels, ["0.0006", "0.0008", "0.0010", "0.0012", "0.0014"]);
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
        assert_eq!(label(0.001), "0.001");
        assert_eq!(label(120000.0), "120000");
        assert_eq!(label(1.2e7), "1.2e7");
        assert_eq!(label(0.0004), "4e-4");
    }

    #[test]
    fn an_axis_has_one_label_format() {
        for (lo, hi) in [
            (0.00075, 0.00125), // a learning rate around 0.001: once "8.0e-4" beside "0.001"
            (0.0, 0.0012),
            (4e-5, 2.1e-4),
            (-0.35, 0.75),
            (0.0, 250_000.0),
            (1e7, 5e7),
            (95.3, 181.0),
            (1.0001, 1.0002),
        ] {
            let (lo, hi) = value_axis(lo, hi);
            let t = ticks(lo, hi);
            let labels = tick_labels(&t);
            assert!(one_format(&labels), "{lo}..{hi}: {labels:?}");
            let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
            assert_eq!(distinct.len(), labels.len(), "{labels:?}");
            for (v, l) in t.iter().zip(&labels) {
                let back: f64 = l.parse().unwrap();
                assert!((back - v).abs() <= 1e-9 * v.abs().max(1e-300), "{v} as {l}");
            }
        }
        assert_eq!(
            tick_labels(&[0.0008, 0.001, 0.0012]),
            ["0.0008", "0.0010", "0.0012"]
        );
        assert_eq!(
            tick_labels(&[6e-6, 8e-6, 1e-5, 1.2e-5]),
            ["6.0e-6", "8.0e-6", "1.0e-5", "1.2e-5"]
        );
        assert_eq!(tick_labels(&[-0.2, 0.0, 0.2]), ["-0.2", "0.0", "0.2"]);
        assert_eq!(
            tick_labels(&[1.0001, 1.00015, 1.0002]),
            ["1.00010", "1.00015", "1.00020"]
        );
    }

    #[test]
    fn gan_metrics_give_player_panels_and_the_image_is_drawn() {
        let jsonl = [
            r#"{"event":"train","step":10,"epoch":0.1,"loss":1.3,"d_loss":1.3,"g_loss":0.8,"d_real":0.1,"d_fake":-0.1,"lr":0.001}"#,
            r#"{"event":"train","step":20,"epoch":0.2,"loss":1.2,"d_loss":1.2,"g_loss":0.9,"d_real":0.2,"d_fake":-0.2,"lr":0.001}"#,
            r#"{"event":"eval","step":20,"epoch":1.0,"modes_covered":3,"eval_s":0.1}"#,
            r#"{"event":"tr", "step": }"#, // a malformed (cut) line is skipped
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
                "evaluation: modes_covered (modes)"
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

    #[test]
    fn non_finite_values_are_kept_for_the_note_and_not_drawn() {
        let jsonl = [
            r#"{"event":"train","step":10,"epoch":0.1,"loss":1.3,"bound":-1.3,"lr":0.001}"#,
            r#"{"event":"train","step":20,"epoch":0.2,"loss":"NaN","bound":"-inf","lr":0.001}"#,
            r#"{"event":"train","step":30,"epoch":0.3,"loss":1.1,"bound":-1.1,"lr":0.001}"#,
            r#"{"event":"eval","step":30,"epoch":1.0,"test_elbo":"inf","eval_s":0.1}"#,
        ]
        .join("\n");
        let panels = panels_from_metrics(&jsonl);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "training loss",
                "training: bound (nats)",
                "training: lr",
                "evaluation: test_elbo (nats)"
            ]
        );
        assert!(panels[0].series[0].points[1].1.is_nan());
        assert_eq!(panels[1].series[0].points[1].1, f64::NEG_INFINITY);
        assert_eq!(
            segments(&panels[0].series[0].points),
            vec![vec![(10.0, 1.3)], vec![(30.0, 1.1)]]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        write_panels(&path, &panels).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, 4 * PANEL_HEIGHT));
        // The note is drawn, in its own colour, in the header rows of the first two panels and
        // of the last (all of whose values are non-finite), not in the third.
        let red_in = |panel: u32| {
            let top = panel * PANEL_HEIGHT;
            (top..top + 30).any(|y| (0..WIDTH).any(|x| img.get_pixel(x, y).0 == [180, 30, 30]))
        };
        assert!(red_in(0) && red_in(1) && !red_in(2) && red_in(3));
    }

    /// Rows (within panel `panel`) holding pixels of series colour `c`.
    fn rows_with(img: &RgbImage, panel: u32, c: [u8; 3]) -> Vec<u32> {
        let top = panel * PANEL_HEIGHT;
        (top..top + PANEL_HEIGHT)
            .filter(|y| (0..WIDTH).any(|x| img.get_pixel(x, *y).0 == c))
            .map(|y| y - top)
            .collect()
    }

    #[test]
    fn a_constant_lr_run_renders_to_png() {
        let dir = tempfile::tempdir().unwrap();
        // A VAE-like run with a constant learning rate of 0.001.
        let vae = dir.path().join("vae");
        std::fs::create_dir(&vae).unwrap();
        let mut lines = Vec::new();
        for i in 1..=60u32 {
            let loss = 100.0 + 80.0 * (-(i as f64) / 15.0).exp();
            lines.push(format!(
                r#"{{"event":"train","step":{},"epoch":{},"bound":{},"kl_weight":1.0,"loss":{loss},"lr":0.001,"samples_per_s":5000.0,"wall_s":{i},"skipped_steps":0}}"#,
                i * 50,
                i as f64 / 12.0,
                -loss
            ));
            if i % 12 == 0 {
                lines.push(format!(
                    r#"{{"event":"eval","step":{},"epoch":{},"test_elbo":{},"eval_s":1.0}}"#,
                    i * 50,
                    i / 12,
                    loss + 5.0
                ));
            }
        }
        std::fs::write(vae.join("metrics.jsonl"), lines.join("\n")).unwrap();
        write_training_curves(&vae).unwrap();
        let img = image::open(vae.join("curves.png")).unwrap().to_rgb8();
        // training loss, bound, kl_weight, lr, test_elbo
        assert_eq!(img.dimensions(), (WIDTH, 5 * PANEL_HEIGHT));
        // The constant learning rate (panel 3) is a line across the middle of its panel, not at
        // an edge of it.
        let rows = rows_with(&img, 3, COLOURS[0]);
        assert!(!rows.is_empty());
        let mid = (rows[0] + rows[rows.len() - 1]) / 2;
        assert!(
            rows.len() <= 8 && (110..=170).contains(&mid),
            "lr rows {rows:?}"
        );
        // Text is drawn: dark pixels in the title row of every panel.
        for p in 0..5 {
            let top = p * PANEL_HEIGHT;
            let dark = (top..top + 30)
                .flat_map(|y| (0..WIDTH / 2).map(move |x| (x, y)))
                .filter(|(x, y)| img.get_pixel(*x, *y).0.iter().all(|c| *c < 100))
                .count();
            assert!(dark > 50, "panel {p}: {dark} dark pixels in its title row");
        }
    }

    #[test]
    fn a_gan_run_renders_to_png() {
        let dir = tempfile::tempdir().unwrap();
        // A GAN run: both players, D(x), the learning rate and an evaluation figure.
        let gan = dir.path().join("gan");
        std::fs::create_dir(&gan).unwrap();
        let mut lines = Vec::new();
        for i in 1..=80u32 {
            let t = i as f64;
            lines.push(format!(
                r#"{{"event":"train","step":{},"epoch":{},"loss":{d},"d_loss":{d},"g_loss":{g},"d_real":{},"d_fake":{},"lr":0.0002}}"#,
                i * 100,
                t / 10.0,
                0.5 + 0.2 * (1.0 - (-t / 40.0).exp()),
                -0.3 * (1.0 - (-t / 40.0).exp()),
                d = 1.386 - 0.3 * (1.0 - (-t / 30.0).exp()),
                g = 0.69 + 0.5 * (1.0 - (-t / 30.0).exp()),
            ));
            if i % 20 == 0 {
                lines.push(format!(
                    r#"{{"event":"eval","step":{},"epoch":{},"modes_covered":{},"eval_s":0.3}}"#,
                    i * 100,
                    i / 10,
                    i / 10
                ));
            }
        }
        std::fs::write(gan.join("metrics.jsonl"), lines.join("\n")).unwrap();
        write_training_curves(&gan).unwrap();
        let img = image::open(gan.join("curves.png")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, 4 * PANEL_HEIGHT));
        // Both players' colours in the first two panels (curves and legend).
        for p in 0..2 {
            for c in &COLOURS[..2] {
                assert!(
                    !rows_with(&img, p, *c).is_empty(),
                    "panel {p}, colour {c:?}"
                );
            }
        }
    }
}
