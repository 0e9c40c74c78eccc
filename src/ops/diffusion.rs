//! TEMPORARY compositions with the API of the fused diffusion ops (replaced by the fused ops).
#![allow(missing_docs)]
use candle_core::{Result, Tensor, D};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerCoefficients {
    pub sqrt_recip_abar: f32,
    pub sqrt_recipm1_abar: f32,
    pub clip: Option<(f32, f32)>,
    pub sqrt_abar: f32,
    pub sqrt_one_minus_abar: f32,
    pub c_x0: f32,
    pub c_xt: f32,
    pub c_eps: f32,
    pub sigma: f32,
}

pub fn q_sample(x0: &Tensor, eps: &Tensor, t: &Tensor, table: &Tensor) -> Result<Tensor> {
    let c = table.index_select(t, 0)?;
    let a = c.narrow(1, 0, 1)?;
    let b = c.narrow(1, 1, 1)?;
    x0.broadcast_mul(&a)? + eps.broadcast_mul(&b)?
}

pub fn simple_loss(eps_pred: &Tensor, eps: &Tensor) -> Result<Tensor> {
    (eps_pred - eps)?.sqr()?.mean(D::Minus1)
}

pub fn sampler_step(
    x_t: &Tensor,
    eps_pred: &Tensor,
    noise: &Tensor,
    c: &SamplerCoefficients,
) -> Result<Tensor> {
    let mut x0 = ((x_t * c.sqrt_recip_abar as f64)? - (eps_pred * c.sqrt_recipm1_abar as f64)?)?;
    if let Some((lo, hi)) = c.clip {
        x0 = x0.clamp(lo, hi)?;
    }
    let mut out = ((&x0 * c.c_x0 as f64)? + (x_t * c.c_xt as f64)?)?;
    if c.c_eps != 0.0 {
        let e = ((x_t - (&x0 * c.sqrt_abar as f64)?)? / c.sqrt_one_minus_abar as f64)?;
        out = (out + (e * c.c_eps as f64)?)?;
    }
    out + (noise * c.sigma as f64)?
}
