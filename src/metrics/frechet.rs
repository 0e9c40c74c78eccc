//! The Frechet distance between Gaussians fitted to two sets of feature vectors, the quantity
//! behind FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
//! Local Nash Equilibrium", eq. 6; Dowson & Landau 1982):
//!
//! `d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`.
//!
//! `S_1 S_2` is not symmetric, but it is similar to the symmetric positive semi-definite
//! `S_1^{1/2} S_2 S_1^{1/2}`, so `Tr((S_1 S_2)^{1/2})` is the sum of the square roots of that
//! matrix's eigenvalues. Both square roots come from symmetric eigendecompositions in f64, which
//! avoids the complex round-off that `scipy.linalg.sqrtm` produces and the reference code has to
//! discard. Covariances are unbiased (divided by `n - 1`), as `numpy.cov` computes them.

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::{Error, Result};

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone)]
pub struct GaussianStats {
    pub mean: DVector<f64>,
    pub cov: DMatrix<f64>,
    /// Rows the statistics were computed from.
    pub n: usize,
}

/// Mean and unbiased covariance of the rows of `x` (`n x d`, any float type, any device), with
/// the products in f64.
pub fn gaussian_stats(x: &Tensor) -> Result<GaussianStats> {
    let (n, d) = x.dims2()?;
    if n < 2 {
        return Err(Error::Data(format!(
            "a covariance needs at least 2 rows, got {n}"
        )));
    }
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let mean = x.mean_keepdim(0)?;
    let centred = x.broadcast_sub(&mean)?;
    let cov = centred
        .t()?
        .matmul(&centred)?
        .affine(1.0 / (n - 1) as f64, 0.0)?;
    let mean: Vec<f64> = mean.flatten_all()?.to_vec1()?;
    let cov: Vec<f64> = cov.flatten_all()?.to_vec1()?;
    if mean.iter().chain(&cov).any(|v| !v.is_finite()) {
        return Err(Error::Data(
            "feature statistics are not finite (NaN or infinite samples?)".into(),
        ));
    }
    Ok(GaussianStats {
        mean: DVector::from_vec(mean),
        // Row-major and symmetric: the column-major reading is the same matrix.
        cov: DMatrix::from_vec(d, d, cov),
        n,
    })
}

/// `A^{1/2}` of a symmetric positive semi-definite matrix (negative round-off eigenvalues are
/// clamped to 0).
pub fn psd_sqrt(a: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(a.clone());
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// The squared Frechet distance between the Gaussians `a` and `b` (0 for identical statistics).
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.mean.len() != b.mean.len() {
        return Err(Error::Data(format!(
            "Frechet distance between {}-D and {}-D features",
            a.mean.len(),
            b.mean.len()
        )));
    }
    let diff = &a.mean - &b.mean;
    let s1_half = psd_sqrt(&a.cov);
    let mut m = &s1_half * &b.cov * &s1_half;
    // Symmetrize away the round-off of the products before the symmetric solver.
    m = (&m + m.transpose()) * 0.5;
    let cross: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    let d2 = diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * cross;
    // Round-off can leave identical statistics a hair below zero.
    Ok(d2.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mean: Vec<f64>, var: Vec<f64>) -> GaussianStats {
        GaussianStats {
            mean: DVector::from_vec(mean),
            cov: DMatrix::from_diagonal(&DVector::from_vec(var)),
            n: 1000,
        }
    }

    #[test]
    fn closed_form_for_diagonal_gaussians() {
        // d^2 = |m1 - m2|^2 + sum (s1 - s2)^2 for diagonal covariances s^2.
        let a = stats(vec![0.0, 1.0, -2.0], vec![1.0, 4.0, 0.25]);
        let b = stats(vec![1.0, 1.0, 0.0], vec![9.0, 1.0, 0.25]);
        let want = (1.0 + 0.0 + 4.0) + ((1.0f64 - 3.0).powi(2) + (2.0f64 - 1.0).powi(2) + 0.0);
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn identical_statistics_give_zero_and_the_distance_is_symmetric() {
        let x = Tensor::from_vec(
            (0..600)
                .map(|i| ((i * 37 % 101) as f32).sin())
                .collect::<Vec<f32>>(),
            (100, 6),
            &Device::Cpu,
        )
        .unwrap();
        let y = (x.sqr().unwrap() + 0.5).unwrap();
        let (sx, sy) = (gaussian_stats(&x).unwrap(), gaussian_stats(&y).unwrap());
        assert!(frechet_distance(&sx, &sx).unwrap() < 1e-9);
        let (d1, d2) = (
            frechet_distance(&sx, &sy).unwrap(),
            frechet_distance(&sy, &sx).unwrap(),
        );
        assert!(d1 > 0.1, "different sets must be apart: {d1}");
        assert!((d1 - d2).abs() < 1e-8 * d1.max(1.0), "{d1} vs {d2}");
    }

    #[test]
    fn full_covariance_matches_the_commuting_case() {
        // Rotated covariances that commute: S1 = R diag(a) R^T, S2 = R diag(b) R^T give
        // Tr(S1 + S2 - 2 (S1 S2)^{1/2}) = sum (sqrt(a) - sqrt(b))^2.
        let (c, s) = (0.6f64, 0.8f64);
        let r = DMatrix::from_row_slice(2, 2, &[c, -s, s, c]);
        let da = DMatrix::from_diagonal(&DVector::from_vec(vec![2.0, 0.5]));
        let db = DMatrix::from_diagonal(&DVector::from_vec(vec![8.0, 0.125]));
        let a = GaussianStats {
            mean: DVector::zeros(2),
            cov: &r * da * r.transpose(),
            n: 10,
        };
        let b = GaussianStats {
            mean: DVector::zeros(2),
            cov: &r * db * r.transpose(),
            n: 10,
        };
        let want = (2f64.sqrt() - 8f64.sqrt()).powi(2) + (0.5f64.sqrt() - 0.125f64.sqrt()).powi(2);
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn unbiased_covariance_like_numpy() {
        let x =
            Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0, 5.0, 9.0], (3, 2), &Device::Cpu).unwrap();
        let s = gaussian_stats(&x).unwrap();
        // numpy.cov(x.T): [[4, 7], [7, 13]]
        assert!((s.mean[0] - 3.0).abs() < 1e-12 && (s.mean[1] - 5.0).abs() < 1e-12);
        assert!((s.cov[(0, 0)] - 4.0).abs() < 1e-9);
        assert!((s.cov[(0, 1)] - 7.0).abs() < 1e-9);
        assert!((s.cov[(1, 1)] - 13.0).abs() < 1e-9);
    }
}
