//! Objectives of the VAE family, pure functions of the terms a model pass returns.
//!
//! - ELBO (Kingma & Welling 2014): `E_q[log p(x|z)] - KL(q(z|x) || p(z))`, with the KL in closed form
//!   (one stochastic layer) or as `log q(z|x) - log p(z)` at the samples, averaged over `k` samples;
//!   `beta` weights the KL (Higgins et al. 2017), a linear warm-up raises it from 0
//!   (Sonderby et al. 2016), and free bits clamp each latent dimension's batch-mean KL from below
//!   at `lambda` (Kingma et al. 2016, eq. 15).
//! - IWAE bound (Burda et al. 2016, eq. 8): `LSE_i(log w_i) - ln k`, `log w_i = log p(x, z_i) -
//!   log q(z_i | x)`, with a max-shifted log-sum-exp whose backward gives the normalized weights,
//!   so the gradient is exactly `sum_i w~_i grad log w_i` (eq. 10).

use candle_core::{Tensor, D};

use crate::config::{KlEstimator, ObjectiveConfig, ObjectiveKind};
use crate::error::Result;
use crate::models::vae::Pass;
use crate::ops::gaussian::gaussian_kl;
use crate::ops::logsumexp::logsumexp;

/// The loss to minimize and the bound it corresponds to.
#[derive(Debug, Clone)]
pub struct Objective {
    /// Scalar loss (negative weighted bound, averaged over the batch).
    pub loss: Tensor,
    /// The batch mean of the bound with the weights actually used (nats, negative = worse).
    pub bound: Tensor,
}

/// `(k * B)` -> `(B, k)`, contiguous.
pub(crate) fn per_point(t: &Tensor, k: usize) -> Result<Tensor> {
    let b = t.dim(0)? / k;
    Ok(t.reshape((k, b))?.t()?.contiguous()?)
}

/// Whether a pass for this objective needs the latent densities.
pub fn needs_densities(cfg: &ObjectiveConfig, layers: usize) -> bool {
    !(cfg.kind == ObjectiveKind::Elbo && cfg.kl == KlEstimator::Analytic && layers == 1)
}

/// The training objective for a pass with `k` samples per point and KL weight `beta`.
pub fn objective(pass: &Pass, cfg: &ObjectiveConfig, k: usize, beta: f64) -> Result<Objective> {
    let bound = match (cfg.kind, &pass.log_pz, &pass.log_qz) {
        (ObjectiveKind::Elbo, None, _) | (ObjectiveKind::Elbo, _, None) => {
            let rec = per_point(&pass.log_px, k)?.mean(D::Minus1)?;
            let (mu, lv) = &pass.q1;
            if cfg.free_bits > 0.0 {
                let kl_dims = (((mu.sqr()? + lv.exp()?)? - 1.0)? - lv)?.mean(0)? * 0.5;
                let clamped = kl_dims?.clamp(cfg.free_bits, f64::INFINITY)?.sum_all()?;
                let rec_mean = rec.mean_all()?;
                let bound = (&rec_mean - gaussian_kl(mu, lv)?.mean_all()?)?.detach();
                let loss = ((clamped * beta)? - rec_mean)?;
                return Ok(Objective { loss, bound });
            }
            (rec - (gaussian_kl(mu, lv)? * beta)?)?
        }
        (ObjectiveKind::Elbo, Some(lp), Some(lq)) => {
            let lw = (&pass.log_px + ((lp - lq)? * beta)?)?;
            per_point(&lw, k)?.mean(D::Minus1)?
        }
        (ObjectiveKind::Iwae, Some(lp), Some(lq)) => {
            let lw = (&pass.log_px + ((lp - lq)? * beta)?)?;
            (logsumexp(&per_point(&lw, k)?)? - (k as f64).ln())?
        }
        (ObjectiveKind::Iwae, _, _) => {
            return Err(crate::error::Error::Config(
                "the IWAE bound needs the latent densities".into(),
            ))
        }
    };
    let mean = bound.mean_all()?;
    Ok(Objective {
        loss: mean.neg()?,
        bound: mean.detach(),
    })
}

/// Per-point log weights `(B, k)` with `beta = 1` (the quantities every estimator is built from).
pub fn log_weights(pass: &Pass, k: usize) -> Result<Tensor> {
    match (&pass.log_pz, &pass.log_qz) {
        (Some(lp), Some(lq)) => per_point(&((&pass.log_px + lp)? - lq)?, k),
        _ => Err(crate::error::Error::Config(
            "log weights need the latent densities".into(),
        )),
    }
}

/// KL weight at a (fractional) epoch under linear warm-up.
pub fn kl_weight(cfg: &ObjectiveConfig, epoch_progress: f64) -> f64 {
    if cfg.warmup_epochs > 0.0 {
        cfg.beta * (epoch_progress / cfg.warmup_epochs).min(1.0)
    } else {
        cfg.beta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn pass(mu: &[f32], lv: &[f32], log_px: &[f32]) -> Pass {
        let dev = Device::Cpu;
        let d = mu.len() / log_px.len();
        Pass {
            log_px: Tensor::new(log_px, &dev).unwrap(),
            log_pz: None,
            log_qz: None,
            q1: (
                Tensor::from_vec(mu.to_vec(), (log_px.len(), d), &dev).unwrap(),
                Tensor::from_vec(lv.to_vec(), (log_px.len(), d), &dev).unwrap(),
            ),
        }
    }

    #[test]
    fn warmup_rises_linearly_to_beta() {
        let cfg = ObjectiveConfig {
            beta: 2.0,
            warmup_epochs: 4.0,
            ..Default::default()
        };
        assert_eq!(kl_weight(&cfg, 0.0), 0.0);
        assert_eq!(kl_weight(&cfg, 1.0), 0.5);
        assert_eq!(kl_weight(&cfg, 4.0), 2.0);
        assert_eq!(kl_weight(&cfg, 10.0), 2.0);
        let plain = ObjectiveConfig {
            beta: 0.7,
            ..Default::default()
        };
        assert_eq!(kl_weight(&plain, 0.0), 0.7);
    }

    #[test]
    fn beta_weights_the_analytic_kl() {
        // Two points, two latent dims; KL per point = 0.5 * sum(mu^2 + e^lv - 1 - lv).
        let p = pass(&[1.0, 0.0, 0.0, 2.0], &[0.0; 4], &[-10.0, -20.0]);
        let kl = [0.5f64, 2.0];
        for beta in [0.0, 1.0, 3.0] {
            let cfg = ObjectiveConfig::default();
            let o = objective(&p, &cfg, 1, beta).unwrap();
            let expect = -((-10.0 - beta * kl[0]) + (-20.0 - beta * kl[1])) / 2.0;
            assert!(
                (o.loss.to_scalar::<f32>().unwrap() as f64 - expect).abs() < 1e-5,
                "beta {beta}"
            );
        }
    }

    #[test]
    fn free_bits_clamp_each_dimension_from_below() {
        // Batch-mean KL per dim: dim 0 = (0.5 + 0) / 2 = 0.25, dim 1 = (0 + 2) / 2 = 1.0.
        let p = pass(&[1.0, 0.0, 0.0, 2.0], &[0.0; 4], &[-10.0, -20.0]);
        let cfg = ObjectiveConfig {
            free_bits: 0.5,
            ..Default::default()
        };
        let o = objective(&p, &cfg, 1, 1.0).unwrap();
        // loss = -mean(log p(x|z)) + max(0.5, 0.25) + max(0.5, 1.0) = 15 + 0.5 + 1.0
        assert!((o.loss.to_scalar::<f32>().unwrap() - 16.5).abs() < 1e-5);
        // The reported bound is the true ELBO, without the clamp.
        assert!((o.bound.to_scalar::<f32>().unwrap() + 15.0 + 1.25).abs() < 1e-5);
    }
}
