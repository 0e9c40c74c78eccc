//! PCA spectrum: the eigenvalues of the sample covariance in decreasing order, normalized by
//! the total variance. A generator that ignores directions of variation has a spectrum that
//! falls faster than the data's; one that adds noise, slower. We report both spectra and the L1
//! distance between their leading parts, plus the ratio of total variances.

use nalgebra::SymmetricEigen;
use serde::Serialize;

use super::frechet::GaussianStats;

/// Components reported.
pub const COMPONENTS: usize = 20;

/// Generated and real spectra side by side.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpectrumReport {
    /// Leading explained-variance fractions of the generated samples.
    pub pca_generated: Vec<f64>,
    /// Leading explained-variance fractions of the real data.
    pub pca_real: Vec<f64>,
    /// `sum_i |generated_i - real_i|` over the leading components.
    pub pca_spectrum_l1: f64,
    /// Total variance of the generated samples over that of the real data.
    pub total_variance_ratio: f64,
}

/// Eigenvalues of a covariance in decreasing order (negative round-off clamped to 0).
pub fn eigenvalues(stats: &GaussianStats) -> Vec<f64> {
    let mut e: Vec<f64> = SymmetricEigen::new(stats.cov.clone())
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0))
        .collect();
    e.sort_by(|a, b| b.total_cmp(a));
    e
}

/// Leading `k` eigenvalues as fractions of the total variance (all zeros for constant data).
pub fn explained_variance(eig: &[f64], k: usize) -> Vec<f64> {
    let total: f64 = eig.iter().sum();
    eig.iter()
        .take(k)
        .map(|l| if total > 0.0 { l / total } else { 0.0 })
        .collect()
}

/// Compares the spectra of generated and real statistics.
pub fn compare_spectra(generated: &GaussianStats, real: &GaussianStats) -> SpectrumReport {
    let (eg, er) = (eigenvalues(generated), eigenvalues(real));
    let (g, r) = (
        explained_variance(&eg, COMPONENTS),
        explained_variance(&er, COMPONENTS),
    );
    let total_real: f64 = er.iter().sum();
    SpectrumReport {
        pca_spectrum_l1: g.iter().zip(&r).map(|(a, b)| (a - b).abs()).sum(),
        total_variance_ratio: if total_real > 0.0 {
            eg.iter().sum::<f64>() / total_real
        } else {
            f64::NAN
        },
        pca_generated: g,
        pca_real: r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::{DMatrix, DVector};

    #[test]
    fn spectrum_of_a_rotated_diagonal_covariance() {
        let (c, s) = (0.6f64, 0.8f64);
        let r = DMatrix::from_row_slice(3, 3, &[c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]);
        let d = DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 6.0, 3.0]));
        let stats = GaussianStats {
            mean: DVector::zeros(3),
            cov: &r * d * r.transpose(),
            n: 10,
        };
        let e = eigenvalues(&stats);
        for (g, w) in e.iter().zip([6.0, 3.0, 1.0]) {
            assert!((g - w).abs() < 1e-9, "{e:?}");
        }
        let fractions = explained_variance(&e, 2);
        assert!((fractions[0] - 0.6).abs() < 1e-12 && (fractions[1] - 0.3).abs() < 1e-12);
        let rep = compare_spectra(&stats, &stats);
        assert!(rep.pca_spectrum_l1 < 1e-12);
        assert!((rep.total_variance_ratio - 1.0).abs() < 1e-12);
    }
}
