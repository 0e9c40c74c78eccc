//! Generative adversarial networks (Goodfellow et al. 2014) with MLP players:
//!
//! - generator `G(z)`, `z ~ N(0, I_latent)`: ReLU hidden layers, a linear output for 2-D points
//!   and a sigmoid for images in `[0, 1]`;
//! - discriminator `D(x)`: LeakyReLU(0.2) hidden layers and a linear scalar output, optionally
//!   with spectral normalization on every layer (Miyato et al. 2018, [`crate::ops::spectral_norm`]);
//! - losses ([`GanLoss`], computed in `objectives::gan`): non-saturating (D: `softplus(-D(x)) + softplus(D(G(z)))`,
//!   G: `softplus(-D(G(z)))`, Goodfellow et al. section 3), hinge (D: `relu(1 - D(x)) +
//!   relu(1 + D(G(z)))`, G: `-D(G(z))`, Lim & Ye 2017 / Miyato et al. 2018) and WGAN-GP
//!   (D: `D(G(z)) - D(x) + lambda (||grad_x D(x_hat)|| - 1)^2` at random interpolates
//!   `x_hat`, G: `-D(G(z))`, Gulrajani et al. 2017).
//!
//! The gradient penalty needs `grad_x D` inside a loss that is differentiated again; candle's
//! backprop does not differentiate its own backward graph, so [`Gan::input_gradient`] builds the
//! discriminator's input gradient as an ordinary forward graph: the chain rule written out
//! layer by layer, `g_{l-1} = (g_l * lrelu'(a_l)) W_l`, from `g_L = w_out`. The LeakyReLU
//! derivative is piecewise constant (1 or 0.2), so treating it as a constant is exact wherever
//! the derivative exists (everywhere but a null set), and one ordinary `backward()` of the
//! penalty then gives its exact gradient with respect to every weight (through the spectral
//! normalization too). `tests/gan.rs` checks both against finite differences.
//!
//! Parameter names follow PyTorch (`gen.net.0.weight`, `disc.net.0.weight_orig` with the
//! buffers `disc.net.0.weight_u` and `disc.net.0.weight_v` of `torch.nn.utils.spectral_norm`).

use candle_core::{DType, Device, Tensor, D};
use rand_chacha::ChaCha8Rng;

use super::mlp::{Dense, Trunk};
use super::params::ParamStore;
use crate::config::Activation;
pub use crate::config::{GanArchitecture, GanConfig, GanLoss};
use crate::error::{Error, Result};
use crate::ops::conv::{conv2d_act, conv_transpose2d, conv_transpose2d_act};
use crate::ops::linear::{linear, LEAKY_SLOPE};
use crate::ops::spectral_norm;

/// One discriminator layer: weight (spectrally normalized or not), bias, and the power-iteration
/// vectors when normalized.
#[derive(Debug, Clone)]
struct DiscLayer {
    name: String,
    weight: Tensor,
    bias: Tensor,
    /// `(u, v)` buffers (spectral norm only).
    uv: Option<(Tensor, Tensor)>,
    /// Input shape `(C, H, W)` of a 4x4 stride-2 convolution (`None`: a dense layer).
    conv: Option<(usize, usize, usize)>,
}

impl DiscLayer {
    /// A layer with weight `shape` (`[out, in]` dense, `[out, in, 4, 4]` convolution over
    /// inputs of shape `conv`), PyTorch's default initialization, and under spectral norm the
    /// PyTorch names and unit `u ~ N(0, I)`, `v ~ N(0, I)` normalized.
    fn new(
        store: &mut ParamStore,
        name: String,
        shape: &[usize],
        conv: Option<(usize, usize, usize)>,
        spectral_norm: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let wname = if spectral_norm {
            format!("{name}.weight_orig")
        } else {
            format!("{name}.weight")
        };
        let weight = store.uniform(wname, shape, bound, rng)?;
        let bias = store.uniform(format!("{name}.bias"), &shape[..1], bound, rng)?;
        let uv = if spectral_norm {
            let device = store.device().clone();
            let u = unit(crate::rng::normal_vec(rng, shape[0]), &device)?;
            let v = unit(crate::rng::normal_vec(rng, fan_in), &device)?;
            Some((u, v))
        } else {
            None
        };
        Ok(DiscLayer {
            name,
            weight,
            bias,
            uv,
            conv,
        })
    }

    /// The pre-activation `a = W h + b` for flattened inputs `h: (B, in)`, with the effective
    /// weight `w`; flattened output.
    fn affine(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(match self.conv {
            None => h.matmul(&w.t()?)?.broadcast_add(&self.bias)?,
            Some(shape) => self.conv(shape, h, w, Activation::Identity)?,
        })
    }

    /// `act(conv(h) + b)` of a convolutional layer (4x4, stride 2, padding 1) whose input is
    /// `(c, hh, ww)`, for flattened inputs `h: (B, c hh ww)` and the effective weight `w`;
    /// flattened output.
    fn conv(
        &self,
        (c, hh, ww): (usize, usize, usize),
        h: &Tensor,
        w: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        let x = h.reshape((h.dim(0)?, c, hh, ww))?;
        Ok(conv2d_act(&x, w, Some(&self.bias), 2, 1, act)?.flatten_from(1)?)
    }

    /// A hidden layer's output `lrelu(a)`, slope 0.2, for flattened inputs `h: (B, in)` and the
    /// effective weight `w`: one fused op for a dense layer ([`linear`]), the convolution then
    /// the activation for a convolutional one.
    fn hidden(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.conv {
            None => Ok(linear(
                &h.contiguous()?,
                &w.contiguous()?,
                &self.bias,
                Activation::LeakyRelu,
            )?),
            Some(shape) => self.conv(shape, h, w, Activation::LeakyRelu),
        }
    }

    /// `g W`: the gradient with respect to the layer's input of `sum(g * a)` (the transpose of
    /// the linear map), flattened.
    fn transpose_apply(&self, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(match self.conv {
            None => g.matmul(w)?,
            Some((_, hh, ww)) => {
                let b = g.dim(0)?;
                let out_c = w.dim(0)?;
                conv_transpose2d(&g.reshape((b, out_c, hh / 2, ww / 2))?, w, None, 2, 1)?
                    .flatten_from(1)?
            }
        })
    }
}

/// A 4x4 transposed convolution with stride 2 and padding 1 (doubles height and width).
#[derive(Debug, Clone)]
struct UpConv {
    weight: Tensor,
    bias: Tensor,
}

impl UpConv {
    fn new(
        store: &mut ParamStore,
        name: &str,
        c_in: usize,
        c_out: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        // PyTorch's ConvTranspose2d init: fan_in = weight.size(1) * k * k = c_out * 16.
        let bound = 1.0 / ((c_out * 16) as f32).sqrt();
        Ok(UpConv {
            weight: store.uniform(format!("{name}.weight"), &[c_in, c_out, 4, 4], bound, rng)?,
            bias: store.uniform(format!("{name}.bias"), &[c_out], bound, rng)?,
        })
    }

    /// `act(.)` of `(B, C_in, H, W) -> (B, C_out, 2H, 2W)`.
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        Ok(conv_transpose2d_act(
            x,
            &self.weight,
            Some(&self.bias),
            2,
            1,
            act,
        )?)
    }
}

/// The generator network.
#[derive(Debug, Clone)]
enum Generator {
    Mlp {
        trunk: Trunk,
        out: Dense,
    },
    Dcgan {
        fc: Dense,
        /// `(C2, H/4, W/4)` after the dense layer.
        seed_shape: (usize, usize, usize),
        up1: UpConv,
        up2: UpConv,
    },
}

/// Generator and discriminator.
#[derive(Debug, Clone)]
pub struct Gan {
    /// Generator parameters (`gen.*`).
    pub gen_store: ParamStore,
    /// Discriminator parameters (`disc.*`).
    pub disc_store: ParamStore,
    generator: Generator,
    disc: Vec<DiscLayer>,
    /// Conditional GANs: classes of the one-hot label (0: unconditional).
    pub classes: usize,
    /// Class embedding `(classes, H)` of the projection discriminator (`disc.embed.weight`).
    embed: Option<Tensor>,
    /// Squash generator outputs into `[0, 1]` (images).
    sigmoid_output: bool,
    /// Values per data row.
    pub dim: usize,
    cfg: GanConfig,
}

impl Gan {
    /// Both players with PyTorch's default initialization, for rows of `dim` values; `image`
    /// (the `(C, H, W)` of images) selects the sigmoid output and allows the DCGAN
    /// architecture.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config, no values per row, or a DCGAN on data that are
    /// not images of a height and width divisible by 4.
    pub fn new(
        cfg: &GanConfig,
        dim: usize,
        image: Option<(usize, usize, usize)>,
        classes: usize,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        let g_in = cfg.latent + classes;
        if dim == 0 {
            return Err(Error::Config(
                "a GAN needs at least one value per row".into(),
            ));
        }
        let mut gen_store = ParamStore::new(device.clone());
        let mut disc_store = ParamStore::new(device.clone());
        let mut stores = (&mut gen_store, &mut disc_store);
        let (generator, disc) = match cfg.architecture {
            GanArchitecture::Mlp => mlp_players(cfg, g_in, dim, &mut stores, rng)?,
            GanArchitecture::Dcgan => {
                let shape = dcgan_image(dim, image)?;
                dcgan_players(cfg, g_in, shape, &mut stores, rng)?
            }
        };
        let embed = if classes > 0 {
            let last = disc.last().expect("at least the output layer");
            let h = last.weight.dim(1)?;
            let bound = 1.0 / (h as f32).sqrt();
            Some(disc_store.uniform("disc.embed.weight".into(), &[classes, h], bound, rng)?)
        } else {
            None
        };
        Ok(Gan {
            gen_store,
            disc_store,
            generator,
            disc,
            classes,
            embed,
            sigmoid_output: image.is_some(),
            dim,
            cfg: cfg.clone(),
        })
    }

    /// The settings the players were built with and the losses use.
    pub fn config(&self) -> &GanConfig {
        &self.cfg
    }

    /// Replaces the settings that may change on resume (the loss and the penalties:
    /// [`crate::config::is_structural`] says which), so that a resumed run trains with the
    /// settings it records.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first structural field (the architecture) in which `cfg`
    /// differs, which a resume refuses before it gets here.
    pub fn set_tunables(&mut self, cfg: &GanConfig) -> Result<()> {
        let fields =
            |c: &GanConfig| serde_json::to_value(c).map_err(|e| Error::Config(e.to_string()));
        let (old, new) = (fields(&self.cfg)?, fields(cfg)?);
        if let (Some(old), Some(new)) = (old.as_object(), new.as_object()) {
            for (key, value) in new {
                let path = format!("model.gan.{key}");
                if old.get(key) != Some(value) && crate::config::is_structural(&path) {
                    return Err(Error::Config(format!(
                        "{path} may not change on resume: it fixes the players' parameters"
                    )));
                }
            }
        }
        self.cfg = cfg.clone();
        Ok(())
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        self.gen_store.device()
    }

    /// `G(z)`, rows of `dim` values.
    pub fn generate(&self, z: &Tensor) -> Result<Tensor> {
        let out = match &self.generator {
            Generator::Mlp { trunk, out } => out.forward(&trunk.forward(z)?)?,
            Generator::Dcgan {
                fc,
                seed_shape,
                up1,
                up2,
            } => {
                let b = z.dim(0)?;
                let h = fc
                    .forward(z)?
                    .reshape((b, seed_shape.0, seed_shape.1, seed_shape.2))?;
                let h = up1.forward(&h, Activation::Relu)?;
                up2.forward(&h, Activation::Identity)?
                    .reshape((b, self.dim))?
            }
        };
        Ok(if self.sigmoid_output {
            candle_nn::ops::sigmoid(&out)?
        } else {
            out
        })
    }

    /// Standard-normal noise `(n, latent)` from `rng`.
    pub fn noise(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            crate::rng::normal_vec(rng, n * self.cfg.latent),
            (n, self.cfg.latent),
            self.device(),
        )?)
    }

    /// `n` samples `G(z)` with noise from `rng`.
    pub fn sample(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let z = self.noise(n, rng)?;
        if self.classes == 0 {
            return self.generate(&z);
        }
        let labels: Vec<u32> = (0..n).map(|i| (i % self.classes) as u32).collect();
        let y = crate::data::one_hot(&labels, self.classes, self.device())?;
        self.generate(&Tensor::cat(&[&z, &y], 1)?)
    }

    /// Runs `sn_iterations` power-iteration steps on every spectrally normalized layer and
    /// stores the new `u`, `v` (once per discriminator update, as PyTorch does per training
    /// forward).
    pub fn update_spectral_vectors(&mut self) -> Result<()> {
        let iters = self.cfg.sn_iterations;
        for l in &mut self.disc {
            if let Some((u, _)) = &l.uv {
                let (u, v) = spectral_norm::power_iteration(&l.weight, u, iters)?;
                l.uv = Some((u, v));
            }
        }
        Ok(())
    }

    /// The weights the discriminator uses: `W / sigma(W)` under spectral norm, else `W`.
    pub fn effective_weights(&self) -> Result<Vec<Tensor>> {
        self.disc
            .iter()
            .map(|l| match &l.uv {
                Some((u, v)) => Ok(spectral_norm::normalized(&l.weight, u, v)?),
                None => Ok(l.weight.clone()),
            })
            .collect()
    }

    /// Splits conditional rows `[x, one-hot y]` (`y` is `None` for an unconditional GAN).
    fn split<'a>(&self, xy: &'a Tensor) -> Result<(std::borrow::Cow<'a, Tensor>, Option<Tensor>)> {
        if self.classes == 0 {
            return Ok((std::borrow::Cow::Borrowed(xy), None));
        }
        let width = xy.dim(1)?;
        if width != self.dim + self.classes {
            return Err(Error::Data(format!(
                "a conditional GAN takes rows of {} values and {} label columns, got {width}",
                self.dim, self.classes
            )));
        }
        Ok((
            std::borrow::Cow::Owned(xy.narrow(1, 0, self.dim)?),
            Some(xy.narrow(1, self.dim, self.classes)?),
        ))
    }

    /// Runs the discriminator on `x`; returns `D`, shape `(B)`, the LeakyReLU slopes of every
    /// hidden layer (constants of the graph) and the last hidden features `phi`. With labels,
    /// `D = w_out phi + b + <E^T y, phi>` (the projection discriminator of Miyato & Koyama
    /// 2018).
    fn run_discriminator(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        ws: &[Tensor],
        want_slopes: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let last = ws.len() - 1;
        let mut h = x.clone();
        let mut slopes = Vec::with_capacity(if want_slopes { last } else { 0 });
        for (w, l) in ws[..last].iter().zip(&self.disc) {
            h = l.hidden(&h, w)?;
            if want_slopes {
                // lrelu'(a): 1 where a > 0, else 0.2 (h = lrelu(a) has the sign of a).
                let positive = h.detach().gt(0f32)?.to_dtype(DType::F32)?;
                slopes.push(((positive * (1.0 - LEAKY_SLOPE as f64))? + LEAKY_SLOPE as f64)?);
            }
        }
        let mut d = self.disc[last].affine(&h, &ws[last])?.squeeze(D::Minus1)?;
        if let (Some(y), Some(e)) = (y, &self.embed) {
            d = (d + (y.matmul(e)? * &h)?.sum(D::Minus1)?)?;
        }
        Ok((d, slopes))
    }

    /// `D(x)` (for a conditional GAN `D(x, y)` of rows `[x, one-hot y]`), shape `(B)`.
    pub fn discriminate(&self, xy: &Tensor) -> Result<Tensor> {
        self.discriminate_with(xy, &self.effective_weights()?)
    }

    /// [`Gan::discriminate`] with the effective weights already computed.
    pub fn discriminate_with(&self, xy: &Tensor, ws: &[Tensor]) -> Result<Tensor> {
        let (x, y) = self.split(xy)?;
        Ok(self.run_discriminator(&x, y.as_ref(), ws, false)?.0)
    }

    /// `(D(x), grad_x D(x))` (the gradient with respect to the image part of conditional rows),
    /// the gradient built as a forward graph (see the module docs) so that losses of it can be
    /// differentiated with respect to the discriminator's weights.
    pub fn input_gradient(&self, xy: &Tensor) -> Result<(Tensor, Tensor)> {
        self.input_gradient_with(xy, &self.effective_weights()?)
    }

    /// [`Gan::input_gradient`] with the effective weights already computed.
    pub fn input_gradient_with(&self, xy: &Tensor, ws: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let (x, y) = self.split(xy)?;
        let (d, slopes) = self.run_discriminator(&x, y.as_ref(), ws, true)?;
        let last = ws.len() - 1;
        let b = x.dim(0)?;
        // dD/dphi = w_out (+ E^T y with labels) for every row.
        let mut g = ws[last].broadcast_as((b, ws[last].dim(1)?))?.contiguous()?;
        if let (Some(y), Some(e)) = (&y, &self.embed) {
            g = (g + y.matmul(e)?)?;
        }
        for l in (0..last).rev() {
            g = self.disc[l].transpose_apply(&(g * &slopes[l])?, &ws[l])?;
        }
        Ok((d, g))
    }

    /// The spectral-normalization buffers under their PyTorch names.
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for l in &self.disc {
            if let Some((u, v)) = &l.uv {
                out.push((format!("{}.weight_u", l.name), u.clone()));
                out.push((format!("{}.weight_v", l.name), v.clone()));
            }
        }
        out
    }

    /// Replaces the buffers with the tensors of the same names.
    pub fn load_buffers(
        &mut self,
        mut lookup: impl FnMut(&str, &[usize]) -> std::result::Result<Tensor, String>,
    ) -> std::result::Result<(), String> {
        for l in &mut self.disc {
            if let Some((u, v)) = &l.uv {
                let nu = lookup(&format!("{}.weight_u", l.name), u.dims())?;
                let nv = lookup(&format!("{}.weight_v", l.name), v.dims())?;
                l.uv = Some((nu, nv));
            }
        }
        Ok(())
    }
}

/// The generator's and the discriminator's parameter stores, in that order.
type Stores<'a> = (&'a mut ParamStore, &'a mut ParamStore);

/// MLP players: a ReLU generator `g_in -> gen_hidden.. -> dim` and a discriminator
/// `dim -> disc_hidden.. -> 1` (spectrally normalized when the config asks).
fn mlp_players(
    cfg: &GanConfig,
    g_in: usize,
    dim: usize,
    (gen_store, disc_store): &mut Stores,
    rng: &mut ChaCha8Rng,
) -> Result<(Generator, Vec<DiscLayer>)> {
    let trunk = Trunk::new(
        gen_store,
        "gen",
        g_in,
        &cfg.gen_hidden,
        Activation::Relu,
        rng,
    )?;
    let out = Dense::new(
        gen_store,
        &format!("gen.net.{}", 2 * cfg.gen_hidden.len()),
        trunk.out_dim,
        dim,
        Activation::Identity,
        rng,
    )?;
    let mut disc = Vec::new();
    let mut d_in = dim;
    let widths: Vec<usize> = cfg.disc_hidden.iter().copied().chain([1]).collect();
    for (i, &w) in widths.iter().enumerate() {
        disc.push(DiscLayer::new(
            disc_store,
            format!("disc.net.{}", 2 * i),
            &[w, d_in],
            None,
            cfg.spectral_norm,
            rng,
        )?);
        d_in = w;
    }
    Ok((Generator::Mlp { trunk, out }, disc))
}

/// The `(C, H, W)` of images a DCGAN can take: height and width multiples of 4 (two stride-2
/// convolutions), else a config error saying what the data is.
fn dcgan_image(dim: usize, image: Option<(usize, usize, usize)>) -> Result<(usize, usize, usize)> {
    match image {
        Some((c, h, w)) if h % 4 == 0 && w % 4 == 0 && c * h * w == dim => Ok((c, h, w)),
        _ => {
            let text = |c: usize, h: usize, w: usize| {
                if c == 1 {
                    format!("{h}x{w} images")
                } else {
                    format!("{c}x{h}x{w} images")
                }
            };
            let got = match image {
                Some((c, h, w)) if c * h * w == dim => text(c, h, w),
                Some((c, h, w)) => format!("{} stored as {dim} values per row", text(c, h, w)),
                None => format!("rows of {dim} values that are not images"),
            };
            Err(Error::Config(format!(
                "model.gan.architecture = \"dcgan\" needs images whose height and width are multiples of 4; this data has {got} (use model.gan.architecture = \"mlp\")"
            )))
        }
    }
}

/// DCGAN players for `(c, h, w)` images: a generator `g_in -> (c2, h/4, w/4) -> (c1, h/2,
/// w/2) -> (c, h, w)` (dense seed, two transposed convolutions) and a discriminator of two
/// strided 4x4 convolutions (the first takes `c` channels) and a dense output.
fn dcgan_players(
    cfg: &GanConfig,
    g_in: usize,
    (c, h, w): (usize, usize, usize),
    (gen_store, disc_store): &mut Stores,
    rng: &mut ChaCha8Rng,
) -> Result<(Generator, Vec<DiscLayer>)> {
    let [c1, c2] = cfg.conv_channels;
    let seed_shape = (c2, h / 4, w / 4);
    let fc = Dense::new(
        gen_store,
        "gen.net.0",
        g_in,
        c2 * (h / 4) * (w / 4),
        Activation::Relu,
        rng,
    )?;
    let up1 = UpConv::new(gen_store, "gen.net.3", c2, c1, rng)?;
    let up2 = UpConv::new(gen_store, "gen.net.5", c1, c, rng)?;
    let mut disc = Vec::new();
    for (name, shape, input) in [
        ("disc.net.0", [c1, c, 4, 4], (c, h, w)),
        ("disc.net.2", [c2, c1, 4, 4], (c1, h / 2, w / 2)),
    ] {
        disc.push(DiscLayer::new(
            disc_store,
            name.to_string(),
            &shape,
            Some(input),
            cfg.spectral_norm,
            rng,
        )?);
    }
    disc.push(DiscLayer::new(
        disc_store,
        "disc.net.5".to_string(),
        &[1, c2 * (h / 4) * (w / 4)],
        None,
        cfg.spectral_norm,
        rng,
    )?);
    let generator = Generator::Dcgan {
        fc,
        seed_shape,
        up1,
        up2,
    };
    Ok((generator, disc))
}

fn unit(v: Vec<f32>, device: &Device) -> Result<Tensor> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    let n = v.len();
    Ok(Tensor::from_vec(
        v.into_iter().map(|x| x / norm).collect::<Vec<_>>(),
        n,
        device,
    )?)
}
