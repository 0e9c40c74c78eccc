//! Exact pairwise Euclidean distances between two sets of feature vectors, for the sample
//! metrics that need no pretrained network ([`super::precision_recall`], [`super::mmd`]).
//!
//! A set of `n` vectors of `d` values is one row-major slice of `n * d` f64 values
//! ([`Features`]). Squared distances are computed GEMM-style, `|a|^2 + |b|^2 - 2 a.b`, in f64,
//! clamped at 0 (rounding can make the difference of nearly equal terms slightly negative), in
//! parallel over blocks of rows (rayon); the result does not depend on the number of threads.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows of `a` handled by one parallel task.
const BLOCK: usize = 64;

/// `n` feature vectors of `d` values each, row-major (`values.len() == n * d`).
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// `n * d` values, row `i` at `values[i * d .. (i + 1) * d]`.
    pub values: Vec<f64>,
    /// Number of vectors.
    pub n: usize,
    /// Values per vector.
    pub d: usize,
}

impl Features {
    /// Wraps `values` as `n` rows of `d` values.
    ///
    /// # Errors
    /// [`Error::Data`] when `values.len() != n * d`, `d == 0`, or a value is not finite.
    pub fn new(values: Vec<f64>, n: usize, d: usize) -> Result<Features> {
        if d == 0 || n.checked_mul(d) != Some(values.len()) {
            return Err(Error::Data(format!(
                "{} feature values cannot be {n} rows of {d}",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "feature row {} holds a non-finite value",
                i / d
            )));
        }
        Ok(Features { values, n, d })
    }

    /// Row `i` (`d` values). Panics if `i >= n`; every caller here stays below `n`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.d..(i + 1) * self.d]
    }

    /// Squared norms of the rows (`n` values), summed as [`dot`] sums, so that a row's
    /// distance to itself is exactly 0.
    fn squared_norms(&self) -> Vec<f64> {
        (0..self.n).map(|i| dot(self.row(i), self.row(i))).collect()
    }
}

/// Euclidean distances between every row of `a` and every row of `b`: an `a.n x b.n` matrix,
/// row-major (`out[i * b.n + j] = |a_i - b_j|`, in feature units), through
/// `sqrt(max(0, |a_i|^2 + |b_j|^2 - 2 a_i.b_j))` in f64.
///
/// # Errors
/// [`Error::Data`] when the widths differ.
pub fn distance_matrix(a: &Features, b: &Features) -> Result<Vec<f64>> {
    if a.d != b.d {
        return Err(Error::Data(format!(
            "cannot compare features of width {} and {}",
            a.d, b.d
        )));
    }
    let (na, nb) = (a.squared_norms(), b.squared_norms());
    let mut out = vec![0.0; a.n * b.n];
    if b.n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(BLOCK * b.n)
        .enumerate()
        .for_each(|(block, chunk)| {
            for (r, row_out) in chunk.chunks_mut(b.n).enumerate() {
                let i = block * BLOCK + r;
                let ai = a.row(i);
                for (j, cell) in row_out.iter_mut().enumerate() {
                    let dot = dot(ai, b.row(j));
                    *cell = (na[i] + nb[j] - 2.0 * dot).max(0.0).sqrt();
                }
            }
        });
    Ok(out)
}

/// `a . b` in f64 with four running sums (so the loop vectorizes); `a` and `b` of one length.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The three distance matrices of a real and a generated set, each computed once and shared
/// by the metrics.
#[derive(Debug, Clone)]
pub struct Pairwise {
    /// Real rows: `nr`.
    pub nr: usize,
    /// Generated rows: `ng`.
    pub ng: usize,
    /// `nr x nr` distances among the real rows.
    pub real: Vec<f64>,
    /// `ng x ng` distances among the generated rows.
    pub generated: Vec<f64>,
    /// `ng x nr` distances, generated row `j` to real row `i` at `cross[j * nr + i]`.
    pub cross: Vec<f64>,
}

impl Pairwise {
    /// The distances of `real` and `generated` (same width).
    ///
    /// # Errors
    /// [`Error::Data`] when the widths differ.
    pub fn new(real: &Features, generated: &Features) -> Result<Pairwise> {
        Ok(Pairwise {
            nr: real.n,
            ng: generated.n,
            real: distance_matrix(real, real)?,
            generated: distance_matrix(generated, generated)?,
            cross: distance_matrix(generated, real)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, seed: u64) -> Features {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v = (0..n * d).map(|_| rng.random_range(-3.0..3.0)).collect();
        Features::new(v, n, d).unwrap()
    }

    #[test]
    fn matches_brute_force_on_random_data() {
        let (a, b) = (random(131, 7, 1), random(70, 7, 2));
        let m = distance_matrix(&a, &b).unwrap();
        for i in 0..a.n {
            for j in 0..b.n {
                let brute: f64 = a
                    .row(i)
                    .iter()
                    .zip(b.row(j))
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    .sqrt();
                assert!((m[i * b.n + j] - brute).abs() < 1e-9, "{i},{j}");
            }
        }
    }

    #[test]
    fn self_distances_are_zero_never_nan() {
        let a = random(65, 300, 3);
        let m = distance_matrix(&a, &a).unwrap();
        for i in 0..a.n {
            assert!(m[i * a.n + i].abs() < 1e-6);
        }
        assert!(m.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn bad_shapes_and_values_are_errors() {
        assert!(Features::new(vec![1.0; 5], 2, 3).is_err());
        assert!(Features::new(vec![], 0, 0).is_err());
        assert!(Features::new(vec![f64::NAN, 0.0], 1, 2).is_err());
        assert!(distance_matrix(&random(2, 3, 0), &random(2, 4, 0)).is_err());
        assert_eq!(
            distance_matrix(&random(0, 3, 0), &random(2, 3, 0))
                .unwrap()
                .len(),
            0
        );
    }
}
