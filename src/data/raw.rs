//! In-memory forms of user data sets before they become tensors: [`RawImages`], 8-bit images
//! with 1 (grey) or 3 (RGB) channels stored planar, and [`RealRows`], continuous tabular rows.
//!
//! The readers ([`super::npy`], [`super::cifar`], [`super::folder`]) build these and run their
//! `check()` before returning them, so a value that comes out of a reader is consistent.

use super::images::ImageSet;
use crate::error::{Error, Result};

/// A set of `n` equally sized 8-bit images with 1 (grey) or 3 (RGB) channels and optional
/// integer labels.
///
/// Pixels are stored **planar per image**, shape `(n, channels, height, width)` in row-major
/// order: image `i` is `pixels[i * dim() .. (i + 1) * dim()]`, and within it channel `c`, row
/// `y`, column `x` is at `(c * height + y) * width + x` (see [`RawImages::pixel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImages {
    /// `n * channels * height * width` bytes, `(n, channels, height, width)` row-major.
    pub pixels: Vec<u8>,
    /// Number of images.
    pub n: usize,
    /// 1 (grey) or 3 (RGB, in that order).
    pub channels: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// One label per image, if the source has labels.
    pub labels: Option<Vec<u32>>,
    /// Class names, indexed by label, when the source names them (image-folder class folders,
    /// CIFAR-10's ten names); empty otherwise.
    pub classes: Vec<String>,
}

impl RawImages {
    /// Values per image: `channels * height * width`.
    pub fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`, `(channels, height, width)` row-major.
    ///
    /// # Panics
    /// If `i >= n` or the set is inconsistent (a value that passed [`RawImages::check`] with
    /// `i < n` never panics).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * self.dim()..(i + 1) * self.dim()]
    }

    /// The value of image `i`, channel `c`, row `y`, column `x`.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn pixel(&self, i: usize, c: usize, y: usize, x: usize) -> u8 {
        assert!(c < self.channels && y < self.height && x < self.width);
        self.image(i)[(c * self.height + y) * self.width + x]
    }

    /// Number of classes: the number of class names when there are any, else the largest label
    /// plus one, else 0 (no labels).
    pub fn num_classes(&self) -> usize {
        if !self.classes.is_empty() {
            return self.classes.len();
        }
        max_label_plus_one(self.labels.as_deref())
    }

    /// Checks that the fields agree.
    ///
    /// # Errors
    /// [`Error::Data`] when `channels` is not 1 or 3, a dimension is 0, the sizes overflow,
    /// `pixels.len() != n * channels * height * width`, there is not exactly one label per image,
    /// or (with class names) a label is not below `classes.len()`.
    pub fn check(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::Data(format!(
                "images with {} channels are not supported (only 1, grey, or 3, RGB)",
                self.channels
            )));
        }
        let shape = format!(
            "{} images of {}x{}x{} (channels x height x width)",
            self.n, self.channels, self.height, self.width
        );
        if self.n == 0 || self.height == 0 || self.width == 0 {
            return Err(Error::Data(format!("empty image set: {shape}")));
        }
        let need = [self.n, self.channels, self.height]
            .iter()
            .try_fold(self.width, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::Data(format!("{shape} overflow the address space")))?;
        if self.pixels.len() != need {
            return Err(Error::Data(format!(
                "{} pixel bytes for {shape}, which need {need}",
                self.pixels.len()
            )));
        }
        check_labels(self.labels.as_deref(), self.n, "images", self.classes.len())
    }

    /// Converts a grey IDX image set ([`ImageSet`], e.g. MNIST) to one channel, keeping its
    /// labels; it has no class names.
    ///
    /// # Errors
    /// As [`RawImages::check`] (an empty or inconsistent set).
    pub fn from_image_set(set: ImageSet) -> Result<RawImages> {
        let images = RawImages {
            pixels: set.pixels,
            n: set.n,
            channels: 1,
            height: set.rows,
            width: set.cols,
            labels: set.labels.map(|l| l.into_iter().map(u32::from).collect()),
            classes: Vec::new(),
        };
        images.check()?;
        Ok(images)
    }
}

/// `n` rows of `dim` continuous values (a tabular data set of shape `(n, dim)`), with optional
/// integer labels.
#[derive(Debug, Clone, PartialEq)]
pub struct RealRows {
    /// `n * dim` values, `(n, dim)` row-major; all finite in a checked value.
    pub values: Vec<f32>,
    /// Number of rows.
    pub n: usize,
    /// Values per row.
    pub dim: usize,
    /// One label per row, if the source has labels.
    pub labels: Option<Vec<u32>>,
}

impl RealRows {
    /// The values of row `i`, `dim` of them.
    ///
    /// # Panics
    /// If `i >= n` or the rows are inconsistent (never for a checked value and `i < n`).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// Number of classes: the largest label plus one, 0 without labels.
    pub fn num_classes(&self) -> usize {
        max_label_plus_one(self.labels.as_deref())
    }

    /// Checks that the fields agree and every value is finite.
    ///
    /// # Errors
    /// [`Error::Data`] when `n` or `dim` is 0, `values.len() != n * dim` (or it overflows),
    /// there is not exactly one label per row, or a value is NaN or infinite (the message names
    /// the first such row and column, counted from 0).
    pub fn check(&self) -> Result<()> {
        if self.n == 0 || self.dim == 0 {
            return Err(Error::Data(format!(
                "empty table: {} rows of {} values",
                self.n, self.dim
            )));
        }
        let need = self.n.checked_mul(self.dim).ok_or_else(|| {
            Error::Data(format!(
                "{} rows of {} values overflow the address space",
                self.n, self.dim
            ))
        })?;
        if self.values.len() != need {
            return Err(Error::Data(format!(
                "{} values for {} rows of {}, which need {need}",
                self.values.len(),
                self.n,
                self.dim
            )));
        }
        if let Some(i) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "row {} holds a non-finite value ({}) in column {} (rows and columns count from 0)",
                i / self.dim,
                self.values[i],
                i % self.dim
            )));
        }
        check_labels(self.labels.as_deref(), self.n, "rows", 0)
    }
}

fn max_label_plus_one(labels: Option<&[u32]>) -> usize {
    labels
        .and_then(|l| l.iter().max().map(|&m| m as usize + 1))
        .unwrap_or(0)
}

/// One label per item; below `classes` when `classes > 0`.
fn check_labels(labels: Option<&[u32]>, n: usize, items: &str, classes: usize) -> Result<()> {
    let Some(labels) = labels else {
        return Ok(());
    };
    if labels.len() != n {
        return Err(Error::Data(format!(
            "{} labels for {n} {items} (need one label per item)",
            labels.len()
        )));
    }
    if classes > 0 {
        if let Some(i) = labels.iter().position(|&l| l as usize >= classes) {
            return Err(Error::Data(format!(
                "label {} of item {i} is out of range for {classes} named classes",
                labels[i]
            )));
        }
    }
    Ok(())
}

/// Prefixes the message of an [`Error::Data`] with `name` (a file), leaving other errors as
/// they are: readers use it to say which file a failed `check()` concerns.
pub(crate) fn in_file(name: &str, e: Error) -> Error {
    match e {
        Error::Data(m) => Error::Data(format!("{name}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_rgb() -> RawImages {
        RawImages {
            pixels: (0..24).collect(),
            n: 2,
            channels: 3,
            height: 2,
            width: 2,
            labels: Some(vec![1, 0]),
            classes: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn accessors_follow_the_planar_layout() {
        let s = two_rgb();
        s.check().unwrap();
        assert_eq!(s.dim(), 12);
        assert_eq!(s.image(1), &(12..24).collect::<Vec<u8>>()[..]);
        // image 1, channel 2 (blue), row 1, column 0: 12 + (2 * 2 + 1) * 2 + 0 = 22
        assert_eq!(s.pixel(1, 2, 1, 0), 22);
        assert_eq!(s.num_classes(), 2);
        let unnamed = RawImages {
            classes: vec![],
            labels: Some(vec![4, 0]),
            ..two_rgb()
        };
        assert_eq!(unnamed.num_classes(), 5);
        let unlabelled = RawImages {
            classes: vec![],
            labels: None,
            ..two_rgb()
        };
        assert_eq!(unlabelled.num_classes(), 0);
    }

    #[test]
    fn check_refuses_each_inconsistency() {
        let cases: Vec<(RawImages, &str)> = vec![
            (
                RawImages {
                    channels: 4,
                    ..two_rgb()
                },
                "4 channels are not supported",
            ),
            (
                RawImages {
                    n: 0,
                    pixels: vec![],
                    ..two_rgb()
                },
                "empty image set",
            ),
            (
                RawImages {
                    pixels: vec![0; 23],
                    ..two_rgb()
                },
                "23 pixel bytes for 2 images of 3x2x2",
            ),
            (
                RawImages {
                    labels: Some(vec![0]),
                    ..two_rgb()
                },
                "1 labels for 2 images",
            ),
            (
                RawImages {
                    labels: Some(vec![0, 2]),
                    ..two_rgb()
                },
                "label 2 of item 1 is out of range for 2 named classes",
            ),
            (
                RawImages {
                    n: usize::MAX,
                    ..two_rgb()
                },
                "overflow",
            ),
        ];
        for (set, want) in cases {
            let e = set.check().unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn from_image_set_keeps_pixels_and_labels() {
        let set = ImageSet {
            pixels: vec![1, 2, 3, 4],
            labels: Some(vec![7]),
            n: 1,
            rows: 2,
            cols: 2,
        };
        let raw = RawImages::from_image_set(set).unwrap();
        assert_eq!(raw.channels, 1);
        assert_eq!(raw.pixel(0, 0, 1, 0), 3);
        assert_eq!(raw.labels, Some(vec![7]));
        assert_eq!(raw.num_classes(), 8);
    }

    #[test]
    fn rows_check_names_the_non_finite_row() {
        let rows = RealRows {
            values: vec![0.0, 1.0, 2.0, f32::NAN, 4.0, 5.0],
            n: 3,
            dim: 2,
            labels: None,
        };
        let e = rows.check().unwrap_err().to_string();
        assert!(
            e.contains("row 1 holds a non-finite value (NaN) in column 1"),
            "{e}"
        );
        let ok = RealRows {
            values: vec![0.0; 6],
            labels: Some(vec![0, 3, 1]),
            ..rows.clone()
        };
        ok.check().unwrap();
        assert_eq!(ok.row(2), &[0.0, 0.0]);
        assert_eq!(ok.num_classes(), 4);
        let e = RealRows {
            labels: Some(vec![0]),
            ..ok.clone()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(e.contains("1 labels for 3 rows"), "{e}");
        let e = RealRows {
            values: vec![0.0; 5],
            ..ok.clone()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(e.contains("5 values for 3 rows of 2"), "{e}");
        let e = RealRows {
            n: 0,
            values: vec![],
            ..ok
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(e.contains("empty table"), "{e}");
    }
}
