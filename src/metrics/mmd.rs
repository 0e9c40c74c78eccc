//! The unbiased estimate of the squared maximum mean discrepancy, MMD^2_u (Gretton, Borgwardt,
//! Rasch, Schölkopf and Smola 2012, "A Kernel Two-Sample Test", JMLR 13, eq. 3 / Lemma 6):
//!
//! `MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
//!            - 2/(mn) sum_{i, j} k(x_i, y_j)`
//!
//! for `m` real vectors `x` and `n` generated vectors `y`, with the Gaussian kernel
//! `k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`. The bandwidth `sigma` is the median heuristic:
//! the median Euclidean distance over all distinct pairs of the pooled sample (real and
//! generated together; the lower middle value for an even count), or 1 when that median is 0.
//! The estimate is 0 in expectation when both sets come from one distribution (so it can be
//! slightly negative) and at most 2.

use serde::Serialize;

use super::distances::Pairwise;
use crate::error::{Error, Result};

/// What [`mmd2_median`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mmd {
    /// MMD^2_u with the Gaussian kernel of bandwidth `mmd2_bandwidth` (unitless kernel values).
    pub mmd2: f64,
    /// The kernel bandwidth `sigma`, in feature units: the median pooled pair distance.
    pub mmd2_bandwidth: f64,
}

/// The median distance over the distinct pairs of the pooled sample: pairs `i < j` among the
/// real vectors, among the generated ones, and every real-generated pair (the lower middle
/// value for an even count); 1 when that is 0 (more than half the pairs coincide).
pub fn median_pooled_distance(p: &Pairwise) -> f64 {
    let mut all = Vec::with_capacity(p.cross.len() + (p.nr * p.nr + p.ng * p.ng) / 2);
    for (dist, n) in [(&p.real, p.nr), (&p.generated, p.ng)] {
        for i in 0..n {
            all.extend_from_slice(&dist[i * n + i + 1..(i + 1) * n]);
        }
    }
    all.extend_from_slice(&p.cross);
    if all.is_empty() {
        return 1.0;
    }
    let mid = (all.len() - 1) / 2;
    let (_, m, _) = all.select_nth_unstable_by(mid, f64::total_cmp);
    if *m > 0.0 {
        *m
    } else {
        1.0
    }
}

/// MMD^2_u (eq. 3) with the Gaussian kernel of bandwidth `sigma` (> 0, feature units).
///
/// # Errors
/// [`Error::Data`] when a set has fewer than 2 vectors or `sigma` is not positive and finite.
pub fn mmd2_unbiased(p: &Pairwise, sigma: f64) -> Result<f64> {
    if p.nr < 2 || p.ng < 2 || !(sigma > 0.0 && sigma.is_finite()) {
        return Err(Error::Data(format!(
            "MMD^2 needs 2 or more vectors in each set (got {} and {}) and a positive bandwidth \
             (got {sigma})",
            p.nr, p.ng
        )));
    }
    let k = |d: f64| (-d * d / (2.0 * sigma * sigma)).exp();
    let within = |dist: &[f64], n: usize| {
        let sum: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| k(dist[i * n + j]))
            .sum();
        sum / (n as f64 * (n as f64 - 1.0))
    };
    let cross: f64 = p.cross.iter().map(|&d| k(d)).sum::<f64>() / (p.nr as f64 * p.ng as f64);
    Ok(within(&p.real, p.nr) + within(&p.generated, p.ng) - 2.0 * cross)
}

/// MMD^2_u with the median-heuristic bandwidth ([`median_pooled_distance`]).
///
/// # Errors
/// As [`mmd2_unbiased`].
pub fn mmd2_median(p: &Pairwise) -> Result<Mmd> {
    let sigma = median_pooled_distance(p);
    Ok(Mmd {
        mmd2: mmd2_unbiased(p, sigma)?,
        mmd2_bandwidth: sigma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::distances::Features;
    use crate::metrics::precision_recall::tests::clusters;

    fn mmd(a: &Features, b: &Features) -> Mmd {
        mmd2_median(&Pairwise::new(a, b).unwrap()).unwrap()
    }

    #[test]
    fn identical_and_same_distribution_sets_have_mmd_near_zero() {
        let a = clusters(&[[0.0, 0.0], [3.0, 1.0]], 100, 1.0, 1);
        assert!(mmd(&a, &a).mmd2.abs() < 0.02, "{:?}", mmd(&a, &a));
        let b = clusters(&[[0.0, 0.0], [3.0, 1.0]], 100, 1.0, 2);
        assert!(mmd(&a, &b).mmd2.abs() < 0.02, "{:?}", mmd(&a, &b));
    }

    #[test]
    fn far_apart_sets_have_a_large_mmd() {
        let a = clusters(&[[0.0, 0.0]], 50, 1.0, 1);
        let b = clusters(&[[100.0, 100.0]], 60, 1.0, 2);
        let m = mmd(&a, &b);
        // Within-set kernel values near 1, cross values near 0 at a bandwidth of ~141.
        assert!(m.mmd2 > 0.5 && m.mmd2 <= 2.0, "{m:?}");
    }

    #[test]
    fn matches_a_direct_evaluation_of_equation_3() {
        let a = Features::new(vec![0.0, 1.0, 3.0], 3, 1).unwrap();
        let b = Features::new(vec![0.5, 2.0], 2, 1).unwrap();
        let p = Pairwise::new(&a, &b).unwrap();
        // Pooled pairs: 1, 3, 2 | 1.5 | 0.5, 2, 0.5, 1, 2.5, 1 -> sorted middle (index 4 of 10) is 1.
        assert_eq!(median_pooled_distance(&p), 1.0);
        let k = |d: f64| (-d * d / 2.0).exp();
        let xx = 2.0 * (k(1.0) + k(3.0) + k(2.0)) / 6.0;
        let yy = 2.0 * k(1.5) / 2.0;
        let xy = (k(0.5) + k(2.0) + k(0.5) + k(1.0) + k(2.5) + k(1.0)) / 6.0;
        let got = mmd2_unbiased(&p, 1.0).unwrap();
        assert!((got - (xx + yy - 2.0 * xy)).abs() < 1e-12);
        assert!(mmd2_unbiased(&p, 0.0).is_err());
        let one = Features::new(vec![0.0], 1, 1).unwrap();
        assert!(mmd2_unbiased(&Pairwise::new(&one, &b).unwrap(), 1.0).is_err());
    }
}
