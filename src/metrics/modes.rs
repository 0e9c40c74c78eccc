//! Mode coverage on Gaussian mixtures with known centres (the 8-Gaussian ring and the
//! 25-Gaussian grid), following the protocol of Srivastava et al. 2017 ("VEEGAN", section 5.1)
//! and its successors: each sample is assigned to its nearest centre and counts as *high
//! quality* when it lies within 3 standard deviations of it. We count a mode as *covered* when
//! it receives at least [`MIN_COUNT_FRACTION`] of the high-quality samples a uniform model would
//! give it (with 2,500 samples on the 25-grid: 20 of the expected 100), a rule stricter than
//! "one sample", so that a few stray samples do not count as a learned mode.
//!
//! For a perfect model in 2-D the expected high-quality fraction is the chi-square(2)
//! probability of radius 3: `1 - exp(-9/2) = 0.9889`.

use serde::Serialize;

use crate::error::{Error, Result};

/// Share of the uniform expectation a mode must receive to count as covered.
pub const MIN_COUNT_FRACTION: f64 = 0.2;

/// What [`mode_coverage`] reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModeCoverage {
    /// Modes with at least `min_count` high-quality samples.
    pub modes_covered: usize,
    pub modes_total: usize,
    /// Share of samples within 3 standard deviations of their nearest mode.
    pub high_quality_fraction: f64,
    /// High-quality samples per mode.
    pub per_mode: Vec<usize>,
    /// The coverage threshold used.
    pub min_count: usize,
}

/// Mode coverage of 2-D `samples` on the mixture with `centres` and per-axis `std`.
pub fn mode_coverage(samples: &[Vec<f32>], centres: &[[f32; 2]], std: f32) -> Result<ModeCoverage> {
    if samples.is_empty() || centres.is_empty() {
        return Err(Error::Data(
            "mode coverage needs samples and mode centres".into(),
        ));
    }
    if let Some(s) = samples.iter().find(|s| s.len() != 2) {
        return Err(Error::Data(format!(
            "mode coverage needs 2-D samples, got a row of {} values",
            s.len()
        )));
    }
    let mut per_mode = vec![0usize; centres.len()];
    let mut hq = 0usize;
    let limit = (3.0 * std as f64).powi(2);
    for s in samples {
        if !(s[0].is_finite() && s[1].is_finite()) {
            continue; // a non-finite sample is not high quality
        }
        let (best, d2) = centres
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let dx = (s[0] - c[0]) as f64;
                let dy = (s[1] - c[1]) as f64;
                (i, dx * dx + dy * dy)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one centre");
        if d2 <= limit {
            per_mode[best] += 1;
            hq += 1;
        }
    }
    let expected = samples.len() as f64 / centres.len() as f64;
    let min_count = ((MIN_COUNT_FRACTION * expected).ceil() as usize).max(1);
    Ok(ModeCoverage {
        modes_covered: per_mode.iter().filter(|&&c| c >= min_count).count(),
        modes_total: centres.len(),
        high_quality_fraction: hq as f64 / samples.len() as f64,
        per_mode,
        min_count,
    })
}
