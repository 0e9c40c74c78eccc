//! Variational autoencoders with one or more stochastic layers, as in Burda et al. 2016 ("Importance
//! Weighted Autoencoders", section 5): `q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})` and
//! `p(z_L) p(z_{L-1}|z_L) ... p(x|z_1)`, every conditional a diagonal Gaussian except the
//! likelihood `p(x|z_1)` (Bernoulli with logits, or diagonal Gaussian). The top prior is N(0, I).
//!
//! [`Vae::pass`] samples `k` latent paths per data point (reparameterized, `z = mu + exp(logvar/2) eps`)
//! and returns the per-sample terms of `log w = log p(x, z) - log q(z | x)`; the `objectives`
//! module combines them into the ELBO or the IWAE bound. Rows are sample-major:
//! row `i * B + b` is sample `i` of data point `b`.
//!
//! A *conditional* VAE (Sohn et al. 2015, "Learning Structured Output Representation using Deep
//! Conditional Generative Models"; Kingma et al. 2014's M2 with observed labels) has
//! `model.classes = C > 0`: input rows carry the one-hot label after the `D` data values, the
//! bottom encoder sees `[x, y]` (`q(z_1 | x, y)`), the likelihood sees `[z_1, y]`
//! (`p(x | z_1, y)`), and the prior stays `N(0, I)`, so the bound is that of `log p(x | y)`.

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use super::mlp::{BernoulliHead, BlockSpec, GaussianHead};
use super::params::ParamStore;
use crate::config::{DecoderKind, ModelConfig};
use crate::error::Result;
use crate::ops::bernoulli::bernoulli_log_likelihood;
use crate::ops::gaussian::{gaussian_log_density, reparameterize, standard_normal_log_density};

/// The likelihood `p(x | z_1)`.
#[derive(Debug, Clone)]
enum XDecoder {
    Bernoulli(BernoulliHead),
    Gaussian(GaussianHead),
}

/// A VAE / IWAE model.
#[derive(Debug, Clone)]
pub struct Vae {
    /// All parameters, PyTorch-named.
    pub store: ParamStore,
    encoders: Vec<GaussianHead>,
    /// `latent_decoders[l - 1]` is `p(z_l | z_{l+1})` (PyTorch name `decoders.{l}`).
    latent_decoders: Vec<GaussianHead>,
    x_decoder: XDecoder,
    /// Latent sizes, bottom first.
    pub latents: Vec<usize>,
    /// Data dimension D.
    pub input_dim: usize,
    /// Classes of the conditioning label (0: unconditional).
    pub classes: usize,
}

/// The per-sample terms of one pass, each of shape `(k * B)`.
#[derive(Debug, Clone)]
pub struct Pass {
    /// `log p(x | z_1)`.
    pub log_px: Tensor,
    /// `log p(z)`: top prior plus the conditional priors of the lower layers.
    pub log_pz: Option<Tensor>,
    /// `log q(z | x)`.
    pub log_qz: Option<Tensor>,
    /// `(mu, logvar)` of `q(z_1 | x)`, shape `(B, d_1)`.
    pub q1: (Tensor, Tensor),
}

impl Vae {
    /// Builds the model with the initialization of `cfg.init` drawn from `rng` and the Gaussian
    /// heads of `cfg.gaussian_head` (`cfg.output_bias` needs the data:
    /// [`Vae::set_output_bias_from_mean`]).
    pub fn new(
        cfg: &ModelConfig,
        input_dim: usize,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let mut store = ParamStore::new(device.clone());
        let act = BlockSpec {
            act: cfg.activation,
            init: cfg.init,
            scale: cfg.gaussian_head,
        };
        let latents: Vec<usize> = cfg.layers.iter().map(|l| l.latent).collect();
        let classes = cfg.classes;
        let mut dims = vec![input_dim];
        dims.extend(&latents);
        let mut encoders = Vec::new();
        for (l, layer) in cfg.layers.iter().enumerate() {
            encoders.push(GaussianHead::new(
                &mut store,
                &format!("encoders.{l}"),
                dims[l] + if l == 0 { classes } else { 0 },
                &layer.hidden,
                dims[l + 1],
                act,
                rng,
            )?);
        }
        let rev0: Vec<usize> = cfg.layers[0].hidden.iter().rev().copied().collect();
        let x_decoder = match cfg.decoder {
            DecoderKind::Bernoulli => XDecoder::Bernoulli(BernoulliHead::new(
                &mut store,
                "decoders.0",
                dims[1] + classes,
                &rev0,
                input_dim,
                act,
                rng,
            )?),
            DecoderKind::Gaussian => XDecoder::Gaussian(GaussianHead::new(
                &mut store,
                "decoders.0",
                dims[1] + classes,
                &rev0,
                input_dim,
                act,
                rng,
            )?),
        };
        let mut latent_decoders = Vec::new();
        for (l, layer) in cfg.layers.iter().enumerate().skip(1) {
            let rev: Vec<usize> = layer.hidden.iter().rev().copied().collect();
            latent_decoders.push(GaussianHead::new(
                &mut store,
                &format!("decoders.{l}"),
                dims[l + 1],
                &rev,
                dims[l],
                act,
                rng,
            )?);
        }
        Ok(Vae {
            store,
            encoders,
            latent_decoders,
            x_decoder,
            latents,
            input_dim,
            classes,
        })
    }

    /// Sets the likelihood's mean bias from the training data's per-dimension means `mean`
    /// (`D` values in `[0, 1]`, labels left out), as `model.output_bias = "data_mean"` asks: a
    /// Bernoulli decoder's `decoders.0.out.bias` becomes `logit(clamp(mean, 0.001, 0.999))`
    /// (Burda et al.'s released code, `get_train_bias_np`), a Gaussian decoder's
    /// `decoders.0.mu.bias` the mean itself.
    ///
    /// # Errors
    /// A `mean` whose length is not the data dimension `D`, or a non-finite value.
    pub fn set_output_bias_from_mean(&self, mean: &[f64]) -> Result<()> {
        if mean.len() != self.input_dim || mean.iter().any(|m| !m.is_finite()) {
            return Err(crate::error::Error::Data(format!(
                "output bias from the data mean: {} finite values needed, got {}",
                self.input_dim,
                mean.len()
            )));
        }
        let (name, bias): (&str, Vec<f32>) = match self.x_decoder {
            XDecoder::Bernoulli(_) => (
                "decoders.0.out.bias",
                mean.iter()
                    .map(|&m| {
                        let m = m.clamp(0.001, 0.999);
                        (m / (1.0 - m)).ln() as f32
                    })
                    .collect(),
            ),
            XDecoder::Gaussian(_) => (
                "decoders.0.mu.bias",
                mean.iter().map(|&m| m as f32).collect(),
            ),
        };
        let bias = Tensor::from_vec(bias, self.input_dim, self.store.device())?;
        self.store.set(name, &bias)
    }

    /// Splits an input row block into the data `x` and, for a conditional model, the one-hot
    /// labels `y` that follow it.
    pub fn split_input(&self, input: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let width = input.dim(1)?;
        if width != self.input_dim + self.classes {
            return Err(crate::error::Error::Data(format!(
                "input rows have {width} values, the model expects {} data values{}",
                self.input_dim,
                if self.classes > 0 {
                    format!(" and a one-hot label of {} classes", self.classes)
                } else {
                    String::new()
                }
            )));
        }
        if self.classes == 0 {
            return Ok((input.clone(), None));
        }
        Ok((
            input.narrow(1, 0, self.input_dim)?,
            Some(input.narrow(1, self.input_dim, self.classes)?),
        ))
    }

    /// The likelihood network's input: `z_1`, joined by the labels of a conditional model.
    fn decoder_input(&self, z1: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        match (y, self.classes) {
            (_, 0) => Ok(z1.clone()),
            (Some(y), _) => Ok(Tensor::cat(&[z1, &y.to_dtype(z1.dtype())?], 1)?),
            (None, c) => Err(crate::error::Error::Config(format!(
                "a conditional model ({c} classes) needs labels to decode"
            ))),
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// Standard-normal noise for `k` samples of `b` data points, one tensor per layer.
    pub fn draw_noise(&self, k: usize, b: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Tensor>> {
        self.latents
            .iter()
            .map(|&d| {
                Ok(Tensor::from_vec(
                    crate::rng::normal_vec(rng, k * b * d),
                    (k * b, d),
                    self.device(),
                )?)
            })
            .collect()
    }

    /// Like [`Vae::draw_noise`], drawn on the model's device from the counter stream `key`
    /// (layer `l` uses key `key + l`), with no host work or transfer.
    pub fn draw_noise_keyed(&self, k: usize, b: usize, key: u64) -> Result<Vec<Tensor>> {
        self.latents
            .iter()
            .enumerate()
            .map(|(l, &d)| {
                Ok(crate::ops::random::normal(
                    &[k * b, d],
                    key.wrapping_add(l as u64),
                    self.device(),
                )?)
            })
            .collect()
    }

    /// `(mu, logvar)` of `q(z_1 | x)`.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encoders[0].forward(x)
    }

    /// Samples `k` latent paths per row of `x` and evaluates the terms of the log weights.
    /// With `densities = false` only `log p(x | z_1)` and `q(z_1|x)` are computed (enough for the
    /// single-layer ELBO with analytic KL).
    pub fn pass(&self, input: &Tensor, k: usize, eps: &[Tensor], densities: bool) -> Result<Pass> {
        let b = input.dim(0)?;
        let (x, y) = self.split_input(input)?;
        let x = &x;
        let (mu1, lv1) = self.encoders[0].forward(input)?;
        let (mut mu, mut lv) = (repeat_rows(&mu1, k)?, repeat_rows(&lv1, k)?);
        let mut zs = Vec::with_capacity(self.latents.len());
        let mut log_qz: Option<Tensor> = None;
        for l in 0..self.latents.len() {
            if l > 0 {
                (mu, lv) = self.encoders[l].forward(&zs[l - 1])?;
            }
            let z = reparameterize(&mu, &lv, &eps[l])?;
            if densities {
                let lq = gaussian_log_density(&z, &mu, &lv)?;
                log_qz = Some(match log_qz {
                    Some(acc) => (acc + lq)?,
                    None => lq,
                });
            }
            zs.push(z);
        }
        let log_pz = if densities {
            let mut acc = standard_normal_log_density(zs.last().expect("one layer"))?;
            for l in (0..self.latent_decoders.len()).rev() {
                let (pm, plv) = self.latent_decoders[l].forward(&zs[l + 1])?;
                acc = (acc + gaussian_log_density(&zs[l], &pm, &plv)?)?;
            }
            Some(acc)
        } else {
            None
        };
        let log_px = self.log_px_given_z1(x, y.as_ref(), &zs[0], k)?;
        debug_assert_eq!(log_px.dim(0)?, k * b);
        Ok(Pass {
            log_px,
            log_pz,
            log_qz,
            q1: (mu1, lv1),
        })
    }

    /// `log p(x | z_1)` (`log p(x | z_1, y)` for a conditional model) in nats per row, `(k B,)`:
    /// `x (B, D)` and the labels `y (B, classes)` repeated sample-major to match `z1 (k B, d_1)`.
    fn log_px_given_z1(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        z1: &Tensor,
        k: usize,
    ) -> Result<Tensor> {
        let xk = repeat_rows(x, k)?;
        let yk = y.map(|y| repeat_rows(y, k)).transpose()?;
        let h = self.decoder_input(z1, yk.as_ref())?;
        Ok(match &self.x_decoder {
            XDecoder::Bernoulli(d) => bernoulli_log_likelihood(&d.forward(&h)?, &xk)?,
            XDecoder::Gaussian(d) => {
                let (m, v) = d.forward(&h)?;
                gaussian_log_density(&xk, &m, &v)?
            }
        })
    }

    /// The log weights of the naive Monte-Carlo estimator `p(x) ~ (1/k) sum_i p(x | z_i)` with
    /// `z_i ~ p(z)` (ancestral samples of the prior, every layer): `log p(x | z_1^(i))`, `(k B,)`
    /// sample-major like [`Vae::pass`], for the rows of `input` (`(B, D)`, with the one-hot
    /// labels appended for a conditional model). Noise from `rng`.
    pub fn prior_log_weights(
        &self,
        input: &Tensor,
        k: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let b = input.dim(0)?;
        let (x, y) = self.split_input(input)?;
        let z1 = self.sample_z1(k * b, rng)?;
        self.log_px_given_z1(&x, y.as_ref(), &z1, k)
    }

    /// Posterior means per layer, propagating means upward (`z_{l-1} = mu_{l-1}`).
    pub fn posterior_means(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.encoders.len());
        let mut h = x.clone();
        for e in &self.encoders {
            let (mu, _) = e.forward(&h)?;
            h = mu.clone();
            out.push(mu);
        }
        Ok(out)
    }

    /// The mean of `p(x | z_1)` (`p(x | z_1, y)` with one-hot labels `y` for a conditional
    /// model): pixel probabilities (Bernoulli) or the Gaussian mean.
    pub fn decode_mean(&self, z1: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let h = self.decoder_input(z1, y)?;
        Ok(match &self.x_decoder {
            XDecoder::Bernoulli(d) => candle_nn::ops::sigmoid(&d.forward(&h)?)?,
            XDecoder::Gaussian(d) => d.forward(&h)?.0,
        })
    }

    /// Ancestral samples of `z_1` from the prior, `n` rows, noise from `rng`.
    pub fn sample_z1(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let top = *self.latents.last().expect("one layer");
        let mut z = Tensor::from_vec(
            crate::rng::normal_vec(rng, n * top),
            (n, top),
            self.device(),
        )?;
        for l in (0..self.latent_decoders.len()).rev() {
            let (m, v) = self.latent_decoders[l].forward(&z)?;
            let eps = Tensor::from_vec(
                crate::rng::normal_vec(rng, n * self.latents[l]),
                (n, self.latents[l]),
                self.device(),
            )?;
            z = reparameterize(&m, &v, &eps)?;
        }
        Ok(z)
    }
}

/// `(B, d)` -> `(k * B, d)`, sample-major copies.
pub fn repeat_rows(t: &Tensor, k: usize) -> Result<Tensor> {
    Ok(if k == 1 { t.clone() } else { t.repeat((k, 1))? })
}
