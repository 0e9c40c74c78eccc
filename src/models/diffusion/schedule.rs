//! The forward process's schedule and every coefficient derived from it, in f64 (Ho et al.
//! 2020, eq. 4-7; Nichol & Dhariwal 2021, eq. 17), cast to f32 only when gathered per sample.
//!
//! Indices are 0-based as in the reference code: index `t` is the paper's `t + 1`, so index 0
//! is one step of noise and `abar_{-1} := 1`.
//!
//! - `alpha_t = 1 - beta_t`, `abar_t = prod_{s <= t} alpha_s`;
//! - `q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)` (eq. 4);
//! - the posterior `q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)` with `mu~_t = coef1_t x_0 +
//!   coef2_t x_t`, `coef1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)`, `coef2_t = (1 -
//!   abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)` and `beta~_t = beta_t (1 - abar_{t-1}) / (1 -
//!   abar_t)` (eq. 6-7). `beta~_0 = 0`, so its logarithm is "clipped" to `log beta~_1`, as in
//!   both reference implementations.

use candle_core::{Device, Tensor};

use crate::config::{DiffusionConfig, NoiseSchedule, ReverseVariance};
use crate::error::{Error, Result};

/// `beta_t` evenly spaced from `start` to `end` over `steps` steps (f64, as `np.linspace`).
pub fn linear_betas(steps: usize, start: f64, end: f64) -> Vec<f64> {
    if steps == 1 {
        return vec![start];
    }
    (0..steps)
        .map(|i| start + (end - start) * i as f64 / (steps - 1) as f64)
        .collect()
}

/// The cosine schedule: `beta_t = min(1 - f(t + 1) / f(t), max_beta)` with `f(t) = cos^2(((t /
/// T) + s) / (1 + s) * pi / 2)` (Nichol & Dhariwal 2021, eq. 17; `betas_for_alpha_bar`).
pub fn cosine_betas(steps: usize, s: f64, max_beta: f64) -> Vec<f64> {
    let f = |t: f64| {
        (((t / steps as f64) + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..steps)
        .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(max_beta))
        .collect()
}

/// Every per-step coefficient of a diffusion process with `T` steps, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `beta_t`, (T).
    pub betas: Vec<f64>,
    /// `abar_t`, (T).
    pub abar: Vec<f64>,
    /// `abar_{t-1}` with `abar_{-1} = 1`, (T).
    pub abar_prev: Vec<f64>,
    /// `beta~_t`, the posterior variance, (T); `beta~_0 = 0`.
    pub posterior_variance: Vec<f64>,
    /// `log beta~_t` with index 0 set to `log beta~_1`, (T).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// `coef1_t` (of `x_0`) of the posterior mean, (T).
    pub posterior_mean_coef1: Vec<f64>,
    /// `coef2_t` (of `x_t`) of the posterior mean, (T).
    pub posterior_mean_coef2: Vec<f64>,
    /// `1 / sqrt(abar_t)`, (T): the coefficient of `x_t` in the `x_0` prediction.
    pub sqrt_recip_abar: Vec<f64>,
    /// `sqrt(1 / abar_t - 1)`, (T): the coefficient of `eps` in the `x_0` prediction.
    pub sqrt_recipm1_abar: Vec<f64>,
    /// `log beta_t`, (T): the upper end of the learned variance's interpolation.
    pub log_betas: Vec<f64>,
    /// `log sigma_t^2` of `fixed_large`: `log beta_t` with index 0 set to `log beta~_1`.
    log_variance_large: Vec<f64>,
}

impl Schedule {
    /// The schedule `cfg` describes.
    ///
    /// # Errors
    /// [`Error::Config`] when a beta falls outside (0, 1).
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        let betas = match cfg.schedule {
            NoiseSchedule::Linear => linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end),
            NoiseSchedule::Cosine => cosine_betas(cfg.timesteps, cfg.cosine_s, cfg.max_beta),
        };
        Self::from_betas(betas)
    }

    /// The coefficients of the process with variances `betas`.
    ///
    /// # Errors
    /// [`Error::Config`] when `betas` is empty or a beta is not in (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            return Err(Error::Config(
                "model.diffusion.timesteps must be at least 1".into(),
            ));
        }
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(Error::Config(format!(
                "model.diffusion: beta at step {i} is {b}, outside (0, 1)"
            )));
        }
        let mut abar = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            abar.push(acc);
        }
        let abar_prev: Vec<f64> = std::iter::once(1.0)
            .chain(abar[..abar.len() - 1].iter().copied())
            .collect();
        let n = betas.len();
        let mut var = vec![0.0; n];
        let mut coef1 = vec![0.0; n];
        let mut coef2 = vec![0.0; n];
        for t in 0..n {
            let (b, a, ap) = (betas[t], abar[t], abar_prev[t]);
            var[t] = b * (1.0 - ap) / (1.0 - a);
            coef1[t] = b * ap.sqrt() / (1.0 - a);
            coef2[t] = (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a);
        }
        let first = if n > 1 { var[1] } else { betas[0] };
        let log_clipped = (0..n)
            .map(|t| if t == 0 { first.ln() } else { var[t].ln() })
            .collect();
        let log_betas: Vec<f64> = betas.iter().map(|b| b.ln()).collect();
        let log_clipped: Vec<f64> = log_clipped;
        let log_variance_large = std::iter::once(log_clipped[0])
            .chain(log_betas[1..].iter().copied())
            .collect();
        Ok(Schedule {
            sqrt_recip_abar: abar.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_abar: abar.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            log_betas,
            log_variance_large,
            betas,
            abar,
            abar_prev,
            posterior_variance: var,
            posterior_log_variance_clipped: log_clipped,
            posterior_mean_coef1: coef1,
            posterior_mean_coef2: coef2,
        })
    }

    /// Steps `T`.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `log sigma_t^2` of a fixed reverse variance, (T): `fixed_large` is `log beta_t` with
    /// index 0 set to `log beta~_1` (the reference code's choice, so the decoder's variance is
    /// the posterior's), `fixed_small` is `log beta~_t` clipped. `learned` gets the two ends of
    /// its interpolation from [`Self::betas`] and [`Self::posterior_log_variance_clipped`].
    pub fn fixed_log_variance(&self, kind: ReverseVariance) -> &[f64] {
        match kind {
            ReverseVariance::FixedSmall | ReverseVariance::Learned => {
                &self.posterior_log_variance_clipped
            }
            ReverseVariance::FixedLarge => &self.log_variance_large,
        }
    }

    /// The (T, 2) table `[sqrt(abar_t), sqrt(1 - abar_t)]` in f32 that `q_sample` gathers from.
    pub fn q_table(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self
            .abar
            .iter()
            .flat_map(|a| [a.sqrt() as f32, (1.0 - a).sqrt() as f32])
            .collect();
        Ok(Tensor::from_vec(v, (self.len(), 2), device)?)
    }

    /// `values[t_i]` for every sample, cast to f32 after the gather: a (B, 1) column.
    pub fn gather(values: &[f64], t: &[u32], device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = t.iter().map(|&i| values[i as usize] as f32).collect();
        Ok(Tensor::from_vec(v, (t.len(), 1), device)?)
    }

    /// `S` of the `T` steps, evenly spaced and including both ends (`round(i (T - 1) / (S -
    /// 1))`, as improved-diffusion's `space_timesteps`), ascending; `S = 1` gives `[T - 1]`.
    pub fn spaced_steps(&self, s: usize) -> Vec<usize> {
        let t = self.len();
        let s = s.clamp(1, t);
        if s == 1 {
            return vec![t - 1];
        }
        let mut out: Vec<usize> = (0..s)
            .map(|i| ((i as f64) * (t - 1) as f64 / (s - 1) as f64).round() as usize)
            .collect();
        out.dedup();
        out
    }
}
