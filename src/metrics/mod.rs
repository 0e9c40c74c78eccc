//! Sample-quality metrics for any model that samples (`trainer eval`, and cheap versions at the
//! end of every GAN epoch):
//!
//! - [`modes`]: mode coverage and high-quality share on the 8-Gaussian ring and 25-Gaussian grid;
//! - [`duplicates`]: the birthday-paradox duplicate test;
//! - [`classifier`], [`frechet`], [`classes`]: MNIST-FID, the Inception-Score analogue and the
//!   class histogram under gentrain's own MNIST classifier;
//! - [`spectrum`]: PCA spectra of generated and real data;
//! - [`own_data`]: for data other than MNIST and the 2-D sets, metrics that need no pretrained
//!   network: improved precision and recall ([`precision_recall`]) and MMD^2_u ([`mmd`]) on
//!   the pixels or rows ([`features`]), from exact distances ([`distances`]).

pub mod classes;
pub mod classifier;
pub mod distances;
pub mod duplicates;
pub mod features;
pub mod frechet;
pub mod mmd;
pub mod modes;
pub mod own_data;
pub mod precision_recall;
pub mod spectrum;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::data::images::{ImageSet, Split};
use crate::error::{Error, Result};
use crate::rng::{stream_rng, Stream};
use crate::session::{Datasets, Model};

use self::classifier::Classifier;
use self::duplicates::DuplicateReport;
use self::modes::ModeCoverage;
use self::own_data::OwnDataMetrics;
use self::spectrum::SpectrumReport;

/// Largest sample of the duplicate test (its cost grows with the square).
pub const DUPLICATE_SAMPLE: usize = 1000;

/// Metrics of generated images under the MNIST classifier.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMetrics {
    /// Frechet distance of classifier features, generated vs the test images.
    pub fid_mnist: f64,
    /// The same distance between as many training images and the test images: the floor a
    /// perfect model reaches at this sample size.
    pub fid_mnist_real: f64,
    /// Inception-Score analogue of the generated images (1 to 10).
    pub inception_score_mnist: f64,
    /// Inception-Score analogue of the test images.
    pub inception_score_mnist_real: f64,
    /// Share of generated images per predicted class.
    pub class_histogram: Vec<f64>,
    /// Classes that receive more than 5% of the generated images.
    pub classes_above_5_percent: usize,
    /// Smallest class share.
    pub min_class_fraction: f64,
    /// Test accuracy of the classifier.
    pub classifier_test_accuracy: f64,
    /// Conditional models: share of samples the classifier assigns to the label they were
    /// generated for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_accuracy: Option<f64>,
    #[serde(flatten)]
    pub spectrum: SpectrumReport,
}

/// Everything [`sample_metrics`] measured; absent parts do not apply to the data.
#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    /// Generated samples the metrics used.
    pub samples: usize,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub modes: Option<ModeCoverage>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageMetrics>,
    /// Data other than IDX images and the 2-D sets, with more than `k` test rows.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub own_data: Option<OwnDataMetrics>,
    /// Absent when the test data has fewer than 2 rows.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<DuplicateReport>,
}

impl SampleReport {
    /// Human-readable lines.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("sample metrics over {} samples:", self.samples)];
        if let Some(m) = &self.modes {
            out.push(format!(
                "  modes covered: {} / {} (>= {} high-quality samples each); high-quality samples: {:.1}%",
                m.modes_covered,
                m.modes_total,
                m.min_count,
                100.0 * m.high_quality_fraction
            ));
        }
        if let Some(i) = &self.images {
            out.push(format!(
                "  MNIST-FID: {:.3} (real training images vs test at this size: {:.3})",
                i.fid_mnist, i.fid_mnist_real
            ));
            out.push(format!(
                "  Inception-Score analogue: {:.3} (test images: {:.3}); classifier test accuracy {:.2}%",
                i.inception_score_mnist,
                i.inception_score_mnist_real,
                100.0 * i.classifier_test_accuracy
            ));
            let hist: Vec<String> = i
                .class_histogram
                .iter()
                .map(|f| format!("{:.1}", 100.0 * f))
                .collect();
            out.push(format!(
                "  class histogram (%): [{}]; {} classes above 5%",
                hist.join(", "),
                i.classes_above_5_percent
            ));
            if let Some(a) = i.label_accuracy {
                out.push(format!(
                    "  samples classified as the label they were generated for: {:.1}%",
                    100.0 * a
                ));
            }
            let head = |v: &[f64]| {
                v.iter()
                    .take(5)
                    .map(|f| format!("{f:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push(format!(
                "  PCA explained variance, first 5: generated [{}], real [{}]; L1 over {}: {:.3}; total variance ratio {:.3}",
                head(&i.spectrum.pca_generated),
                head(&i.spectrum.pca_real),
                spectrum::COMPONENTS,
                i.spectrum.pca_spectrum_l1,
                i.spectrum.total_variance_ratio
            ));
        }
        if let Some(o) = &self.own_data {
            out.extend(o.lines());
        }
        let Some(d) = &self.duplicates else {
            return out;
        };
        out.push(format!(
            "  duplicates: {} pairs among {} samples closer than {:.4} (closest generated pair {:.4}, closest real pair {:.4})",
            d.duplicate_pairs,
            d.duplicate_sample_size,
            d.duplicate_threshold,
            d.closest_pair_generated,
            d.closest_pair_real
        ));
        out
    }
}

/// `n` samples of `model` on the CPU, drawn in chunks from seeded streams.
pub fn draw_samples(model: &Model, n: usize, seed: u64) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (chunk, start) in (0..n).step_by(1000).enumerate() {
        let len = 1000.min(n - start);
        let mut rng = stream_rng(seed, Stream::Metrics, 1000 + chunk as u64);
        parts.push(model.sample(len, &mut rng)?.to_device(&Device::Cpu)?);
    }
    let x = Tensor::cat(&parts, 0)?;
    let bad = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    if bad > 0 {
        return Err(Error::NonFinite(format!(
            "{bad} of the generated values are NaN or infinite"
        )));
    }
    Ok(x)
}

/// True when `cfg` reads an IDX image set (MNIST and the like), the data the feature classifier
/// of the image metrics learns; other sources get the metrics that need no classifier.
fn is_idx(cfg: &Config) -> bool {
    matches!(cfg.data.dataset.as_str(), "mnist" | "idx")
}

/// Every sample metric that applies to `model` on the data of `cfg`, from `n` samples.
pub fn sample_metrics(
    model: &Model,
    cfg: &Config,
    data: &Datasets,
    n: usize,
    seed: u64,
) -> Result<SampleReport> {
    if n < 2 {
        return Err(Error::Config(
            "sample metrics need at least 2 samples".into(),
        ));
    }
    let generated = draw_samples(model, n, seed)?;
    let conditional = model.classes();
    let modes = match cfg.data.synthetic().and_then(|s| s.modes()) {
        Some((centres, std)) => Some(modes::mode_coverage(
            &generated.to_vec2::<f32>()?,
            &centres,
            std,
        )?),
        None => None,
    };
    // The real rows in model space: `[0, 1]` test images, or the 2-D test points.
    let own_data = if is_idx(cfg) || cfg.data.synthetic().is_some() {
        None
    } else {
        own_data::own_data_metrics(&generated, data, cfg.data.standardize, seed)?
    };
    let (real, images) = if is_idx(cfg) {
        let test = ImageSet::load(&cfg.data.dir, Split::Test)?;
        let real = classifier::scaled(&test, 0, test.n)?;
        let images = if test.labels.is_some() {
            let train = ImageSet::load(&cfg.data.dir, Split::Train)?;
            Some(image_metrics(cfg, &generated, &real, &train, conditional)?)
        } else {
            None
        };
        (real, images)
    } else {
        (data.test.range(0, data.test.len(), &Device::Cpu)?, None)
    };
    let s = n.min(DUPLICATE_SAMPLE).min(real.dim(0)?);
    let duplicates = if s >= 2 {
        let pick = random_rows(&real, s, seed)?;
        Some(duplicates::duplicate_test(
            &generated.narrow(0, 0, s)?,
            &pick,
        )?)
    } else {
        None
    };
    Ok(SampleReport {
        samples: n,
        modes,
        images,
        own_data,
        duplicates,
    })
}

/// `s` distinct indices below `n` drawn with a seeded stream.
fn random_indices(n: usize, s: usize, seed: u64) -> Result<Vec<usize>> {
    if s > n {
        return Err(Error::Data(format!("cannot draw {s} distinct rows of {n}")));
    }
    Ok(rand::seq::index::sample(&mut stream_rng(seed, Stream::Metrics, 2), n, s).into_vec())
}

/// `s` rows of `x` drawn without replacement with a seeded stream.
fn random_rows(x: &Tensor, s: usize, seed: u64) -> Result<Tensor> {
    let idx: Vec<u32> = random_indices(x.dim(0)?, s, seed)?
        .into_iter()
        .map(|i| i as u32)
        .collect();
    Ok(x.index_select(&Tensor::new(idx, x.device())?, 0)?)
}

/// MNIST-FID, the Inception-Score analogue, the class histogram and the PCA spectra of
/// `generated` (rows in `[0, 1]`) against the test images `real` (scaled to `[0, 1]`), with the
/// classifier of the training split `train`; for a model conditioned on `conditional` classes
/// (row `i` generated for label `i mod conditional`), the label accuracy.
pub fn image_metrics(
    cfg: &Config,
    generated: &Tensor,
    real: &Tensor,
    train: &ImageSet,
    conditional: usize,
) -> Result<ImageMetrics> {
    let clf = Classifier::for_training_set(&cfg.data.dir, train)?;
    let n = generated.dim(0)?;
    let (fg, pg) = clf.features_and_probs(generated)?;
    let (fr, pr) = clf.features_and_probs(real)?;
    let stats_real = frechet::gaussian_stats(&fr)?;
    let fid_mnist = frechet::frechet_distance(&frechet::gaussian_stats(&fg)?, &stats_real)?;
    // The floor: as many training images as generated ones, against the same test statistics.
    let pick = random_indices(train.n, n.min(train.n), 7)?;
    let pixels: Vec<f32> = pick
        .iter()
        .flat_map(|&i| train.image(i).iter().map(|&p| p as f32 / 255.0))
        .collect();
    let floor_rows = Tensor::from_vec(pixels, (pick.len(), train.dim()), &Device::Cpu)?;
    let (ft, _) = clf.features_and_probs(&floor_rows)?;
    let fid_mnist_real = frechet::frechet_distance(&frechet::gaussian_stats(&ft)?, &stats_real)?;
    let label_accuracy = if conditional > 0 {
        Some(classes::cycling_label_accuracy(
            &pg.argmax(1)?.to_vec1::<u32>()?,
            conditional,
        ))
    } else {
        None
    };
    let pg: Vec<Vec<f32>> = pg.to_vec2()?;
    let class_histogram = classes::class_histogram(&pg, clf.classes)?;
    let spectrum = spectrum::compare_spectra(
        &frechet::gaussian_stats(generated)?,
        &frechet::gaussian_stats(real)?,
    );
    Ok(ImageMetrics {
        fid_mnist,
        fid_mnist_real,
        inception_score_mnist: classes::inception_score(&pg)?,
        inception_score_mnist_real: classes::inception_score(&pr.to_vec2()?)?,
        classes_above_5_percent: class_histogram.iter().filter(|&&f| f > 0.05).count(),
        min_class_fraction: class_histogram.iter().copied().fold(1.0, f64::min),
        class_histogram,
        classifier_test_accuracy: clf.test_accuracy,
        label_accuracy,
        spectrum,
    })
}

/// Cheap figures of a model's samples for epoch-end logs: mode coverage on the 2-D mixtures
/// (2,500 samples); MNIST-FID and the smallest class share on labelled IDX images
/// (`eval.epoch_samples` samples, 2,000 by default; 0 skips them); on other data, improved
/// precision and recall and MMD^2_u ([`own_data`], `eval.epoch_samples` samples, at most
/// [`own_data::MAX_ROWS`]; 0 skips them).
pub fn quick_sample_figures(
    model: &Model,
    cfg: &Config,
    data: &Datasets,
) -> Result<Vec<(&'static str, f64)>> {
    let seed = cfg.train.seed;
    if let Some(set) = cfg.data.synthetic() {
        let Some((centres, std)) = set.modes() else {
            return Ok(Vec::new());
        };
        let x = draw_samples(model, 2500, seed)?;
        let r = modes::mode_coverage(&x.to_vec2()?, &centres, std)?;
        return Ok(vec![
            ("modes_covered", r.modes_covered as f64),
            ("high_quality_fraction", r.high_quality_fraction),
        ]);
    }
    let n = cfg.eval.epoch_samples;
    if !is_idx(cfg) {
        // The feature classifier is trained on grey IDX images only: the metrics without it.
        return quick_own_data_figures(model, cfg, data, n.min(own_data::MAX_ROWS));
    }
    let test = ImageSet::load(&cfg.data.dir, Split::Test)?;
    if test.labels.is_none() || n == 0 {
        return Ok(Vec::new());
    }
    let clf = Classifier::for_data_dir(&cfg.data.dir)?;
    let (fg, pg) = clf.features_and_probs(&draw_samples(model, n, seed)?)?;
    let (fr, _) = clf.features_and_probs(&classifier::scaled(&test, 0, test.n)?)?;
    let fid = frechet::frechet_distance(
        &frechet::gaussian_stats(&fg)?,
        &frechet::gaussian_stats(&fr)?,
    )?;
    let hist = classes::class_histogram(&pg.to_vec2()?, clf.classes)?;
    Ok(vec![
        ("fid_mnist_quick", fid),
        ("fid_quick_samples", n as f64),
        (
            "min_class_fraction",
            hist.iter().copied().fold(1.0, f64::min),
        ),
    ])
}

/// [`own_data::own_data_metrics`] of `n` samples as epoch-end figures (`precision_quick`,
/// `recall_quick`, `mmd2_quick`); none when `n` or the test split is too small.
fn quick_own_data_figures(
    model: &Model,
    cfg: &Config,
    data: &Datasets,
    n: usize,
) -> Result<Vec<(&'static str, f64)>> {
    if n <= precision_recall::K || data.test.len() <= precision_recall::K {
        return Ok(Vec::new());
    }
    let seed = cfg.train.seed;
    let x = draw_samples(model, n, seed)?;
    let Some(m) = own_data::own_data_metrics(&x, data, cfg.data.standardize, seed)? else {
        return Ok(Vec::new());
    };
    Ok(vec![
        ("precision_quick", m.precision_recall.precision),
        ("recall_quick", m.precision_recall.recall),
        ("mmd2_quick", m.mmd.mmd2),
    ])
}
