//! Denoising diffusion models (Ho, Jain & Abbeel 2020, "DDPM"; Nichol & Dhariwal 2021,
//! "Improved DDPM"; Song, Meng & Ermon 2021, "DDIM"): the schedule ([`schedule`]), the
//! denoisers ([`networks`]), the samplers ([`sampler`]) and the model that holds them with its
//! exponential moving average of the weights.
//!
//! Data space and model space: images are stored as `pixel / 255` in `[0, 1]`; the model works
//! on `x = 2 pixel / 255 - 1` in `[-1, 1]` (the DDPM convention, so the discretized decoder's
//! bins are `2 / 255` wide). 2-D points are modelled as they are. The losses and the bound
//! live in `objectives::diffusion`.
//!
//! Checkpoint names (`docs/checkpoints.md`): the denoiser's parameters under their PyTorch
//! names (`net.0.weight`, or `conv_in.weight`, `down.0.blocks.0.conv1.weight`, ...) and the
//! EMA weights under the same names prefixed `ema.`.

pub mod networks;
pub mod sampler;
pub mod schedule;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

pub use crate::config::{DenoiserKind, DiffusionConfig, ReverseVariance, SamplerKind};
use crate::error::Result;
use crate::models::ParamStore;
pub use networks::Denoiser;
pub use sampler::SamplerSettings;
pub use schedule::Schedule;

/// The prefix of the EMA weights' names in checkpoints.
pub const EMA_PREFIX: &str = "ema.";

/// A diffusion model: the denoiser, its weights and their moving average, and the process.
#[derive(Debug, Clone)]
pub struct Diffusion {
    /// The trained weights.
    pub store: ParamStore,
    /// The exponential moving average of `store` (same names; `None` when `ema_decay = 0`).
    pub ema: Option<ParamStore>,
    pub denoiser: Denoiser,
    pub schedule: Schedule,
    pub cfg: DiffusionConfig,
    /// Values per data row `D`.
    pub dim: usize,
    /// `(C, H, W)` of images (`None`: points or rows, modelled as they are).
    pub image: Option<(usize, usize, usize)>,
    /// `[sqrt(abar_t), sqrt(1 - abar_t)]`, (T, 2), on the model's device.
    pub q_table: Tensor,
}

impl Diffusion {
    /// A fresh model for rows of `dim` values (`image = Some((C, H, W))` for images).
    ///
    /// # Errors
    /// A schedule with a beta outside (0, 1); a U-Net for 2-D points or for images its levels
    /// cannot halve.
    pub fn new(
        cfg: &DiffusionConfig,
        dim: usize,
        image: Option<(usize, usize, usize)>,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let schedule = Schedule::new(cfg)?;
        let mut store = ParamStore::new(device.clone());
        let denoiser = Denoiser::new(&mut store, cfg, dim, image, rng)?;
        let ema = if cfg.ema_decay > 0.0 {
            Some(store.deep_copy()?)
        } else {
            None
        };
        Ok(Diffusion {
            q_table: schedule.q_table(device)?,
            store,
            ema,
            denoiser,
            schedule,
            cfg: cfg.clone(),
            dim,
            image,
        })
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// Data rows (B, D) to model space: `2 x - 1` for images, unchanged for points.
    pub fn to_model_space(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.image {
            Some(_) => x.affine(2.0, -1.0)?,
            None => x.clone(),
        })
    }

    /// Model space (B, D) back to data rows: `(x + 1) / 2` for images (clamped to `[0, 1]`),
    /// unchanged for points.
    pub fn to_data_space(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.image {
            Some(_) => x.affine(0.5, 0.5)?.clamp(0f32, 1f32)?,
            None => x.clone(),
        })
    }

    /// The network's output (B, D m) for `x_t` (B, D) at steps `t` with weights `w` (store
    /// order: [`ParamStore::tensors`] to train, [`Self::eval_weights`] to evaluate).
    pub fn forward(&self, w: &[Tensor], x_t: &Tensor, t: &[u32]) -> Result<Tensor> {
        self.denoiser.forward(w, x_t, t, self.image)
    }

    /// The weights `eval` and `sample` use: the EMA when there is one, else the trained
    /// weights; detached (no autograd graph).
    pub fn eval_weights(&self) -> Vec<Tensor> {
        self.ema.as_ref().unwrap_or(&self.store).detached_tensors()
    }

    /// `ema <- d ema + (1 - d) theta` with `d = min(ema_decay, (1 + n) / (10 + n))` under
    /// warm-up (`n`: updates so far, starting at 1), else `ema_decay`. Returns the decay used
    /// (`None` without an EMA).
    pub fn update_ema(&self, updates: u64) -> Result<Option<f64>> {
        let Some(ema) = &self.ema else {
            return Ok(None);
        };
        let mut d = self.cfg.ema_decay;
        if self.cfg.ema_warmup {
            d = d.min((1.0 + updates as f64) / (10.0 + updates as f64));
        }
        for ((_, e), (_, p)) in ema.iter().zip(self.store.iter()) {
            let new = ((e.as_tensor() * d)? + p.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
            e.set(&new)?;
        }
        Ok(Some(d))
    }

    /// The EMA weights under their checkpoint names (`ema.` + the parameter's name).
    pub fn named_ema(&self) -> Vec<(String, Tensor)> {
        self.ema
            .as_ref()
            .map(|e| {
                e.named_tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sampler of the config (DDPM or DDIM with its steps and eta; clipping for images).
    pub fn sampler_settings(&self) -> SamplerSettings {
        SamplerSettings {
            kind: self.cfg.sampler,
            steps: self.cfg.sample_steps,
            eta: self.cfg.ddim_eta,
            clip: (self.image.is_some() && self.cfg.clip_denoised).then_some((-1.0, 1.0)),
            variance: self.cfg.variance,
        }
    }

    /// `n` samples (n, D) in data space from the evaluation weights with sampler `s`, every
    /// draw from `rng`; with `trajectory`, the model-space state after every step.
    pub fn sample_with(
        &self,
        n: usize,
        s: &SamplerSettings,
        rng: &mut ChaCha8Rng,
        trajectory: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let w = self.eval_weights();
        let device = self.device().clone();
        let mut normal = |shape: &[usize]| -> Result<Tensor> {
            let count: usize = shape.iter().product();
            Ok(Tensor::from_vec(
                crate::rng::normal_vec(rng, count),
                shape,
                &device,
            )?)
        };
        let x_t = normal(&[n, self.dim])?;
        let x = sampler::sample(
            &self.schedule,
            s,
            x_t,
            |x, t| self.forward(&w, x, &vec![t as u32; n]),
            normal,
            trajectory,
        )?;
        self.to_data_space(&x)
    }

    /// `n` samples (n, D) in data space with the config's sampler.
    pub fn sample(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.sample_with(n, &self.sampler_settings(), rng, None)
    }
}
