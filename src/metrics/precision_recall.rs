//! Improved precision and recall (Kynkäänniemi, Karras, Laine, Lehtinen and Aila 2019,
//! "Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS, section 3).
//!
//! Each set's manifold is estimated as the union of balls around its feature vectors, the
//! radius of a ball being the distance to the vector's `k`-th nearest neighbour in its own set
//! (itself excluded). With `f(phi, Phi) = 1` when `|phi - phi'| <= |phi' - NN_k(phi')|` for at
//! least one `phi'` in `Phi` (eq. 1):
//!
//! - precision = `(1/|Phi_g|) sum_{phi_g} f(phi_g, Phi_r)`: the share of generated vectors
//!   inside the real manifold (eq. 2);
//! - recall = `(1/|Phi_r|) sum_{phi_r} f(phi_r, Phi_g)`: the share of real vectors inside the
//!   generated manifold (eq. 2).
//!
//! Both lie in `[0, 1]`; `k = 3` as in the paper ([`K`]).

use serde::Serialize;

use super::distances::Pairwise;
use crate::error::{Error, Result};

/// The neighbour whose distance is a ball's radius (the paper's `k = 3`).
pub const K: usize = 3;

/// What [`precision_recall`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrecisionRecall {
    /// Share of generated vectors inside the real manifold, in `[0, 1]`.
    pub precision: f64,
    /// Share of real vectors inside the generated manifold, in `[0, 1]`.
    pub recall: f64,
    /// The `k` of the `k`-NN radii.
    pub pr_k: usize,
}

/// The `k`-NN radius of every vector of a set from its `n x n` distance matrix `dist`: the
/// `k`-th smallest distance to another vector (the diagonal, the vector itself, is skipped).
/// Needs `1 <= k < n`; distances in feature units.
pub fn knn_radii(dist: &[f64], n: usize, k: usize) -> Result<Vec<f64>> {
    if k == 0 || k >= n || dist.len() != n * n {
        return Err(Error::Data(format!(
            "k-NN radii with k = {k} need more than k vectors (got {n}) and an {n}x{n} matrix"
        )));
    }
    let mut row = Vec::with_capacity(n - 1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        row.clear();
        row.extend((0..n).filter(|&j| j != i).map(|j| dist[i * n + j]));
        let (_, kth, _) = row.select_nth_unstable_by(k - 1, f64::total_cmp);
        out.push(*kth);
    }
    Ok(out)
}

/// Precision and recall (eq. 1-2) of the generated set against the real set from their
/// distances `p`, with `k`-NN radii.
///
/// # Errors
/// [`Error::Data`] when either set has `k` vectors or fewer.
pub fn precision_recall(p: &Pairwise, k: usize) -> Result<PrecisionRecall> {
    let real_radii = knn_radii(&p.real, p.nr, k)?;
    let gen_radii = knn_radii(&p.generated, p.ng, k)?;
    let cross = |j: usize, i: usize| p.cross[j * p.nr + i];
    let inside_real = (0..p.ng)
        .filter(|&j| (0..p.nr).any(|i| cross(j, i) <= real_radii[i]))
        .count();
    let inside_gen = (0..p.nr)
        .filter(|&i| (0..p.ng).any(|j| cross(j, i) <= gen_radii[j]))
        .count();
    Ok(PrecisionRecall {
        precision: inside_real as f64 / p.ng as f64,
        recall: inside_gen as f64 / p.nr as f64,
        pr_k: k,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::distances::Features;
    use rand::{Rng, SeedableRng};

    /// `per` points around each centre of `centres` (2-D), with standard deviation `std`.
    pub(crate) fn clusters(centres: &[[f64; 2]], per: usize, std: f64, seed: u64) -> Features {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v = Vec::new();
        for c in centres {
            for _ in 0..per {
                v.push(c[0] + std * rng.random_range(-1.0..1.0));
                v.push(c[1] + std * rng.random_range(-1.0..1.0));
            }
        }
        Features::new(v, centres.len() * per, 2).unwrap()
    }

    fn pr(real: &Features, gen: &Features) -> PrecisionRecall {
        precision_recall(&Pairwise::new(real, gen).unwrap(), K).unwrap()
    }

    #[test]
    fn identical_sets_have_precision_and_recall_one() {
        let a = clusters(&[[0.0, 0.0], [5.0, 1.0]], 40, 1.0, 1);
        let r = pr(&a, &a);
        assert_eq!((r.precision, r.recall, r.pr_k), (1.0, 1.0, 3));
    }

    #[test]
    fn far_apart_sets_have_precision_and_recall_zero() {
        let a = clusters(&[[0.0, 0.0]], 50, 1.0, 1);
        let b = clusters(&[[100.0, 100.0]], 60, 1.0, 2);
        let r = pr(&a, &b);
        assert_eq!((r.precision, r.recall), (0.0, 0.0));
    }

    #[test]
    fn covering_half_the_modes_gives_recall_one_half() {
        let modes = [[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]];
        let real = clusters(&modes, 100, 1.0, 1);
        let gen = clusters(&modes[..2], 200, 1.0, 2);
        let r = pr(&real, &gen);
        assert!(r.precision > 0.95, "{r:?}");
        assert!((r.recall - 0.5).abs() < 0.05, "{r:?}");
    }

    #[test]
    fn radii_are_the_kth_neighbour_without_the_point_itself() {
        // Points 0, 1, 3, 6 on a line.
        let f = Features::new(vec![0.0, 1.0, 3.0, 6.0], 4, 1).unwrap();
        let d = crate::metrics::distances::distance_matrix(&f, &f).unwrap();
        assert_eq!(knn_radii(&d, 4, 1).unwrap(), vec![1.0, 1.0, 2.0, 3.0]);
        assert_eq!(knn_radii(&d, 4, 3).unwrap(), vec![6.0, 5.0, 3.0, 6.0]);
        assert!(knn_radii(&d, 4, 4).is_err());
        assert!(knn_radii(&d, 4, 0).is_err());
    }
}
