//! The diffusion family's objectives: the simple loss, the hybrid loss and the complete
//! variational bound, as tensor functions of the network's output.
//!
//! - `L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2` per dimension, `t` uniform
//!   over the T steps (Ho et al. 2020, eq. 14), with `x_t` from the fused
//!   [`crate::ops::diffusion::q_sample`] and the per-sample mean from the fused
//!   [`crate::ops::diffusion::simple_loss`].
//! - The bound (Ho et al. eq. 5; Sohl-Dickstein et al. 2015): `-log p(x_0) <= L_vlb = L_T +
//!   sum_{t >= 2} L_{t-1} + L_0`, **all** of its terms: the prior term `L_T = KL(q(x_T | x_0)
//!   || N(0, I))`, the `T - 1` KL terms `L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} |
//!   x_t))` between diagonal Gaussians, and the reconstruction term `L_0 = -log p(x_0 | x_1)`.
//!   (One of the study notes behind this project writes the sum over `t > 1` only and drops
//!   `L_0`; that is not a bound on `-log p(x_0)`.) For 8-bit images `L_0` is the discretized
//!   Gaussian decoder of Ho et al. section 3.3 over the 256 bins of width `2/255` in `[-1, 1]`,
//!   the edge bins open to `-inf` and `+inf`, with the tanh approximation of the normal CDF and
//!   logs clamped at `1e-12` as the reference code; for continuous 2-D points it is the
//!   Gaussian density of `x_0`.
//! - The model's mean is the posterior mean at the predicted `x0_hat = (x_t - sqrt(1 - abar_t)
//!   eps_theta) / sqrt(abar_t)` (eq. 11 written through `x0_hat`); its variance is fixed
//!   (`beta_t` or `beta~_t`) or learned (Nichol & Dhariwal 2021, eq. 15).
//! - `L_hybrid = L_simple + lambda L_vlb` (Nichol & Dhariwal eq. 16) with the mean's gradient
//!   stopped inside `L_vlb` (so it trains only the variance), `L_vlb` estimated as `T` times
//!   the sampled step's term in bits per dimension, as improved-diffusion's `RESCALED_MSE`.
//!
//! Units: per-sample terms are nats summed over the `D` dimensions; bits/dim divide by `D ln 2`.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::models::diffusion::{Diffusion, ReverseVariance, Schedule};

/// The half-width of a pixel bin in model space (`[-1, 1]` over 255 intervals).
const HALF_BIN: f64 = 1.0 / 255.0;
/// The floor of every probability inside a logarithm (the reference code's).
const LOG_FLOOR: f64 = 1e-12;

/// What one training step's loss is made of (scalars on the model's device).
pub struct DiffusionLoss {
    /// The loss to minimize: `L_simple`, or `L_hybrid` with learned variances.
    pub loss: Tensor,
    /// `L_simple`, the batch mean of the per-sample mean squared error.
    pub simple: Tensor,
    /// The `L_vlb` estimate (bits/dim times T) of the hybrid loss, with learned variances.
    pub vlb: Option<Tensor>,
}

/// The training loss on `x0` (B, D) in model space at steps `t` with noise `eps` (B, D) and
/// weights `w` (store order, tracked).
pub fn training_loss(
    m: &Diffusion,
    w: &[Tensor],
    x0: &Tensor,
    t: &[u32],
    eps: &Tensor,
) -> Result<DiffusionLoss> {
    let device = x0.device();
    let t_ids = Tensor::from_slice(t, t.len(), device)?;
    let x_t = crate::ops::diffusion::q_sample(x0, eps, &t_ids, &m.q_table)?;
    let out = m.forward(w, &x_t, t)?;
    let d = m.dim;
    let eps_pred = out.narrow(1, 0, d)?.contiguous()?;
    let simple = crate::ops::diffusion::simple_loss(&eps_pred, eps)?.mean_all()?;
    if m.cfg.variance != ReverseVariance::Learned {
        return Ok(DiffusionLoss {
            loss: simple.clone(),
            simple,
            vlb: None,
        });
    }
    // The variance is trained through L_vlb alone: the mean's gradient is stopped there.
    let frozen = Tensor::cat(&[&eps_pred.detach(), &out.narrow(1, d, d)?], 1)?;
    let terms = vb_terms(m, &frozen, x0, &x_t, t, false)?;
    let bits = (terms / (d as f64 * std::f64::consts::LN_2))?;
    let vlb = (bits.mean_all()? * m.schedule.len() as f64)?;
    let loss = (&simple + vlb.affine(m.cfg.vlb_weight, 0.0)?)?;
    Ok(DiffusionLoss {
        loss,
        simple,
        vlb: Some(vlb),
    })
}

/// The model's reverse mean and log-variance (each (B, D)) at steps `t` from its output `out`
/// (B, D m) and `x_t`; with `clip`, `x0_hat` is clipped to `[-1, 1]` first.
pub fn p_mean_variance(
    m: &Diffusion,
    out: &Tensor,
    x_t: &Tensor,
    t: &[u32],
    clip: bool,
) -> Result<(Tensor, Tensor)> {
    let s = &m.schedule;
    let dev = x_t.device();
    let d = m.dim;
    let eps = out.narrow(1, 0, d)?;
    let g = |v: &[f64]| Schedule::gather(v, t, dev);
    let mut x0 = (x_t.broadcast_mul(&g(&s.sqrt_recip_abar)?)?
        - eps.broadcast_mul(&g(&s.sqrt_recipm1_abar)?)?)?;
    if clip {
        x0 = x0.clamp(-1f32, 1f32)?;
    }
    let mean = (x0.broadcast_mul(&g(&s.posterior_mean_coef1)?)?
        + x_t.broadcast_mul(&g(&s.posterior_mean_coef2)?)?)?;
    let log_var = match m.cfg.variance {
        ReverseVariance::Learned => {
            let frac = ((out.narrow(1, d, d)? + 1.0)? * 0.5)?;
            let hi = frac.broadcast_mul(&g(&s.log_betas)?)?;
            let lo = (1.0 - frac)?.broadcast_mul(&g(&s.posterior_log_variance_clipped)?)?;
            (hi + lo)?
        }
        kind => g(s.fixed_log_variance(kind))?
            .broadcast_as(mean.shape())?
            .contiguous()?,
    };
    Ok((mean, log_var))
}

/// The bound's term at each sample's step, per sample in nats (B): `L_0 = -log p(x_0 | x_1)`
/// where `t = 0`, else `KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`, both summed over D.
pub fn vb_terms(
    m: &Diffusion,
    out: &Tensor,
    x0: &Tensor,
    x_t: &Tensor,
    t: &[u32],
    clip: bool,
) -> Result<Tensor> {
    let s = &m.schedule;
    let dev = x0.device();
    let (mean, log_var) = p_mean_variance(m, out, x_t, t, clip)?;
    let g = |v: &[f64]| Schedule::gather(v, t, dev);
    let true_mean = (x0.broadcast_mul(&g(&s.posterior_mean_coef1)?)?
        + x_t.broadcast_mul(&g(&s.posterior_mean_coef2)?)?)?;
    let true_log_var = g(&s.posterior_log_variance_clipped)?.broadcast_as(mean.shape())?;
    let kl = normal_kl(&true_mean, &true_log_var, &mean, &log_var)?.sum(D::Minus1)?;
    if t.iter().all(|&ti| ti != 0) {
        return Ok(kl);
    }
    let nll = match m.image {
        Some(_) => discretized_gaussian_log_likelihood(x0, &mean, &(&log_var * 0.5)?)?,
        None => gaussian_log_likelihood(x0, &mean, &log_var)?,
    }
    .neg()?
    .sum(D::Minus1)?;
    let first: Vec<u8> = t.iter().map(|&ti| u8::from(ti == 0)).collect();
    let first = Tensor::from_vec(first, t.len(), dev)?;
    Ok(first.where_cond(&nll, &kl)?)
}

/// The prior term `L_T = KL(q(x_T | x_0) || N(0, I))` per sample in nats (B), for `x0` (B, D)
/// in model space (exact, no network).
pub fn prior_kl(schedule: &Schedule, x0: &Tensor) -> Result<Tensor> {
    let t = schedule.len() - 1;
    let a = schedule.abar[t];
    let mean = (x0 * a.sqrt())?;
    let log_var = Tensor::full((1.0 - a).ln() as f32, x0.shape(), x0.device())?;
    let zeros = x0.zeros_like()?;
    Ok(normal_kl(&mean, &log_var, &zeros, &zeros)?.sum(D::Minus1)?)
}

/// `KL(N(m1, e^lv1) || N(m2, e^lv2))` elementwise in nats: `(-1 + lv2 - lv1 + e^(lv1 - lv2) +
/// (m1 - m2)^2 e^(-lv2)) / 2`.
pub fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let diff = (lv1 - lv2)?;
    let sq = (m1 - m2)?.sqr()?.mul(&lv2.neg()?.exp()?)?;
    let s = ((diff.exp()? - &diff)? + sq)?;
    Ok(((s - 1.0)? * 0.5)?)
}

/// The tanh approximation of the standard normal CDF, `0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715
/// x^3)))`, as the DDPM code uses it.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    Ok(((inner.tanh()? + 1.0)? * 0.5)?)
}

/// `log p(x)` elementwise under the discretized Gaussian `N(mean, e^(2 log_scale))` over the
/// 256 bins of `[-1, 1]` (x on the bin centres `-1 + 2k/255`): the mass of `[x - 1/255, x +
/// 1/255]`, the lowest bin open to `-inf` and the highest to `+inf` (Ho et al. section 3.3).
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    let centred = (x - mean)?;
    let inv = log_scale.neg()?.exp()?;
    let cdf_plus = approx_standard_normal_cdf(&((&centred + HALF_BIN)? * &inv)?)?;
    let cdf_min = approx_standard_normal_cdf(&((&centred - HALF_BIN)? * &inv)?)?;
    let floor = |t: &Tensor| -> Result<Tensor> { Ok(t.maximum(LOG_FLOOR as f32)?.log()?) };
    let log_cdf_plus = floor(&cdf_plus)?;
    let log_one_minus_cdf_min = floor(&(1.0 - &cdf_min)?)?;
    let log_delta = floor(&(&cdf_plus - &cdf_min)?)?;
    let low = x.lt(-0.999f32)?;
    let high = x.gt(0.999f32)?;
    let inner = high.where_cond(&log_one_minus_cdf_min, &log_delta)?;
    Ok(low.where_cond(&log_cdf_plus, &inner)?)
}

/// `log N(x; mean, e^log_var)` elementwise (continuous data), in nats.
pub fn gaussian_log_likelihood(x: &Tensor, mean: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    let sq = (x - mean)?.sqr()?.mul(&log_var.neg()?.exp()?)?;
    Ok(((sq + log_var)? + (2.0 * std::f64::consts::PI).ln())?.affine(-0.5, 0.0)?)
}
