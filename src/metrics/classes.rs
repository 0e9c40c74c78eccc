//! Class statistics of generated samples under a classifier `p(y|x)`:
//!
//! - the class histogram (argmax labels), which shows dropped or over-produced digits;
//! - the Inception-Score analogue `exp(E_x KL(p(y|x) || p(y)))`, `p(y) = E_x p(y|x)` (Salimans
//!   et al. 2016, section 4), which lies in `[1, C]`: `C` for confident predictions spread
//!   evenly over `C` classes, 1 when every sample gets the same prediction.
//!
//! With our own MNIST classifier these numbers are not comparable to Inception-network figures.

use crate::error::{Error, Result};

/// Fraction of samples assigned to each class (argmax of `probs`), for `classes` classes.
pub fn class_histogram(probs: &[Vec<f32>], classes: usize) -> Result<Vec<f64>> {
    if probs.is_empty() {
        return Err(Error::Data("a class histogram needs samples".into()));
    }
    let mut counts = vec![0usize; classes];
    for p in probs {
        if p.len() != classes {
            return Err(Error::Data(format!(
                "a row of {} probabilities for {classes} classes",
                p.len()
            )));
        }
        let best = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        counts[best] += 1;
    }
    Ok(counts
        .iter()
        .map(|&c| c as f64 / probs.len() as f64)
        .collect())
}

/// `exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j)))`, with `0 log 0 = 0`.
pub fn inception_score(probs: &[Vec<f32>]) -> Result<f64> {
    let Some(first) = probs.first() else {
        return Err(Error::Data("an inception score needs samples".into()));
    };
    let c = first.len();
    let mut marginal = vec![0f64; c];
    for p in probs {
        if p.len() != c {
            return Err(Error::Data("rows of different class counts".into()));
        }
        for (m, &q) in marginal.iter_mut().zip(p) {
            *m += q as f64;
        }
    }
    let n = probs.len() as f64;
    marginal.iter_mut().for_each(|m| *m /= n);
    let mut kl = 0f64;
    for p in probs {
        for (&q, &m) in p.iter().zip(&marginal) {
            let q = q as f64;
            if q > 0.0 {
                kl += q * (q.ln() - m.ln());
            }
        }
    }
    Ok((kl / n).exp())
}

/// Share of predictions `pred[i]` equal to `i mod classes`, the label a conditional model's
/// sample `i` was generated for (0 for no predictions).
pub fn cycling_label_accuracy(pred: &[u32], classes: usize) -> f64 {
    if pred.is_empty() || classes == 0 {
        return 0.0;
    }
    let hits = pred
        .iter()
        .enumerate()
        .filter(|(i, &p)| p as usize == i % classes)
        .count();
    hits as f64 / pred.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_hot(i: usize, c: usize) -> Vec<f32> {
        (0..c).map(|j| (i == j) as u8 as f32).collect()
    }

    #[test]
    fn score_is_the_class_count_for_confident_even_predictions_and_one_for_a_single_class() {
        let even: Vec<Vec<f32>> = (0..1000).map(|i| one_hot(i % 10, 10)).collect();
        assert!((inception_score(&even).unwrap() - 10.0).abs() < 1e-9);
        let single: Vec<Vec<f32>> = (0..1000).map(|_| one_hot(3, 10)).collect();
        assert!((inception_score(&single).unwrap() - 1.0).abs() < 1e-12);
        // Uninformative predictions: score 1 however the marginal looks.
        let flat: Vec<Vec<f32>> = (0..10).map(|_| vec![0.1; 10]).collect();
        assert!((inception_score(&flat).unwrap() - 1.0).abs() < 1e-6);
        // Confident, 5 classes used evenly out of 10: score 5.
        let half: Vec<Vec<f32>> = (0..1000).map(|i| one_hot(2 * (i % 5), 10)).collect();
        assert!((inception_score(&half).unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn label_accuracy_compares_with_cycling_labels() {
        assert_eq!(cycling_label_accuracy(&[0, 1, 2, 0, 1, 2], 3), 1.0);
        assert_eq!(cycling_label_accuracy(&[0, 0, 2, 0], 3), 0.75);
        assert_eq!(cycling_label_accuracy(&[1, 2, 0], 3), 0.0);
        assert_eq!(cycling_label_accuracy(&[], 3), 0.0);
    }

    #[test]
    fn histogram_counts_argmax_labels() {
        let probs = vec![
            vec![0.1, 0.7, 0.2],
            vec![0.6, 0.3, 0.1],
            vec![0.2, 0.3, 0.5],
            vec![0.0, 0.9, 0.1],
        ];
        assert_eq!(class_histogram(&probs, 3).unwrap(), vec![0.25, 0.5, 0.25]);
        assert!(class_histogram(&probs, 4).is_err());
    }
}
