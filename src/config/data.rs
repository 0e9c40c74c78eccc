//! `[data]`: the data set and how its pixels become model inputs. `data.dataset`, `data.crop`,
//! `data.resize` and `data.test_fraction` are structural; the rest may change on resume.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Data settings (`[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `mnist` or `idx` (the IDX image set in `dir`; the two are read the same way), `npy`
    /// (a `.npy`/`.npz` file or a directory of them in `dir`), `cifar10` (the binary batches
    /// in `dir`), `folder` (an image folder in `dir`, or `dir/train` and `dir/test`) or a
    /// synthetic 2-D set: `ring8`, `grid25`, `moons` or `checkerboard` ([`Synthetic`]).
    /// `docs/data.md` describes every layout. Default: `mnist`.
    pub dataset: String,
    /// Directory (or, for `npy`, file) of the data (relative paths are taken from the working directory).
    /// Default: `data/mnist`.
    pub dir: PathBuf,
    /// How 8-bit pixels become model inputs: `dynamic`, `fixed`, `none` or `dequantize`
    /// ([`Binarization`]). Unused on synthetic sets. Default: `dynamic`.
    pub binarize: Binarization,
    /// Validation rows: training images held out from the end of the training set, or for a
    /// synthetic set points drawn apart from the training points (0: no validation split).
    /// Default: 0.
    pub validation: usize,
    /// Train on the first N training images only, in rows (0: all). Default: 0.
    pub limit_train: usize,
    /// Points (rows) of a synthetic training set. Default: 50,000.
    pub synthetic_size: usize,
    /// Image folders: cut the central `[height, width]` window out of every image. Excludes
    /// `resize`. Default: none (every image must have the same size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<[usize; 2]>,
    /// Image folders: scale every image to `[height, width]` (bilinear). Excludes `crop`.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// Fraction of the rows held out as the test split, drawn with the run seed, for a source
    /// that has no test split of its own (a single `.npy`/`.npz` file, a folder without
    /// `train`/`test`); in `(0, 1)`. Default: 0.1.
    pub test_fraction: f64,
    /// Flip each training image horizontally with probability 1/2, drawn afresh for every
    /// minibatch (keyed by the step). Images only. Default: false.
    pub flip: bool,
    /// Continuous rows (`npy` floating-point data): subtract the training split's per-column
    /// mean and divide by its standard deviation. Default: true.
    pub standardize: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "mnist".into(),
            dir: PathBuf::from("data/mnist"),
            binarize: Binarization::Dynamic,
            validation: 0,
            limit_train: 0,
            synthetic_size: 50_000,
            crop: None,
            resize: None,
            test_fraction: 0.1,
            flip: false,
            standardize: true,
        }
    }
}

/// The `data.dataset` values that name a source read from files (the rest are synthetic).
pub const FILE_DATASETS: [&str; 5] = ["mnist", "idx", "npy", "cifar10", "folder"];

impl DataConfig {
    /// Checks the preprocessing settings.
    ///
    /// # Errors
    /// [`crate::error::Error::Config`] naming the field: both `crop` and `resize`, a zero size,
    /// `test_fraction` outside `(0, 1)`, `crop`/`resize` on a source other than `folder`.
    pub fn validate(&self) -> crate::error::Result<()> {
        let err = |m: String| Err(crate::error::Error::Config(m));
        if self.crop.is_some() && self.resize.is_some() {
            return err("data.crop and data.resize exclude each other: set one".into());
        }
        for (name, size) in [("crop", self.crop), ("resize", self.resize)] {
            if let Some([h, w]) = size {
                if h == 0 || w == 0 {
                    return err(format!("data.{name} = [{h}, {w}]: sizes must be positive"));
                }
                if self.dataset != "folder" {
                    return err(format!(
                        "data.{name} applies to data.dataset = \"folder\" only"
                    ));
                }
            }
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return err(format!(
                "data.test_fraction = {}: must lie in (0, 1)",
                self.test_fraction
            ));
        }
        Ok(())
    }

    /// The synthetic set named by `dataset`, if it is one.
    pub fn synthetic(&self) -> Option<Synthetic> {
        serde_json::from_value(serde_json::Value::String(self.dataset.clone())).ok()
    }
}

/// How 8-bit pixels become model inputs (`data.binarize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Binarization {
    /// Resample `x ~ Bernoulli(pixel / 255)` for every minibatch.
    #[default]
    Dynamic,
    /// Sample the binary images once.
    Fixed,
    /// No binarization: `x = pixel / 255`.
    None,
    /// Uniform dequantization: `x = (pixel + u) / 256`, `u ~ U[0, 1)` for every minibatch.
    Dequantize,
}

/// A synthetic 2-D distribution (`data.dataset`); the data layer (`data::synthetic`) draws its
/// points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synthetic {
    /// 8 Gaussians on a circle of radius 2, standard deviation 0.02.
    Ring8,
    /// 25 Gaussians on the grid {-4,-2,0,2,4}^2, standard deviation 0.05.
    Grid25,
    /// Two interleaving half circles with Gaussian noise 0.1.
    Moons,
    /// Uniform on the black squares of a 4x4 checkerboard on [-4, 4)^2.
    Checkerboard,
}
