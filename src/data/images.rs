//! Image data sets stored as IDX files: MNIST and anything laid out like it (Fashion-MNIST,
//! KMNIST, EMNIST, ...): `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally gzipped.

use std::path::{Path, PathBuf};

use super::idx::read_idx;
use crate::error::{Error, Result};

/// A set of equally sized 8-bit grayscale images with optional labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// `n * rows * cols` pixels, row-major per image.
    pub pixels: Vec<u8>,
    /// Labels, one per image, if present.
    pub labels: Option<Vec<u8>>,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Which half of an IDX image set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let hint = if dir.is_relative() {
        " (a relative data.dir is taken from the working directory; pass --data-dir DIR)"
    } else {
        " (pass --data-dir DIR)"
    };
    Err(Error::Data(format!(
        "{}: no {stem}[.gz] in this directory{hint}",
        dir.display()
    )))
}

impl ImageSet {
    /// Pixels per image.
    pub fn dim(&self) -> usize {
        self.rows * self.cols
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * self.dim()..(i + 1) * self.dim()]
    }

    /// Number of label classes (max label + 1), 0 without labels.
    pub fn num_classes(&self) -> usize {
        self.labels
            .as_ref()
            .and_then(|l| l.iter().max().map(|m| *m as usize + 1))
            .unwrap_or(0)
    }

    /// Loads one split of an IDX image set from `dir`. Labels are loaded when their file exists.
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let images_path = find(dir, &format!("{}-images-idx3-ubyte", split.prefix()))?;
        let images = read_idx(&images_path)?;
        let [n, rows, cols] = images.dims[..] else {
            return Err(Error::Idx {
                path: images_path,
                reason: format!(
                    "expected 3 dimensions (n, rows, cols), found {:?}",
                    images.dims
                ),
            });
        };
        if n == 0 || rows == 0 || cols == 0 {
            return Err(Error::Data(format!(
                "{}: empty image set {:?}",
                images_path.display(),
                images.dims
            )));
        }
        let labels = match find(dir, &format!("{}-labels-idx1-ubyte", split.prefix())) {
            Ok(p) => {
                let l = read_idx(&p)?;
                if l.dims.len() != 1 {
                    return Err(Error::Idx {
                        path: p,
                        reason: format!("expected 1 dimension for labels, found {:?}", l.dims),
                    });
                }
                if l.dims[0] != n {
                    return Err(Error::Data(format!(
                        "{} holds {} labels but {} holds {n} images",
                        p.display(),
                        l.dims[0],
                        images_path.display()
                    )));
                }
                Some(l.data)
            }
            Err(_) => None,
        };
        Ok(ImageSet {
            pixels: images.data,
            labels,
            n,
            rows,
            cols,
        })
    }

    /// Splits off the last `count` images as a validation set.
    pub fn split_off(&mut self, count: usize) -> Result<ImageSet> {
        if count >= self.n {
            return Err(Error::Config(format!(
                "validation size {count} leaves no training images (the set has {})",
                self.n
            )));
        }
        let keep = self.n - count;
        let pixels = self.pixels.split_off(keep * self.dim());
        let labels = self.labels.as_mut().map(|l| l.split_off(keep));
        self.n = keep;
        Ok(ImageSet {
            pixels,
            labels,
            n: count,
            rows: self.rows,
            cols: self.cols,
        })
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        if n < self.n {
            self.pixels.truncate(n * self.dim());
            if let Some(l) = self.labels.as_mut() {
                l.truncate(n);
            }
            self.n = n;
        }
    }
}
