//! A RealNVP-style normalizing flow (Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation
//! using Real NVP") with MLP coupling networks, ActNorm (Kingma & Dhariwal 2018, "Glow",
//! section 3.1) and a standard-normal base.
//!
//! The flow `f = f_L o ... o f_1` maps data `x` to `z = f(x)`; by the change of variables
//! `log p(x) = log N(f(x); 0, I) + sum_l log |det df_l / dh_{l-1}|`. Each step `l` is
//!
//! - ActNorm: `h' = (h + b) * exp(s)` per dimension, `log|det| = sum_j s_j`; `b` and `s` are
//!   initialized from training rows so that `h'` has zero mean and unit variance (a constant
//!   dimension keeps the scale 1; [`Flow::initialize`]), then trained as ordinary parameters (a
//!   checkpoint restores them);
//! - an affine coupling with a binary mask `m` (1: passed through and conditioned on):
//!   `(a, t) = NN(m * h)`, `s = c * tanh(a) * (1 - m)`, `t = t * (1 - m)`,
//!   `h' = h * exp(s) + t`, `log|det| = sum_j s_j`; inverse `h = (h' - t) * exp(-s)`, with
//!   `a, t` computed from `m * h' = m * h`. The learned per-dimension `c` bounds the log-scale as
//!   in the RealNVP code; the network's last layer starts at zero, so every coupling starts as
//!   the identity.
//!
//! Masks alternate between the two cells of a checkerboard over the image
//! (`(row + col + l) mod 2`); on 2-D points (`1 x 2`) that alternates the two coordinates.
//!
//! Images are modelled after uniform dequantization (`x = (pixel + u) / 256`, see
//! [`crate::data::batches`]) and the logit transform of RealNVP section 4.1,
//! `y = logit(alpha + (1 - 2 alpha) x)`, whose log-Jacobian per dimension is
//! `ln(1 - 2 alpha) - ln p - ln(1 - p)`, `p = alpha + (1 - 2 alpha) x`. Then
//! `log p_x(x) = log p_y(y) + sum_j log|dy_j/dx_j|`, and on the 8-bit pixel scale (bins of width
//! 1 in `[0, 256)^D`) `bits/dim = -(log p_x(x) - D ln 256) / (D ln 2)` (`objectives::bits_per_dim`).

use candle_core::{DType, Device, Tensor, D};
use rand_chacha::ChaCha8Rng;

use super::mlp::{Dense, Trunk};
use super::params::ParamStore;
use crate::config::Activation;
pub use crate::config::{FlowConfig, FlowMasks};
use crate::error::{Error, Result};
use crate::ops::gaussian::standard_normal_log_density;

impl ParamStore {
    /// Creates a parameter filled with `value`.
    pub fn constant(&mut self, name: String, shape: &[usize], value: f32) -> Result<Tensor> {
        let t = Tensor::full(value, shape, self.device())?;
        self.push(name, candle_core::Var::from_tensor(&t)?)
    }
}

/// Per-dimension shift and log-scale, initialized from data.
#[derive(Debug, Clone)]
struct ActNorm {
    bias: Tensor,
    logs: Tensor,
}

/// One affine coupling.
#[derive(Debug, Clone)]
struct Coupling {
    /// `1` where the input passes through, `(1, D)`.
    mask: Tensor,
    /// `1 - mask`.
    inv_mask: Tensor,
    trunk: Trunk,
    /// Last layer: `2D` outputs, the raw log-scales then the shifts.
    out: Dense,
    /// Per-dimension bound `c` of the log-scale.
    scale: Tensor,
}

/// A RealNVP-style flow on `dim` values.
#[derive(Debug, Clone)]
pub struct Flow {
    /// All parameters, PyTorch-named (`layers.{l}.actnorm.bias`, `layers.{l}.coupling.net.0.weight`...).
    pub store: ParamStore,
    actnorms: Vec<Option<ActNorm>>,
    couplings: Vec<Coupling>,
    /// Values per row.
    pub dim: usize,
    /// Data shape `(C, H, W)`: images (`H > 1`) are modelled through the logit transform; rows
    /// of `D` values are `(1, 1, D)`.
    pub shape: (usize, usize, usize),
    cfg: FlowConfig,
}

impl Flow {
    /// A flow for data of `(C, H, W)` values, drawn from `rng` (PyTorch's default
    /// initialization, the couplings' last layers at zero). Layer `l` masks value `i` (channel
    /// `c`, row `y`, column `x`) with the checkerboard `(c * H + y + x + l) mod 2`, the same
    /// checkerboard in every channel when `H` is even, or with `masks = "channel"` by channel,
    /// `(c + l) mod 2`.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config, fewer than 2 values per row, or channel masks on
    /// data of one channel.
    pub fn new(
        cfg: &FlowConfig,
        shape: (usize, usize, usize),
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        let dim = shape.0 * shape.1 * shape.2;
        if cfg.masks == FlowMasks::Channel && shape.0 < 2 {
            return Err(Error::Config(format!(
                "model.flow.masks = \"channel\" needs images of at least 2 channels, the data has {}",
                shape.0
            )));
        }
        if dim < 2 {
            return Err(Error::Config(format!(
                "a coupling flow needs at least 2 values per row, the data has {dim}"
            )));
        }
        let mut store = ParamStore::new(device.clone());
        let mut actnorms = Vec::new();
        let mut couplings = Vec::new();
        for l in 0..cfg.coupling_layers {
            let p = format!("layers.{l}");
            actnorms.push(if cfg.actnorm {
                Some(ActNorm {
                    bias: store.constant(format!("{p}.actnorm.bias"), &[dim], 0.0)?,
                    logs: store.constant(format!("{p}.actnorm.logs"), &[dim], 0.0)?,
                })
            } else {
                None
            });
            let plane = shape.1 * shape.2;
            let mask: Vec<f32> = (0..dim)
                .map(|i| match cfg.masks {
                    FlowMasks::Checkerboard => ((i / shape.2 + i % shape.2 + l) % 2) as f32,
                    FlowMasks::Channel => ((i / plane + l) % 2) as f32,
                })
                .collect();
            let mask = Tensor::from_vec(mask, (1, dim), device)?;
            let inv_mask = (1.0 - &mask)?;
            let trunk = Trunk::new(
                &mut store,
                &format!("{p}.coupling"),
                dim,
                &cfg.hidden,
                Activation::Relu,
                rng,
            )?;
            let last = trunk.out_dim;
            let out = Dense {
                weight: store.constant(
                    format!("{p}.coupling.out.weight"),
                    &[2 * dim, last],
                    0.0,
                )?,
                bias: store.constant(format!("{p}.coupling.out.bias"), &[2 * dim], 0.0)?,
                act: Activation::Identity,
            };
            let scale = store.constant(format!("{p}.coupling.scale"), &[dim], 1.0)?;
            couplings.push(Coupling {
                mask,
                inv_mask,
                trunk,
                out,
                scale,
            });
        }
        Ok(Flow {
            store,
            actnorms,
            couplings,
            dim,
            shape,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the flow was built from.
    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// `(s, t)` of coupling `c` given its input (only the masked part is read).
    fn scale_shift(c: &Coupling, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let dim = h.dim(1)?;
        let o = c
            .out
            .forward(&c.trunk.forward(&h.broadcast_mul(&c.mask)?)?)?;
        let a = o.narrow(1, 0, dim)?;
        let t = o.narrow(1, dim, dim)?.broadcast_mul(&c.inv_mask)?;
        let s = a
            .tanh()?
            .broadcast_mul(&c.scale.unsqueeze(0)?)?
            .broadcast_mul(&c.inv_mask)?;
        Ok((s, t))
    }

    /// Data-dependent ActNorm initialization (Glow): each ActNorm's bias and log-scale are set
    /// so that its output on `x` has zero mean and unit variance per dimension
    /// ([`actnorm_log_scale`]: a dimension that is constant over `x` keeps the scale 1). The
    /// statistics are only as good as `x` is large: the trainer initializes on at least
    /// [`ACTNORM_INIT_ROWS`] rows and refuses training sets under [`ACTNORM_MIN_ROWS`].
    pub fn initialize(&self, x: &Tensor) -> Result<()> {
        let mut h = x.detach();
        for (an, c) in self.actnorms.iter().zip(&self.couplings) {
            if let Some(an) = an {
                // In f64, so that a constant column comes out with a spread of (almost) exactly 0.
                let h64 = h.to_dtype(DType::F64)?;
                let mean = h64.mean(0)?;
                let std = h64.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
                let logs: Vec<f32> = mean
                    .to_vec1::<f64>()?
                    .into_iter()
                    .zip(std.to_vec1::<f64>()?)
                    .map(|(m, s)| actnorm_log_scale(m, s) as f32)
                    .collect();
                let logs = Tensor::from_vec(logs, self.dim, h.device())?;
                set_var(&self.store, &an.bias, &mean.neg()?)?;
                set_var(&self.store, &an.logs, &logs)?;
                h = h.broadcast_add(&an.bias)?.broadcast_mul(&an.logs.exp()?)?;
            }
            let (s, t) = Self::scale_shift(c, &h)?;
            h = ((h * s.exp()?)? + t)?.detach();
        }
        Ok(())
    }

    /// `(z, log|det dz/dx|)` per row.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        let mut log_det = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?;
        for (an, c) in self.actnorms.iter().zip(&self.couplings) {
            if let Some(an) = an {
                h = h.broadcast_add(&an.bias)?.broadcast_mul(&an.logs.exp()?)?;
                log_det = log_det.broadcast_add(&an.logs.sum_all()?)?;
            }
            let (s, t) = Self::scale_shift(c, &h)?;
            h = ((h * s.exp()?)? + t)?;
            log_det = (log_det + s.sum(D::Minus1)?)?;
        }
        Ok((h, log_det))
    }

    /// `x = f^{-1}(z)`.
    pub fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = z.clone();
        for (an, c) in self.actnorms.iter().zip(&self.couplings).rev() {
            let (s, t) = Self::scale_shift(c, &h)?;
            h = ((h - t)? * s.neg()?.exp()?)?;
            if let Some(an) = an {
                h = h
                    .broadcast_mul(&an.logs.neg()?.exp()?)?
                    .broadcast_sub(&an.bias)?;
            }
        }
        Ok(h)
    }

    /// Exact `log p(x)` per row (nats), by the change of variables.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (z, log_det) = self.forward(x)?;
        Ok((standard_normal_log_density(&z)? + log_det)?)
    }

    /// `n` samples: `f^{-1}(z)`, `z ~ N(0, I)` drawn from `rng`.
    pub fn sample(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let z = Tensor::from_vec(
            crate::rng::normal_vec(rng, n * self.dim),
            (n, self.dim),
            self.device(),
        )?;
        self.inverse(&z)
    }
}

impl Flow {
    /// True when the flow models images through the logit transform (`rows > 1`); 2-D points
    /// are modelled directly.
    pub fn uses_logit(&self) -> bool {
        self.shape.1 > 1
    }

    /// The model-space input of data rows `x` and the per-row log-Jacobian of that map.
    pub fn to_model_space(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if self.uses_logit() {
            let (y, lj) = logit_transform(x, self.cfg.alpha)?;
            Ok((y, Some(lj)))
        } else {
            Ok((x.clone(), None))
        }
    }

    /// Exact per-row `log p(x)` of data rows (nats; for images, a density on `[0, 1)^D`).
    pub fn data_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (y, lj) = self.to_model_space(x)?;
        let lp = self.log_prob(&y)?;
        Ok(match lj {
            Some(lj) => (lp + lj)?,
            None => lp,
        })
    }

    /// `n` samples in data space (images in `[0, 1]`).
    pub fn sample_data(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let y = self.sample(n, rng)?;
        if self.uses_logit() {
            inverse_logit_transform(&y, self.cfg.alpha)
        } else {
            Ok(y)
        }
    }

    /// The density `p(x)` on the centres of an `n x n` grid over `[lo, hi]^2` (2-D flows), row
    /// 0 at the top (largest y), for density plots.
    pub fn density_grid(&self, n: usize, lo: f32, hi: f32) -> Result<Vec<f32>> {
        if self.dim != 2 {
            return Err(Error::Config(format!(
                "a density grid needs a 2-D flow, this one has {} dimensions",
                self.dim
            )));
        }
        let h = (hi - lo) / n as f32;
        let mut pts = Vec::with_capacity(2 * n * n);
        for r in 0..n {
            for c in 0..n {
                pts.push(lo + (c as f32 + 0.5) * h);
                pts.push(hi - (r as f32 + 0.5) * h);
            }
        }
        let grid = Tensor::from_vec(pts, (n * n, 2), self.device())?;
        Ok(self.log_prob(&grid)?.exp()?.to_vec1()?)
    }
}

/// Rows ActNorm's data-dependent initialization sees during training: the first batch when it
/// is at least this large, else this many rows of the first epoch's order (all of a smaller
/// training set). Glow's reference code likewise initializes on a separate batch of 256
/// (`n_batch_init`), whatever the training batch.
pub const ACTNORM_INIT_ROWS: usize = 128;

/// Fewest training rows from which training initializes ActNorm: fewer cannot estimate each
/// dimension's spread (one row has none at all), and the run is refused.
pub const ACTNORM_MIN_ROWS: usize = 32;

/// The guard on a spread: `-ln(std + EPS)`, and a spread at or below `EPS * max(1, |mean|)` is
/// a constant dimension.
const ACTNORM_EPS: f64 = 1e-6;

/// ActNorm's initial log-scale for a dimension of mean `mean` and standard deviation `std`
/// over the initialization rows: `-ln(std + 1e-6)`, so that the dimension leaves with unit
/// variance, except that a constant dimension (a spread at or below `1e-6 * max(1, |mean|)`,
/// rounding error) keeps the scale 1 (log-scale 0): dividing by the guard instead would multiply
/// it by 1e6 (log-scale 13.8) and any other value it takes later by as much.
pub fn actnorm_log_scale(mean: f64, std: f64) -> f64 {
    if std <= ACTNORM_EPS * mean.abs().max(1.0) {
        0.0
    } else {
        -(std + ACTNORM_EPS).ln()
    }
}

fn set_var(store: &ParamStore, t: &Tensor, value: &Tensor) -> Result<()> {
    let var = store
        .iter()
        .find(|(_, v)| v.as_tensor().id() == t.id())
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Error::Config("actnorm parameter missing from the store".into()))?;
    var.set(&value.to_dtype(DType::F32)?.contiguous()?)?;
    Ok(())
}

/// The logit transform of RealNVP section 4.1 for data in `[0, 1]`:
/// `y = logit(alpha + (1 - 2 alpha) x)` and the per-row `sum_j log|dy_j / dx_j|`.
pub fn logit_transform(x: &Tensor, alpha: f64) -> Result<(Tensor, Tensor)> {
    let p = ((x * (1.0 - 2.0 * alpha))? + alpha)?;
    let log_p = p.log()?;
    let log_1mp = (1.0 - &p)?.log()?;
    let y = (&log_p - &log_1mp)?;
    let per_dim = ((log_p + log_1mp)?.neg()? + (1.0 - 2.0 * alpha).ln())?;
    Ok((y, per_dim.sum(D::Minus1)?))
}

/// Inverse of [`logit_transform`]: `x = (sigmoid(y) - alpha) / (1 - 2 alpha)`, clamped to [0, 1].
pub fn inverse_logit_transform(y: &Tensor, alpha: f64) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(y)?;
    Ok(((s - alpha)? / (1.0 - 2.0 * alpha))?.clamp(0f32, 1f32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{stream_rng, Stream};

    fn flow(dim: usize) -> Flow {
        let cfg = FlowConfig {
            coupling_layers: 2,
            hidden: vec![8],
            ..Default::default()
        };
        Flow::new(
            &cfg,
            (1, 1, dim),
            &Device::Cpu,
            &mut stream_rng(0, Stream::Init, 0),
        )
        .unwrap()
    }

    fn param(f: &Flow, name: &str) -> Vec<f32> {
        let (_, v) = f.store.iter().find(|(n, _)| *n == name).unwrap();
        v.as_tensor().to_vec1().unwrap()
    }

    /// A dimension with no spread over the initialization rows (here: every dimension of a single
    /// row) keeps the scale 1; it used to get log-scale -ln(1e-6) = 13.8, a factor of a million on
    /// any other value, and test NLLs of 1e28 nats.
    #[test]
    fn actnorm_leaves_constant_dimensions_unscaled() {
        let f = flow(2);
        let one = Tensor::new(&[[0.3f32, -2.0]], &Device::Cpu).unwrap();
        f.initialize(&one).unwrap();
        assert_eq!(param(&f, "layers.0.actnorm.logs"), vec![0.0, 0.0]);
        assert_eq!(param(&f, "layers.0.actnorm.bias"), vec![-0.3, 2.0]);
        let other = Tensor::new(&[[1.3f32, -1.0]], &Device::Cpu).unwrap();
        let lp = f.log_prob(&other).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(lp.is_finite() && lp > -5.0, "log p = {lp}");

        // One constant column beside a varying one: only the varying one is standardized.
        let f = flow(2);
        let x = Tensor::new(
            &[[5.0f32, 1.0], [5.0, 3.0], [5.0, 2.0], [5.0, 6.0]],
            &Device::Cpu,
        )
        .unwrap();
        f.initialize(&x).unwrap();
        let logs = param(&f, "layers.0.actnorm.logs");
        let std = ((4.0f64 + 0.0 + 1.0 + 9.0) / 4.0).sqrt(); // of 1, 3, 2, 6 (mean 3)
        assert_eq!(logs[0], 0.0);
        assert!(
            (logs[1] as f64 + (std + 1e-6).ln()).abs() < 1e-6,
            "{logs:?}"
        );
    }

    #[test]
    fn log_scale_of_a_spread() {
        assert_eq!(actnorm_log_scale(3.0, 0.0), 0.0);
        assert_eq!(actnorm_log_scale(-13.8, 1e-6), 0.0); // rounding error of a constant
        assert_eq!(actnorm_log_scale(0.0, 1e-6), 0.0);
        assert!((actnorm_log_scale(0.0, 0.5) - (2f64).ln()).abs() < 1e-5);
        assert!((actnorm_log_scale(100.0, 1e-3) + (1e-3f64 + 1e-6).ln()).abs() < 1e-12);
    }
}
