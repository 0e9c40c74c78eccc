//! `[data]`: the data set and how its pixels become model inputs. `data.dataset` is structural;
//! the rest may change on resume.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Data settings (`[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `mnist` or `idx` (the IDX image set in `dir`; the two are read the same way) or a
    /// synthetic 2-D set: `ring8`, `grid25`, `moons` or `checkerboard` ([`Synthetic`]).
    /// Default: `mnist`.
    pub dataset: String,
    /// Directory of the IDX files (relative paths are taken from the working directory).
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
        }
    }
}

impl DataConfig {
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
