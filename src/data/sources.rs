//! The data sources `data.dataset` names, read into one form: the training and test split of
//! either 8-bit images ([`RawImages`], planar `(N, C, H, W)`) or continuous rows ([`RealRows`],
//! `(N, D)`), both held as [`NpyData`]. `docs/data.md` describes every layout.
//!
//! A source without a test split of its own (a single `.npy`/`.npz` file, an image folder
//! without `train/` and `test/`) is split with the run seed: a permutation drawn from the
//! [`Stream::DataSplit`] stream puts `round(N * test_fraction)` rows (at least 1, at most
//! `N - 1`) into the test split; both splits keep the source's order.

use std::path::Path;

use super::cifar::load_cifar10;
use super::folder::Fit;
use super::folder_cache::load_image_folder_cached;
use super::images::{ImageSet, Split};
use super::npy::{read_npy, read_npy_labels, read_npz, read_numpy, NpyData};
use super::raw::{RawImages, RealRows};
use crate::config::DataConfig;
use crate::error::{Error, Result};
use crate::rng::{stream_rng, Stream};

/// The train/test split drawn for a source without a test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeededSplit {
    /// The run seed the permutation was drawn with.
    pub seed: u64,
    /// `data.test_fraction`.
    pub test_fraction: f64,
    /// Rows in the training split.
    pub train: usize,
    /// Rows in the test split.
    pub test: usize,
}

/// The training and test split of a source, and the split drawn when the source had none.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Training rows (validation rows are split off later, from the end).
    pub train: NpyData,
    /// Test rows, of the same kind and shape as `train`.
    pub test: NpyData,
    /// `Some` when the test split was drawn with the run seed.
    pub split: Option<SeededSplit>,
}

impl NpyData {
    /// Number of images or rows.
    pub fn len(&self) -> usize {
        match self {
            NpyData::Images(s) => s.n,
            NpyData::Rows(s) => s.n,
        }
    }

    /// True when there are no images or rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per image or row.
    pub fn dim(&self) -> usize {
        match self {
            NpyData::Images(s) => s.dim(),
            NpyData::Rows(s) => s.dim,
        }
    }

    /// Number of classes (0 without labels).
    pub fn num_classes(&self) -> usize {
        match self {
            NpyData::Images(s) => s.num_classes(),
            NpyData::Rows(s) => s.num_classes(),
        }
    }

    /// `(C, H, W)` of images; `(1, 1, D)` for rows.
    pub fn shape(&self) -> (usize, usize, usize) {
        match self {
            NpyData::Images(s) => (s.channels, s.height, s.width),
            NpyData::Rows(s) => (1, 1, s.dim),
        }
    }

    /// The rows `idx` (in that order), with their labels.
    pub fn select(&self, idx: &[usize]) -> NpyData {
        let pick = |l: &Option<Vec<u32>>| l.as_ref().map(|l| idx.iter().map(|&i| l[i]).collect());
        match self {
            NpyData::Images(s) => NpyData::Images(RawImages {
                pixels: idx.iter().flat_map(|&i| s.image(i)).copied().collect(),
                n: idx.len(),
                labels: pick(&s.labels),
                ..s.clone_empty()
            }),
            NpyData::Rows(s) => NpyData::Rows(RealRows {
                values: idx.iter().flat_map(|&i| s.row(i)).copied().collect(),
                n: idx.len(),
                dim: s.dim,
                labels: pick(&s.labels),
            }),
        }
    }

    /// Splits off the last `count` rows (a validation split).
    ///
    /// # Errors
    /// [`Error::Config`] when no training row would be left.
    pub fn split_off(&mut self, count: usize) -> Result<NpyData> {
        let n = self.len();
        if count >= n {
            return Err(Error::Config(format!(
                "validation size {count} leaves no training images (the set has {n})"
            )));
        }
        let tail = self.select(&(n - count..n).collect::<Vec<_>>());
        self.truncate(n - count);
        Ok(tail)
    }

    /// Keeps the first `n` rows.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        let d = self.dim();
        match self {
            NpyData::Images(s) => {
                s.pixels.truncate(n * d);
                s.n = n;
                if let Some(l) = s.labels.as_mut() {
                    l.truncate(n);
                }
            }
            NpyData::Rows(s) => {
                s.values.truncate(n * d);
                s.n = n;
                if let Some(l) = s.labels.as_mut() {
                    l.truncate(n);
                }
            }
        }
    }
}

impl RawImages {
    /// The same shape and class names with no images.
    fn clone_empty(&self) -> RawImages {
        RawImages {
            pixels: Vec::new(),
            n: 0,
            channels: self.channels,
            height: self.height,
            width: self.width,
            labels: None,
            classes: self.classes.clone(),
        }
    }
}

/// The per-column mean and standard deviation (population, summed in f64) of `rows`, for
/// `data.standardize`; a column without spread gets a standard deviation of 1.
pub fn column_stats(rows: &RealRows) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (rows.n.max(1) as f64, rows.dim);
    let mut sum = vec![0f64; d];
    let mut sq = vec![0f64; d];
    for row in rows.values.chunks_exact(d.max(1)) {
        for (j, &v) in row.iter().enumerate() {
            sum[j] += v as f64;
            sq[j] += v as f64 * v as f64;
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| {
            let s = (q / n - m * m).max(0.0).sqrt();
            if s > 1e-12 {
                s as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

/// Loads the source `cfg.dataset` names (not a synthetic set) from `cfg.dir`, drawing a test
/// split with `seed` when the source has none.
///
/// # Errors
/// [`Error::Data`] for a missing or unreadable source (as the readers report it), training and
/// test splits of different kinds, shapes or class names, and a source of fewer than 2 rows to
/// split; [`Error::Config`] for an unknown `cfg.dataset`.
pub fn load_source(cfg: &DataConfig, seed: u64) -> Result<Loaded> {
    let dir = &cfg.dir;
    let (train, test) = match cfg.dataset.as_str() {
        "mnist" | "idx" => {
            let train = RawImages::from_image_set(ImageSet::load(dir, Split::Train)?)?;
            let test = RawImages::from_image_set(ImageSet::load(dir, Split::Test)?)?;
            (NpyData::Images(train), Some(NpyData::Images(test)))
        }
        "cifar10" => {
            require_dir(dir, "cifar10", "the CIFAR-10 binary batches")?;
            (
                NpyData::Images(load_cifar10(dir, Split::Train)?),
                Some(NpyData::Images(load_cifar10(dir, Split::Test)?)),
            )
        }
        "folder" => {
            require_dir(dir, "folder", "an image folder")?;
            load_folder(dir, fit(cfg))?
        }
        "npy" => load_numpy(dir)?,
        other => {
            return Err(Error::Config(format!(
                "data.dataset = {other:?} is not a file source"
            )))
        }
    };
    match test {
        Some(test) => {
            check_agree(dir, &train, &test)?;
            Ok(Loaded {
                train,
                test,
                split: None,
            })
        }
        None => seeded_split(dir, train, cfg.test_fraction, seed),
    }
}

/// `data.crop` / `data.resize` as a [`Fit`].
fn fit(cfg: &DataConfig) -> Fit {
    match (cfg.crop, cfg.resize) {
        (Some([h, w]), _) => Fit::CenterCrop(h, w),
        (None, Some([h, w])) => Fit::Resize(h, w),
        (None, None) => Fit::Exact,
    }
}

/// An image folder, or its `train/` and `test/` sub-folders when both exist.
fn load_folder(dir: &Path, fit: Fit) -> Result<(NpyData, Option<NpyData>)> {
    let (train, test) = (dir.join("train"), dir.join("test"));
    if train.is_dir() && test.is_dir() {
        let train = load_image_folder_cached(&train, fit)?.0;
        let test = load_image_folder_cached(&test, fit)?.0;
        if train.classes != test.classes {
            return Err(Error::Data(format!(
                "{}: train/ has the classes {:?} but test/ has {:?}",
                dir.display(),
                train.classes,
                test.classes
            )));
        }
        return Ok((NpyData::Images(train), Some(NpyData::Images(test))));
    }
    Ok((NpyData::Images(load_image_folder_cached(dir, fit)?.0), None))
}

/// Refuses a `data.dir` that is not a directory, saying what the source reads (the readers'
/// own error would be the bare OS message).
fn require_dir(dir: &Path, dataset: &str, what: &str) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let hint = if dir.is_relative() {
        "; a relative data.dir is taken from the working directory"
    } else {
        ""
    };
    Err(Error::Data(format!(
        "{}: no such directory (data.dataset = \"{dataset}\" reads {what} in data.dir{hint})",
        dir.display()
    )))
}

/// A `.npy`/`.npz` file (no test split), or a directory holding `train.npz` [+ `test.npz`] or
/// `train.npy` [+ `train_labels.npy`] [+ `test.npy` [+ `test_labels.npy`]].
fn load_numpy(path: &Path) -> Result<(NpyData, Option<NpyData>)> {
    if path.is_file() {
        return Ok((read_numpy(path)?, None));
    }
    if !path.is_dir() {
        return Err(Error::Data(format!(
            "{}: no such file or directory (data.dataset = \"npy\" reads a .npy/.npz file or a directory holding train.npy or train.npz)",
            path.display()
        )));
    }
    if path.join("train.npz").is_file() {
        let test = path.join("test.npz");
        let test = test.is_file().then(|| read_npz(&test)).transpose()?;
        return Ok((read_npz(&path.join("train.npz"))?, test));
    }
    if path.join("train.npy").is_file() {
        let train = npy_with_labels(path, "train")?;
        let test = path.join("test.npy");
        let test = test
            .is_file()
            .then(|| npy_with_labels(path, "test"))
            .transpose()?;
        return Ok((train, test));
    }
    Err(Error::Data(format!(
        "{}: no train.npy or train.npz in this directory (see docs/data.md)",
        path.display()
    )))
}

/// `dir/<split>.npy` with the labels of `dir/<split>_labels.npy` when that exists.
fn npy_with_labels(dir: &Path, split: &str) -> Result<NpyData> {
    let path = dir.join(format!("{split}.npy"));
    let mut data = read_npy(&path)?;
    let label_path = dir.join(format!("{split}_labels.npy"));
    if !label_path.is_file() {
        return Ok(data);
    }
    let labels = read_npy_labels(&label_path)?;
    if labels.len() != data.len() {
        return Err(Error::Data(format!(
            "{} holds {} labels but {} holds {} rows",
            label_path.display(),
            labels.len(),
            path.display(),
            data.len()
        )));
    }
    match &mut data {
        NpyData::Images(s) => s.labels = Some(labels),
        NpyData::Rows(s) => s.labels = Some(labels),
    }
    Ok(data)
}

/// Refuses training and test splits that differ in kind or shape.
fn check_agree(dir: &Path, train: &NpyData, test: &NpyData) -> Result<()> {
    let kind = |d: &NpyData| match d {
        NpyData::Images(_) => "images",
        NpyData::Rows(_) => "rows",
    };
    if kind(train) != kind(test) || train.shape() != test.shape() {
        let (a, b) = (train.shape(), test.shape());
        return Err(Error::Data(format!(
            "{}: the training split is {} of shape {}x{}x{} but the test split is {} of shape {}x{}x{}",
            dir.display(),
            kind(train),
            a.0,
            a.1,
            a.2,
            kind(test),
            b.0,
            b.1,
            b.2
        )));
    }
    Ok(())
}

/// Splits `data` into training and test rows with `seed` (see the module documentation).
fn seeded_split(dir: &Path, data: NpyData, fraction: f64, seed: u64) -> Result<Loaded> {
    let n = data.len();
    if n < 2 {
        return Err(Error::Data(format!(
            "{}: {n} row(s) cannot be split into training and test rows",
            dir.display()
        )));
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut perm: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(&mut perm[..], &mut stream_rng(seed, Stream::DataSplit, 0));
    let mut test_idx = perm[..k].to_vec();
    let mut train_idx = perm[k..].to_vec();
    test_idx.sort_unstable();
    train_idx.sort_unstable();
    Ok(Loaded {
        train: data.select(&train_idx),
        test: data.select(&test_idx),
        split: Some(SeededSplit {
            seed,
            test_fraction: fraction,
            train: n - k,
            test: k,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> NpyData {
        NpyData::Rows(RealRows {
            values: (0..2 * n).map(|v| v as f32).collect(),
            n,
            dim: 2,
            labels: Some((0..n as u32).collect()),
        })
    }

    #[test]
    fn the_seeded_split_is_disjoint_ordered_and_repeatable() {
        let a = seeded_split(Path::new("x"), rows(20), 0.25, 3).unwrap();
        let b = seeded_split(Path::new("x"), rows(20), 0.25, 3).unwrap();
        let labels = |d: &NpyData| match d {
            NpyData::Rows(r) => r.labels.clone().unwrap(),
            _ => unreachable!(),
        };
        let (tr, te) = (labels(&a.train), labels(&a.test));
        assert_eq!((tr.len(), te.len()), (15, 5));
        assert!(tr.windows(2).all(|w| w[0] < w[1]) && te.windows(2).all(|w| w[0] < w[1]));
        assert!(te.iter().all(|l| !tr.contains(l)));
        assert_eq!(te, labels(&b.test));
        let c = seeded_split(Path::new("x"), rows(20), 0.25, 4).unwrap();
        assert_ne!(te, labels(&c.test));
        assert!(seeded_split(Path::new("x"), rows(1), 0.5, 0).is_err());
    }

    #[test]
    fn split_off_and_truncate_keep_labels_with_rows() {
        let mut d = rows(5);
        let v = d.split_off(2).unwrap();
        assert_eq!((d.len(), v.len()), (3, 2));
        match (&d, &v) {
            (NpyData::Rows(a), NpyData::Rows(b)) => {
                assert_eq!(a.labels, Some(vec![0, 1, 2]));
                assert_eq!(b.values, vec![6.0, 7.0, 8.0, 9.0]);
            }
            _ => unreachable!(),
        }
        d.truncate(1);
        assert_eq!(d.len(), 1);
        assert!(d.split_off(1).is_err());
    }
}
