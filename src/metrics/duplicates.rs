//! The birthday-paradox test for the support size of a generator (Arora & Zhang 2017, "Do GANs
//! Learn the Distribution? Some Theory and Empirics"): if a sample of size `s` contains a
//! near-duplicate pair with good probability, the distribution's support is about `s^2`.
//!
//! Arora and Zhang judged "near-duplicate" by eye. We make the judgement automatic and
//! calibrated: a generated pair counts as a duplicate when it is closer (Euclidean) than half the
//! closest pair of an equally large sample of real data. An i.i.d. sample from the data
//! distribution therefore almost never has one, while a collapsed generator has many.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};

/// Fraction of the real sample's closest-pair distance below which a pair is a duplicate.
pub const THRESHOLD_FRACTION: f64 = 0.5;

/// What [`duplicate_test`] reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DuplicateReport {
    /// The sample size `s` of both samples.
    pub duplicate_sample_size: usize,
    /// Generated pairs closer than the threshold.
    pub duplicate_pairs: usize,
    /// The threshold: [`THRESHOLD_FRACTION`] times the real sample's closest-pair distance.
    pub duplicate_threshold: f64,
    /// Distance of the closest generated pair.
    pub closest_pair_generated: f64,
    /// Distance of the closest real pair.
    pub closest_pair_real: f64,
}

/// Euclidean distances of all pairs `i < j` of the rows of `x` (`s x d`), through one Gram
/// matrix in f64.
pub fn pair_distances(x: &Tensor) -> Result<Vec<f64>> {
    let (s, _) = x.dims2()?;
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let gram: Vec<Vec<f64>> = x.matmul(&x.t()?)?.to_vec2()?;
    let mut out = Vec::with_capacity(s * s.saturating_sub(1) / 2);
    for i in 0..s {
        for j in i + 1..s {
            let d2 = gram[i][i] + gram[j][j] - 2.0 * gram[i][j];
            out.push(d2.max(0.0).sqrt());
        }
    }
    Ok(out)
}

/// Runs the test on `generated` and `real` samples of the same size (at least 2 rows each).
pub fn duplicate_test(generated: &Tensor, real: &Tensor) -> Result<DuplicateReport> {
    let (s, d) = generated.dims2()?;
    let (s_real, d_real) = real.dims2()?;
    if s < 2 || s != s_real || d != d_real {
        return Err(Error::Data(format!(
            "the duplicate test needs two samples of the same size (>= 2) and width, got {s}x{d} and {s_real}x{d_real}"
        )));
    }
    let gen = pair_distances(generated)?;
    let real = pair_distances(real)?;
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let closest_real = min(&real);
    let threshold = THRESHOLD_FRACTION * closest_real;
    Ok(DuplicateReport {
        duplicate_sample_size: s,
        duplicate_pairs: gen.iter().filter(|&&g| g < threshold || g == 0.0).count(),
        duplicate_threshold: threshold,
        closest_pair_generated: min(&gen),
        closest_pair_real: closest_real,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{normal_vec, stream_rng, Stream};

    fn gaussian(s: usize, d: usize, seed: u64) -> Tensor {
        let v = normal_vec(&mut stream_rng(seed, Stream::Metrics, 0), s * d);
        Tensor::from_vec(v, (s, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn distances_match_a_direct_computation() {
        let x =
            Tensor::from_vec(vec![0f32, 0.0, 3.0, 4.0, 1.0, 1.0], (3, 2), &Device::Cpu).unwrap();
        let d = pair_distances(&x).unwrap();
        let want = [5.0, 2f64.sqrt(), 13f64.sqrt()];
        for (g, w) in d.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{d:?}");
        }
    }

    #[test]
    fn an_iid_sample_has_no_duplicates_and_copies_are_found() {
        let real = gaussian(400, 8, 1);
        let fresh = gaussian(400, 8, 2);
        assert_eq!(duplicate_test(&fresh, &real).unwrap().duplicate_pairs, 0);
        // 390 fresh rows plus 10 copies of row 0..10 (with tiny noise): at least 10 pairs.
        let rows: Vec<Vec<f32>> = fresh.to_vec2().unwrap();
        let mut v: Vec<f32> = rows[..390].concat();
        for r in &rows[..10] {
            v.extend(r.iter().map(|x| x + 1e-4));
        }
        let copied = Tensor::from_vec(v, (400, 8), &Device::Cpu).unwrap();
        let r = duplicate_test(&copied, &real).unwrap();
        assert!(r.duplicate_pairs >= 10, "{r:?}");
        // A fully collapsed generator: every pair is a duplicate.
        let collapsed = Tensor::ones((50, 8), DType::F32, &Device::Cpu).unwrap();
        let r = duplicate_test(&collapsed, &real.narrow(0, 0, 50).unwrap()).unwrap();
        assert_eq!(r.duplicate_pairs, 50 * 49 / 2);
    }
}
