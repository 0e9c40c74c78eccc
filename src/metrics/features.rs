//! The feature space of the sample metrics that need no pretrained network
//! ([`super::precision_recall`], [`super::mmd`]).
//!
//! - **Images**: the pixels themselves scaled to `[0, 1]` (real images `pixel / 255`, generated
//!   ones clamped to `[0, 1]`), flattened `C * H * W` values per image. When that is more than
//!   [`MAX_DIM`] values, every vector is multiplied by one fixed random projection to
//!   [`MAX_DIM`] dimensions: a `MAX_DIM x D` matrix of Gaussian entries drawn from a ChaCha8
//!   stream seeded with [`PROJECTION_SEED`] (the same for every run and data set of that `D`),
//!   whose rows are then orthonormalized (modified Gram-Schmidt). Orthonormal rows keep
//!   distances within the projected subspace, and by Johnson-Lindenstrauss shrink all distances
//!   by about the same factor `sqrt(MAX_DIM / D)`, which neither metric depends on.
//! - **Rows** (continuous data): the rows as the model sees them (standardized when
//!   `data.standardize` is on), projected the same way when wider than [`MAX_DIM`].

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::distances::{dot, Features};
use crate::error::{Error, Result};

/// Widest feature vector: wider data are projected to this many dimensions.
pub const MAX_DIM: usize = 256;

/// Seed of the fixed random projection.
pub const PROJECTION_SEED: u64 = 0x5eed_0017;

/// A `k x d` matrix (row-major, `k <= d`) with orthonormal rows, drawn from Gaussian entries
/// seeded with `seed` and orthonormalized by modified Gram-Schmidt (a row that loses its norm
/// is redrawn).
///
/// # Errors
/// [`Error::Data`] when `k > d` or `k == 0`.
pub fn orthonormal_projection(k: usize, d: usize, seed: u64) -> Result<Vec<f64>> {
    if k == 0 || k > d {
        return Err(Error::Data(format!(
            "cannot project {d} dimensions onto {k} orthonormal directions"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut m: Vec<f64> = Vec::with_capacity(k * d);
    while m.len() < k * d {
        let mut row: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
        for prev in m.chunks_exact(d) {
            let dot: f64 = row.iter().zip(prev).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(prev).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-6 {
            m.extend(row.iter().map(|a| a / norm));
        }
    }
    Ok(m)
}

/// The feature vectors of `n` rows of `d` values (`x.len() == n * d`): the values as f64,
/// clamped to `[lo, hi]` when `clamp` is given, projected by `projection` (`k x d`, from
/// [`orthonormal_projection`]) when given.
///
/// # Errors
/// [`Error::Data`] when the sizes disagree; [`Error::NonFinite`] for a NaN or infinite value.
pub fn features(
    x: &[f32],
    n: usize,
    d: usize,
    clamp: Option<(f64, f64)>,
    projection: Option<&[f64]>,
) -> Result<Features> {
    if d == 0 || n.checked_mul(d) != Some(x.len()) {
        return Err(Error::Data(format!(
            "{} values cannot be {n} rows of {d}",
            x.len()
        )));
    }
    let value = |v: f32| match clamp {
        Some((lo, hi)) if v.is_finite() => (v as f64).clamp(lo, hi),
        _ => v as f64,
    };
    let Some(p) = projection else {
        return Features::new(x.iter().map(|&v| value(v)).collect(), n, d);
    };
    if p.is_empty() || p.len() % d != 0 {
        return Err(Error::Data(format!(
            "a projection of {} values does not fit rows of {d}",
            p.len()
        )));
    }
    let k = p.len() / d;
    let mut out = vec![0.0; n * k];
    out.par_chunks_mut(k)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let row: Vec<f64> = row.iter().map(|&v| value(v)).collect();
            for (c, dir) in o.iter_mut().zip(p.chunks_exact(d)) {
                *c = dot(dir, &row);
            }
        });
    Features::new(out, n, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_has_orthonormal_rows_and_is_fixed() {
        let p = orthonormal_projection(8, 20, PROJECTION_SEED).unwrap();
        for i in 0..8 {
            for j in 0..8 {
                let dot: f64 = (0..20).map(|c| p[i * 20 + c] * p[j * 20 + c]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9, "{i},{j}: {dot}");
            }
        }
        assert_eq!(p, orthonormal_projection(8, 20, PROJECTION_SEED).unwrap());
        assert!(orthonormal_projection(21, 20, 0).is_err());
    }

    #[test]
    fn features_clamp_and_project() {
        let x = [2.0f32, -1.0, 0.5, 0.25];
        let f = features(&x, 2, 2, Some((0.0, 1.0)), None).unwrap();
        assert_eq!(f.values, vec![1.0, 0.0, 0.5, 0.25]);
        // A square orthonormal projection keeps distances.
        let p = orthonormal_projection(2, 2, 1).unwrap();
        let g = features(&x, 2, 2, None, Some(&p)).unwrap();
        let dist = |f: &Features| {
            let (a, b) = (f.row(0), f.row(1));
            ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
        };
        let plain = features(&x, 2, 2, None, None).unwrap();
        assert!((dist(&g) - dist(&plain)).abs() < 1e-9);
        assert!(features(&x, 3, 2, None, None).is_err());
        assert!(features(&[f32::NAN, 0.0], 1, 2, Some((0.0, 1.0)), None).is_err());
    }
}
