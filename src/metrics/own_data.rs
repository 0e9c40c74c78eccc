//! The sample metrics of data other than MNIST, which need no pretrained network: improved
//! precision and recall ([`super::precision_recall`]) and MMD^2_u with a Gaussian kernel
//! ([`super::mmd`]), both in the feature space of [`super::features`], on at most
//! [`MAX_ROWS`] generated and [`MAX_ROWS`] test rows.

use candle_core::Tensor;
use serde::Serialize;

use super::distances::{Features, Pairwise};
use super::features::{features, orthonormal_projection, MAX_DIM, PROJECTION_SEED};
use super::mmd::{mmd2_median, Mmd};
use super::precision_recall::{precision_recall, PrecisionRecall, K};
use crate::error::Result;
use crate::session::Datasets;

/// Largest number of generated rows, and of test rows, the metrics use (their cost grows with
/// the square: three distance matrices of at most `MAX_ROWS^2` f64 values).
pub const MAX_ROWS: usize = 2000;

/// What [`own_data_metrics`] measures.
#[derive(Debug, Clone, Serialize)]
pub struct OwnDataMetrics {
    #[serde(flatten)]
    pub precision_recall: PrecisionRecall,
    #[serde(flatten)]
    pub mmd: Mmd,
    /// The kernel statistic: `"MMD^2_u, Gaussian kernel, median-heuristic bandwidth"`.
    pub mmd2_kernel: String,
    /// Generated rows the metrics used.
    pub metric_rows_generated: usize,
    /// Test rows the metrics used.
    pub metric_rows_real: usize,
    /// The feature space, in words.
    pub feature_space: String,
}

impl OwnDataMetrics {
    /// Human-readable lines.
    pub fn lines(&self) -> Vec<String> {
        let pr = &self.precision_recall;
        vec![
            format!(
                "  improved precision / recall (k = {}): {:.3} / {:.3} ({} generated vs {} test rows)",
                pr.pr_k,
                pr.precision,
                pr.recall,
                self.metric_rows_generated,
                self.metric_rows_real
            ),
            format!(
                "  MMD^2 (unbiased, Gaussian kernel, bandwidth = median pooled distance {:.4}): {:.5}",
                self.mmd.mmd2_bandwidth, self.mmd.mmd2
            ),
            format!("  feature space: {}", self.feature_space),
        ]
    }
}

/// The metrics of `generated` (rows in model space, `n x dim` or wider: extra columns are
/// ignored) against the test split of `data`; `standardized` says the rows (not images) were
/// standardized. `None` when either side has `K` rows or fewer. Test rows are drawn with
/// `seed` when there are more than [`MAX_ROWS`].
///
/// # Errors
/// [`crate::error::Error::NonFinite`] for a non-finite generated value; shape errors.
pub fn own_data_metrics(
    generated: &Tensor,
    data: &Datasets,
    standardized: bool,
    seed: u64,
) -> Result<Option<OwnDataMetrics>> {
    let d = data.dim();
    let ng = generated.dim(0)?.min(MAX_ROWS);
    let nr = data.test.len().min(MAX_ROWS);
    if ng <= K || nr <= K || generated.dim(1)? < d {
        return Ok(None);
    }
    let mut pick = super::random_indices(data.test.len(), nr, seed)?;
    pick.sort_unstable();
    let real = data.test.plain_rows(&pick)?;
    let gen: Vec<f32> = generated
        .narrow(0, 0, ng)?
        .narrow(1, 0, d)?
        .flatten_all()?
        .to_vec1()?;
    let images = crate::session::is_image(data.image_shape());
    let (c, h, w) = data.image_shape();
    let projection = if d > MAX_DIM {
        Some(orthonormal_projection(MAX_DIM, d, PROJECTION_SEED)?)
    } else {
        None
    };
    let clamp = images.then_some((0.0, 1.0));
    let fr = features(&real, nr, d, clamp, projection.as_deref())?;
    let fg = features(&gen, ng, d, clamp, projection.as_deref())?;
    let feature_space = describe(images, standardized, (c, h, w), projection.is_some());
    measure(&fr, &fg, feature_space)
}

fn measure(
    real: &Features,
    gen: &Features,
    feature_space: String,
) -> Result<Option<OwnDataMetrics>> {
    let p = Pairwise::new(real, gen)?;
    Ok(Some(OwnDataMetrics {
        precision_recall: precision_recall(&p, K)?,
        mmd: mmd2_median(&p)?,
        mmd2_kernel: "MMD^2_u, Gaussian kernel, median-heuristic bandwidth".into(),
        metric_rows_generated: gen.n,
        metric_rows_real: real.n,
        feature_space,
    }))
}

/// The feature space in words, e.g. `"pixels in [0, 1], 3x32x32 = 3072 values, random
/// orthonormal projection to 256 dimensions (seed 0x5eed0017)"`.
fn describe(
    images: bool,
    standardized: bool,
    (c, h, w): (usize, usize, usize),
    projected: bool,
) -> String {
    let d = c * h * w;
    let base = if images {
        format!("pixels in [0, 1], {c}x{h}x{w} = {d} values")
    } else if standardized {
        format!("standardized rows, {d} values")
    } else {
        format!("rows, {d} values")
    };
    if projected {
        format!("{base}, random orthonormal projection to {MAX_DIM} dimensions (seed {PROJECTION_SEED:#x})")
    } else {
        format!("{base}, no projection")
    }
}
