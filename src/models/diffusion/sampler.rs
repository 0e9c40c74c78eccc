//! The reverse process: ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song, Meng
//! & Ermon 2021, eq. 12), both one fused update per step ([`crate::ops::diffusion::sampler_step`]).
//!
//! - Ancestral: `x_{t-1} = coef1_t x0_hat + coef2_t x_t + sigma_t z` with `x0_hat = (x_t -
//!   sqrt(1 - abar_t) eps) / sqrt(abar_t)` (clipped to the data range for images), `sigma_t^2`
//!   fixed (`beta_t` or `beta~_t`) or learned, and no noise at the last step (`t = 0`).
//! - DDIM on an evenly spaced sub-sequence `tau` of the steps: `x_prev = sqrt(abar_prev)
//!   x0_hat + sqrt(1 - abar_prev - sigma^2) eps' + sigma z` with `sigma = eta sqrt((1 -
//!   abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)`, `eps'` recomputed from the clipped
//!   `x0_hat` (as improved-diffusion's `ddim_sample`) and `abar_prev = 1` after the last step, so
//!   the final update returns `x0_hat` itself.
//!
//! Both samplers take the network as a closure `(x_t, t) -> output`, so the tests can drive
//! them with the exact optimal predictor of Gaussian data.

use candle_core::Tensor;

use super::schedule::Schedule;
use crate::config::{ReverseVariance, SamplerKind};
use crate::error::Result;
use crate::ops::diffusion::{sampler_step, SamplerCoefficients};

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSettings {
    /// `ddpm` (all T steps) or `ddim` (`steps` of them).
    pub kind: SamplerKind,
    /// Steps of the DDIM sampler (ignored by DDPM).
    pub steps: usize,
    /// DDIM's `eta`.
    pub eta: f64,
    /// The range the `x_0` prediction is clipped to (`None`: no clipping).
    pub clip: Option<(f32, f32)>,
    /// The reverse variance of the ancestral sampler.
    pub variance: ReverseVariance,
}

impl SamplerSettings {
    /// One line naming the sampler, e.g. `DDIM, 50 steps, eta 0` or `DDPM, 1000 steps`.
    pub fn describe(&self, timesteps: usize) -> String {
        match self.kind {
            SamplerKind::Ddpm => format!("DDPM ancestral, {timesteps} steps"),
            SamplerKind::Ddim => format!(
                "DDIM, {} steps, eta {}",
                self.steps.clamp(1, timesteps),
                self.eta
            ),
        }
    }
}

/// Runs the reverse process from `x_T` (B, D) and returns `x_0` (B, D) in model space.
/// `model(x_t, t)` returns the network's output (B, D m): `eps` first, then (learned
/// variance) `v`; `noise(shape)` draws standard normals. With `trajectory`, the state after
/// every step is pushed onto it (the first entry is `x_T`).
pub fn sample(
    schedule: &Schedule,
    s: &SamplerSettings,
    x_t: Tensor,
    mut model: impl FnMut(&Tensor, usize) -> Result<Tensor>,
    mut noise: impl FnMut(&[usize]) -> Result<Tensor>,
    mut trajectory: Option<&mut Vec<Tensor>>,
) -> Result<Tensor> {
    let d = x_t.dim(1)?;
    let mut x = x_t;
    if let Some(tr) = trajectory.as_deref_mut() {
        tr.push(x.clone());
    }
    let steps: Vec<usize> = match s.kind {
        SamplerKind::Ddpm => (0..schedule.len()).collect(),
        SamplerKind::Ddim => schedule.spaced_steps(s.steps),
    };
    for i in (0..steps.len()).rev() {
        let t = steps[i];
        let out = model(&x, t)?;
        let eps = out.narrow(1, 0, d)?.contiguous()?;
        let a = schedule.abar[t];
        let base = SamplerCoefficients {
            sqrt_recip_abar: schedule.sqrt_recip_abar[t] as f32,
            sqrt_recipm1_abar: schedule.sqrt_recipm1_abar[t] as f32,
            clip: s.clip,
            sqrt_abar: a.sqrt() as f32,
            sqrt_one_minus_abar: (1.0 - a).sqrt() as f32,
            c_x0: 0.0,
            c_xt: 0.0,
            c_eps: 0.0,
            sigma: 0.0,
        };
        let shape = x.dims().to_vec();
        x = match s.kind {
            SamplerKind::Ddpm => {
                let c = SamplerCoefficients {
                    c_x0: schedule.posterior_mean_coef1[t] as f32,
                    c_xt: schedule.posterior_mean_coef2[t] as f32,
                    ..base
                };
                if t == 0 {
                    sampler_step(&x, &eps, &x.zeros_like()?, &c)?
                } else if s.variance == ReverseVariance::Learned {
                    let v = out.narrow(1, d, d)?;
                    let log_var = learned_log_variance(schedule, t, &v)?;
                    let z = (noise(&shape)? * (log_var * 0.5)?.exp()?)?;
                    sampler_step(&x, &eps, &z, &SamplerCoefficients { sigma: 1.0, ..c })?
                } else {
                    let lv = schedule.fixed_log_variance(s.variance)[t];
                    let sigma = (0.5 * lv).exp() as f32;
                    sampler_step(
                        &x,
                        &eps,
                        &noise(&shape)?,
                        &SamplerCoefficients { sigma, ..c },
                    )?
                }
            }
            SamplerKind::Ddim => {
                let a_prev = if i > 0 {
                    schedule.abar[steps[i - 1]]
                } else {
                    1.0
                };
                let sigma = s.eta
                    * ((1.0 - a_prev) / (1.0 - a)).sqrt()
                    * (1.0 - a / a_prev).max(0.0).sqrt();
                let c = SamplerCoefficients {
                    c_x0: a_prev.sqrt() as f32,
                    c_eps: (1.0 - a_prev - sigma * sigma).max(0.0).sqrt() as f32,
                    sigma: sigma as f32,
                    ..base
                };
                let z = if sigma > 0.0 {
                    noise(&shape)?
                } else {
                    x.zeros_like()?
                };
                sampler_step(&x, &eps, &z, &c)?
            }
        };
        if let Some(tr) = trajectory.as_deref_mut() {
            tr.push(x.clone());
        }
    }
    Ok(x)
}

/// The learned `log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t` with `frac = (v + 1)
/// / 2` (Nichol & Dhariwal 2021, eq. 15), elementwise for the network's `v` (B, D).
pub fn learned_log_variance(schedule: &Schedule, t: usize, v: &Tensor) -> Result<Tensor> {
    let max_log = schedule.log_betas[t];
    let min_log = schedule.posterior_log_variance_clipped[t];
    let frac = ((v + 1.0)? * 0.5)?;
    Ok(((&frac * max_log)? + ((1.0 - frac)? * min_log)?)?)
}
