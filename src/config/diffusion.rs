//! `[model.diffusion]`: a denoising diffusion model (Ho, Jain & Abbeel 2020, "DDPM"; Nichol &
//! Dhariwal 2021, "Improved DDPM"; Song, Meng & Ermon 2021, "DDIM"): its noise schedule, reverse
//! variance, denoiser network, weight average and default sampler, with the checks and the
//! parameter count that are arithmetic on these values alone.
//!
//! Tunable on resume (not structural): `vlb_weight`, `ema_decay`, `ema_warmup`, `sampler`,
//! `sample_steps`, `ddim_eta` and `clip_denoised`. Everything else fixes the parameters or the
//! meaning of the time index.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fields of `[model.diffusion]` that may change on resume (paths as `Config::leaves`
/// spells them).
pub const TUNABLE_DIFFUSION_FIELDS: &[&str] = &[
    "model.diffusion.vlb_weight",
    "model.diffusion.ema_decay",
    "model.diffusion.ema_warmup",
    "model.diffusion.sampler",
    "model.diffusion.sample_steps",
    "model.diffusion.ddim_eta",
    "model.diffusion.clip_denoised",
];

/// Rows of the test set a diffusion model's bound is evaluated on at once.
pub const DIFFUSION_EVAL_ROWS: usize = 250;

/// The forward process's variance schedule `beta_1..beta_T` (`model.diffusion.schedule`),
/// always computed in f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSchedule {
    /// `beta_t` evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, section 4).
    #[default]
    Linear,
    /// `abar_t = f(t) / f(0)`, `f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)`, `beta_t = min(1 -
    /// abar_t / abar_{t-1}, max_beta)` (Nichol & Dhariwal 2021, eq. 17).
    Cosine,
}

/// The variance of the reverse process `p(x_{t-1} | x_t)` (`model.diffusion.variance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReverseVariance {
    /// `sigma_t^2 = beta_t` (optimal for `x_0 ~ N(0, I)`; Ho et al.'s code default
    /// `fixedlarge`, with `beta~_2` at the first step for the bound).
    #[default]
    FixedLarge,
    /// `sigma_t^2 = beta~_t`, the true posterior's variance (optimal for one point).
    FixedSmall,
    /// Learned interpolation `log sigma^2 = v log beta_t + (1 - v) log beta~_t` from a second
    /// output map, trained with the hybrid loss `L_simple + vlb_weight L_vlb` (Nichol &
    /// Dhariwal 2021, eq. 15-16).
    Learned,
}

/// The denoising network `eps_theta(x_t, t)` (`model.diffusion.denoiser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DenoiserKind {
    /// An MLP on `[x_t, time embedding]` with SiLU hidden layers (`hidden`), for any data;
    /// the choice for 2-D points.
    #[default]
    Mlp,
    /// A U-Net (Ronneberger et al. 2015, as in Ho et al.'s DDPM) for one-channel images:
    /// residual blocks with GroupNorm and SiLU, the time embedding added in every block,
    /// strided-convolution down- and nearest up-sampling with skip connections, optional
    /// self-attention at the lowest resolution, zero-initialized output convolutions.
    Unet,
}

/// The sampler `eval` and `sample` use unless told otherwise (`model.diffusion.sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Ancestral sampling through every one of the T steps (Ho et al., Algorithm 2).
    Ddpm,
    /// DDIM (Song et al. 2021, eq. 12) on `sample_steps` evenly spaced steps with `ddim_eta`.
    #[default]
    Ddim,
}

/// A diffusion model's process, network and sampling settings (`[model.diffusion]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// Diffusion steps `T`. Default: 1000.
    pub timesteps: usize,
    /// `linear` or `cosine` ([`NoiseSchedule`]). Default: `linear`.
    pub schedule: NoiseSchedule,
    /// `beta_1` of the linear schedule, in (0, 1). Default: `1e-4`.
    pub beta_start: f64,
    /// `beta_T` of the linear schedule, in (0, 1). Default: `0.02`.
    pub beta_end: f64,
    /// Offset `s` of the cosine schedule, > 0. Default: 0.008.
    pub cosine_s: f64,
    /// Cap on the cosine schedule's `beta_t`, in (0, 1). Default: 0.999.
    pub max_beta: f64,
    /// `fixed_large`, `fixed_small` or `learned` ([`ReverseVariance`]). Default: `fixed_large`.
    pub variance: ReverseVariance,
    /// `lambda` of the hybrid loss `L_simple + lambda L_vlb` (`variance = "learned"` only).
    /// Tunable on resume. Default: 0.001.
    pub vlb_weight: f64,
    /// `mlp` or `unet` ([`DenoiserKind`]). Default: `mlp`.
    pub denoiser: DenoiserKind,
    /// Width of the sinusoidal time embedding (even). Default: 128.
    pub time_embedding: usize,
    /// Hidden widths of the MLP denoiser (SiLU). Default: `[256, 256, 256]`.
    pub hidden: Vec<usize>,
    /// MLP denoiser: width of a sinusoidal embedding of each input value (of `input_scale x`,
    /// the time embedding's frequencies), fed beside the raw values; it lets an MLP resolve
    /// sharp modes of low-dimensional data (tiny-diffusion's finding). 0: raw values only.
    /// Default: 0.
    pub input_embedding: usize,
    /// Scale of the input values inside `input_embedding`. Default: 25.
    pub input_scale: f64,
    /// Channels of the U-Net's first level. Default: 32.
    pub channels: usize,
    /// Channel multiplier of each U-Net level, top first; the image is halved between levels,
    /// so its sides must be divisible by `2^(levels - 1)`. Default: `[1, 2, 2]`.
    pub channel_mult: Vec<usize>,
    /// Residual blocks per U-Net level. Default: 1.
    pub res_blocks: usize,
    /// Self-attention block at the U-Net's lowest resolution. Default: `false`.
    pub attention: bool,
    /// Groups of every GroupNorm (must divide every level's channels). Default: 8.
    pub groups: usize,
    /// Decay of the exponential moving average of the weights (0: no EMA; `eval` and `sample`
    /// use the EMA weights when there are some). Tunable on resume. Default: 0.999.
    pub ema_decay: f64,
    /// EMA warm-up: decay `min(ema_decay, (1 + n) / (10 + n))` at update `n`. Tunable on
    /// resume. Default: `true`.
    pub ema_warmup: bool,
    /// `ddpm` or `ddim` ([`SamplerKind`]). Tunable on resume. Default: `ddim`.
    pub sampler: SamplerKind,
    /// Steps of the DDIM sampler (1..=T; the DDPM sampler always takes T). Tunable on resume.
    /// Default: 50.
    pub sample_steps: usize,
    /// DDIM's `eta` (0: deterministic; 1: DDPM-like noise), >= 0. Tunable on resume. Default: 0.
    pub ddim_eta: f64,
    /// Clip the `x_0` prediction to the data range `[-1, 1]` while sampling images (2-D points
    /// are never clipped). Tunable on resume. Default: `true`.
    pub clip_denoised: bool,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        DiffusionConfig {
            timesteps: 1000,
            schedule: NoiseSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            cosine_s: 0.008,
            max_beta: 0.999,
            variance: ReverseVariance::FixedLarge,
            vlb_weight: 0.001,
            denoiser: DenoiserKind::Mlp,
            time_embedding: 128,
            hidden: vec![256, 256, 256],
            input_embedding: 0,
            input_scale: 25.0,
            channels: 32,
            channel_mult: vec![1, 2, 2],
            res_blocks: 1,
            attention: false,
            groups: 8,
            ema_decay: 0.999,
            ema_warmup: true,
            sampler: SamplerKind::Ddim,
            sample_steps: 50,
            ddim_eta: 0.0,
            clip_denoised: true,
        }
    }
}

impl DiffusionConfig {
    /// Checks the values a user can get wrong (each message names its field).
    ///
    /// # Errors
    /// [`Error::Config`]: `T = 0`, a beta outside (0, 1), a linear schedule that decreases, a
    /// non-positive cosine offset, an odd or zero time embedding, zero widths or channels,
    /// groups that do not divide a level's channels, an EMA decay outside [0, 1), DDIM steps
    /// outside 1..=T, a negative eta or a negative hybrid-loss weight.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("model.diffusion.{m}")));
        let unit = |x: f64| x > 0.0 && x < 1.0;
        if self.timesteps == 0 {
            return bad("timesteps must be at least 1".into());
        }
        if !unit(self.beta_start) || !unit(self.beta_end) || self.beta_end < self.beta_start {
            return bad(format!(
                "beta_start = {}, beta_end = {}: need 0 < beta_start <= beta_end < 1",
                self.beta_start, self.beta_end
            ));
        }
        if !(self.cosine_s > 0.0 && self.cosine_s.is_finite() && unit(self.max_beta)) {
            return bad(format!(
                "cosine_s = {} must be > 0 and max_beta = {} in (0, 1)",
                self.cosine_s, self.max_beta
            ));
        }
        if self.time_embedding == 0 || self.time_embedding % 2 != 0 {
            return bad(format!(
                "time_embedding = {}: must be even and positive",
                self.time_embedding
            ));
        }
        if self.input_embedding % 2 != 0
            || !(self.input_scale > 0.0 && self.input_scale.is_finite())
        {
            return bad(format!(
                "input_embedding = {} must be even and input_scale = {} positive",
                self.input_embedding, self.input_scale
            ));
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return bad("hidden: at least one hidden layer, every width positive".into());
        }
        if self.channels == 0
            || self.channel_mult.is_empty()
            || self.channel_mult.contains(&0)
            || self.res_blocks == 0
            || self.groups == 0
        {
            return bad(
                "channels, channel_mult (non-empty), res_blocks and groups must be positive".into(),
            );
        }
        for &m in &self.channel_mult {
            let c = self.channels.saturating_mul(m);
            if c % self.groups != 0 {
                return bad(format!(
                    "groups = {} does not divide a level's {c} channels",
                    self.groups
                ));
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!("ema_decay = {}: must be in [0, 1)", self.ema_decay));
        }
        if self.sample_steps == 0 || self.sample_steps > self.timesteps {
            return bad(format!(
                "sample_steps = {}: must be in 1..={}",
                self.sample_steps, self.timesteps
            ));
        }
        if !(self.ddim_eta >= 0.0 && self.ddim_eta.is_finite()) {
            return bad(format!("ddim_eta = {}: must be >= 0", self.ddim_eta));
        }
        if !(self.vlb_weight >= 0.0 && self.vlb_weight.is_finite()) {
            return bad(format!("vlb_weight = {}: must be >= 0", self.vlb_weight));
        }
        Ok(())
    }

    /// Output values per input value of the denoiser: 2 with learned variances (`eps` and the
    /// interpolation `v`), else 1.
    pub fn output_multiplier(&self) -> usize {
        if self.variance == ReverseVariance::Learned {
            2
        } else {
            1
        }
    }

    /// Checks that images of `shape = (C, H, W)` suit the U-Net: both sides divisible by
    /// `2^(levels - 1)` (any number of channels).
    ///
    /// # Errors
    /// [`Error::Config`] naming the shape and the levels.
    pub fn check_image_shape(&self, (_, h, w): (usize, usize, usize)) -> Result<()> {
        if self.denoiser != DenoiserKind::Unet {
            return Ok(());
        }
        let shape = (h, w);
        let f = 1usize << (self.channel_mult.len() - 1).min(30);
        if shape.0 < f || shape.1 < f || shape.0 % f != 0 || shape.1 % f != 0 {
            return Err(Error::Config(format!(
                "model.diffusion.channel_mult: {} U-Net levels halve the image {} times, but {}x{} images are not divisible by {f}",
                self.channel_mult.len(),
                self.channel_mult.len() - 1,
                shape.0,
                shape.1
            )));
        }
        Ok(())
    }

    /// Parameters of the denoiser on rows of `dim` values (`None` on overflow), without
    /// allocating. The U-Net count assumes one-channel images.
    pub fn parameter_count(&self, dim: usize) -> Option<usize> {
        let out = dim.checked_mul(self.output_multiplier())?;
        let e = self.time_embedding;
        let lin = |a: usize, b: usize| a.checked_add(1)?.checked_mul(b);
        match self.denoiser {
            DenoiserKind::Mlp => {
                let mut total = 0usize;
                let mut d = dim
                    .checked_mul(self.input_embedding.checked_add(1)?)?
                    .checked_add(e)?;
                for &h in &self.hidden {
                    total = total.checked_add(lin(d, h)?)?;
                    d = h;
                }
                total.checked_add(lin(d, out)?)
            }
            DenoiserKind::Unet => self.unet_parameter_count(),
        }
    }

    /// The U-Net's parameters (one input channel), mirroring `models::diffusion::unet`.
    fn unet_parameter_count(&self) -> Option<usize> {
        let e = self.time_embedding;
        let emb = 4usize.checked_mul(self.channels)?;
        let lin = |a: usize, b: usize| a.checked_add(1)?.checked_mul(b);
        let conv =
            |a: usize, b: usize, k: usize| a.checked_mul(b)?.checked_mul(k * k)?.checked_add(b);
        let norm = |c: usize| c.checked_mul(2);
        // A residual block a -> b: norm, conv3, time projection, norm, conv3, 1x1 skip if a != b.
        let res = |a: usize, b: usize| -> Option<usize> {
            let mut t = norm(a)?
                .checked_add(conv(a, b, 3)?)?
                .checked_add(lin(emb, b)?)?
                .checked_add(norm(b)?)?
                .checked_add(conv(b, b, 3)?)?;
            if a != b {
                t = t.checked_add(conv(a, b, 1)?)?;
            }
            Some(t)
        };
        let chans: Vec<usize> = self
            .channel_mult
            .iter()
            .map(|&m| self.channels.checked_mul(m))
            .collect::<Option<_>>()?;
        let mut total = lin(e, emb)?.checked_add(lin(emb, emb)?)?;
        total = total.checked_add(conv(1, self.channels, 3)?)?;
        let mut c = self.channels;
        let mut skips = Vec::new();
        for (l, &ch) in chans.iter().enumerate() {
            for _ in 0..self.res_blocks {
                total = total.checked_add(res(c, ch)?)?;
                c = ch;
            }
            skips.push(c);
            if l + 1 < chans.len() {
                total = total.checked_add(conv(c, c, 3)?)?;
            }
        }
        total = total.checked_add(res(c, c)?)?;
        if self.attention {
            total = total
                .checked_add(norm(c)?)?
                .checked_add(conv(c, c.checked_mul(3)?, 1)?)?
                .checked_add(conv(c, c, 1)?)?;
        }
        total = total.checked_add(res(c, c)?)?;
        for (l, &ch) in chans.iter().enumerate().rev() {
            let skip = skips[l];
            for b in 0..self.res_blocks {
                let a = if b == 0 { c.checked_add(skip)? } else { c };
                total = total.checked_add(res(a, ch)?)?;
                c = ch;
            }
            if l > 0 {
                total = total.checked_add(conv(c, chans[l - 1], 3)?)?;
                c = chans[l - 1];
            }
        }
        let out = self.output_multiplier();
        total.checked_add(norm(c)?)?.checked_add(conv(c, out, 3)?)
    }
}
