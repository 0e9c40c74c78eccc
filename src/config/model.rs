//! `[model]`: the model family and its architecture, with the checks and parameter counts that
//! are arithmetic on these values alone (no model code).
//!
//! Every field under `model.` is structural (it fixes the parameters and their meaning) except
//! `model.gan.loss`, `model.gan.n_critic`, `model.gan.gp_weight` and `model.gan.sn_iterations`
//! (see [`super::is_structural`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::diffusion::DiffusionConfig;
use crate::error::{Error, Result};

/// The model family of `model.family`, spelled `vae`, `flow`, `gan` or `diffusion` in config files, in
/// `--set model.family=...`, in checkpoint metadata (`model_family`) and in the config JSON that
/// checkpoints carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ModelFamily {
    /// Variational autoencoder (the VAE and the IWAE: same model, different bound,
    /// [`super::ObjectiveKind`]).
    #[default]
    Vae,
    /// RealNVP-style normalizing flow ([`FlowConfig`]).
    Flow,
    /// Generative adversarial network ([`GanConfig`]).
    Gan,
    /// Denoising diffusion model ([`DiffusionConfig`]).
    Diffusion,
}

impl ModelFamily {
    /// Every family, in the order error messages list them.
    pub const ALL: [ModelFamily; 4] = [
        ModelFamily::Vae,
        ModelFamily::Flow,
        ModelFamily::Gan,
        ModelFamily::Diffusion,
    ];

    /// The spelling of the family in configs and checkpoints: `vae`, `flow`, `gan` or
    /// `diffusion`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Vae => "vae",
            ModelFamily::Flow => "flow",
            ModelFamily::Gan => "gan",
            ModelFamily::Diffusion => "diffusion",
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelFamily {
    type Err = UnknownModelFamily;

    /// Parses the exact lowercase spelling; anything else is refused, naming the accepted values.
    fn from_str(s: &str) -> std::result::Result<Self, UnknownModelFamily> {
        ModelFamily::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownModelFamily(s.to_string()))
    }
}

impl TryFrom<String> for ModelFamily {
    type Error = UnknownModelFamily;

    fn try_from(s: String) -> std::result::Result<Self, UnknownModelFamily> {
        s.parse()
    }
}

/// A `model.family` that is not `vae`, `flow`, `gan` or `diffusion` (the name as given). Its message is one
/// line naming the accepted values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownModelFamily(pub String);

impl fmt::Display for UnknownModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "model.family = {:?}: expected \"vae\", \"flow\", \"gan\" or \"diffusion\"",
            self.0
        )
    }
}

impl std::error::Error for UnknownModelFamily {}

impl From<UnknownModelFamily> for Error {
    fn from(e: UnknownModelFamily) -> Self {
        Error::Config(e.to_string())
    }
}

/// Model family and architecture (`[model]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model family: `vae` (the VAE and the IWAE: same model, different bound), `flow`
    /// (RealNVP, [`Self::flow`]), `gan` ([`Self::gan`]) or `diffusion` ([`Self::diffusion`]).
    /// Default: `vae`.
    pub family: ModelFamily,
    /// Nonlinearity after every hidden layer of the VAE's encoders and decoders: `identity`,
    /// `relu`, `tanh`, `softplus` or `leaky_relu` (slope 0.2). The flow's coupling networks and the GAN's players use
    /// their own fixed nonlinearities. Default: `relu`.
    pub activation: Activation,
    /// The VAE's likelihood of the data given the bottom latent layer: `bernoulli` (binary
    /// data) or `gaussian` (continuous data). Default: `bernoulli`.
    pub decoder: DecoderKind,
    /// The VAE's stochastic layers, bottom (next to x) first (`[[model.layers]]`). Default: one
    /// layer, `hidden = [400]`, `latent = 20` (the PyTorch examples VAE).
    pub layers: Vec<LayerConfig>,
    /// Conditional models: classes of the one-hot label (0: unconditional). A VAE feeds it to
    /// the bottom encoder and to the likelihood; a GAN to the generator's input and to a
    /// projection discriminator. Flows are unconditional. Default: 0.
    pub classes: usize,
    /// The flow's architecture (`[model.flow]`, used when `family = "flow"`). Default: see
    /// [`FlowConfig`].
    pub flow: FlowConfig,
    /// The GAN's architecture and losses (`[model.gan]`, used when `family = "gan"`). Default:
    /// see [`GanConfig`].
    pub gan: GanConfig,
    /// The diffusion model's process, denoiser and sampler (`[model.diffusion]`, used when
    /// `family = "diffusion"`). Default: see [`DiffusionConfig`].
    pub diffusion: DiffusionConfig,
    /// The VAE's weight initialization: `pytorch` or `glorot_uniform` ([`WeightInit`]).
    /// Default: `pytorch`.
    pub init: WeightInit,
    /// The VAE's initial bias of the likelihood's mean output: `default` (as `init` draws it) or
    /// `data_mean` ([`OutputBias`]). Default: `default`.
    pub output_bias: OutputBias,
    /// How the VAE's Gaussian heads give the scale: `logvar` or `log_sigma`
    /// ([`GaussianScale`]). Default: `logvar`.
    pub gaussian_head: GaussianScale,
}

/// Initialization of the VAE's affine layers (`model.init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightInit {
    /// PyTorch's `nn.Linear.reset_parameters`: weight and bias from
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    #[default]
    Pytorch,
    /// Glorot & Bengio 2010 ("Understanding the difficulty of training deep feedforward neural
    /// networks", eq. 16): weight from `U(-sqrt(6 / (fan_in + fan_out)), +sqrt(..))`, bias zero.
    /// What the IWAE paper's released code (yburda/iwae, `nnet.Linear.random`) uses.
    GlorotUniform,
}

/// The initial bias of the VAE likelihood's mean output (`model.output_bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputBias {
    /// As `model.init` draws it.
    #[default]
    Default,
    /// From the training rows' mean `m_d` (after binarization scaling, the labels left out):
    /// a Bernoulli decoder's logit bias is `logit(clamp(m_d, 0.001, 0.999))`, as in the IWAE
    /// paper's released code (`get_train_bias_np`), so the untrained decoder already gives the
    /// data's marginal pixel probabilities; a Gaussian decoder's `mu` bias is `m_d`.
    DataMean,
}

/// Parameterization of the scale of the VAE's diagonal-Gaussian heads (`model.gaussian_head`).
/// Either way the model computes with `logvar`; only the head's output and its checkpoint name
/// differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GaussianScale {
    /// A linear head `logvar` gives `log sigma^2` (PyTorch examples, Kingma & Welling 2014).
    #[default]
    Logvar,
    /// A linear head `log_sigma` gives `log sigma`, so `sigma = exp(affine)` and
    /// `logvar = 2 log_sigma`, as in the IWAE paper's released code (`GaussianSampler`, an
    /// `Exponential` after a `Linear`). Its gradient with respect to the head is twice the
    /// `logvar` one's, which changes the optimizer's steps.
    LogSigma,
}

impl GaussianScale {
    /// The head's name in the parameter tree (`encoders.0.logvar.weight` or
    /// `encoders.0.log_sigma.weight`).
    pub fn head_name(self) -> &'static str {
        match self {
            GaussianScale::Logvar => "logvar",
            GaussianScale::LogSigma => "log_sigma",
        }
    }
}

/// One stochastic layer of a VAE (`[[model.layers]]`): the deterministic hidden widths below it
/// and its latent size. Both fields are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    /// Widths (units) of the deterministic hidden layers of the encoder below this layer,
    /// bottom first; the decoder mirrors them. No default (required); `[400]` in the default
    /// model.
    pub hidden: Vec<usize>,
    /// Dimensions of this layer's latent variable. No default (required); 20 in the default
    /// model.
    pub latent: usize,
}

/// Likelihood of the data given the bottom latent layer (`model.decoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// Bernoulli with logits (binary data).
    #[default]
    Bernoulli,
    /// Diagonal Gaussian with learned mean and log-variance (continuous data).
    Gaussian,
}

/// Elementwise nonlinearity applied after an affine map (`model.activation`; the fused kernels
/// of `ops::linear` apply it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// No nonlinearity.
    Identity,
    /// `max(a, 0)`.
    #[default]
    Relu,
    /// `tanh(a)`.
    Tanh,
    /// `ln(1 + e^a)`.
    Softplus,
    /// `max(a, 0.2 a)` (the slope of the DCGAN and SN-GAN discriminators), spelled
    /// `leaky_relu`.
    #[serde(rename = "leaky_relu")]
    LeakyRelu,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            family: ModelFamily::Vae,
            activation: Activation::Relu,
            decoder: DecoderKind::Bernoulli,
            layers: vec![LayerConfig {
                hidden: vec![400],
                latent: 20,
            }],
            classes: 0,
            flow: Default::default(),
            gan: Default::default(),
            diffusion: Default::default(),
            init: WeightInit::Pytorch,
            output_bias: OutputBias::Default,
            gaussian_head: GaussianScale::Logvar,
        }
    }
}

impl ModelConfig {
    /// Parameters of the model of `self.family` on rows of `input_dim` values (`None` on
    /// overflow), computed without allocating, so a checkpoint's config can be checked against
    /// its file before a model is built from it.
    pub fn parameter_count(&self, input_dim: usize) -> Option<usize> {
        match self.family {
            ModelFamily::Vae => self.vae_parameter_count(input_dim),
            ModelFamily::Flow => self.flow.parameter_count(input_dim),
            ModelFamily::Gan => self.gan.parameter_count(input_dim, self.classes),
            ModelFamily::Diffusion => self.diffusion.parameter_count(input_dim),
        }
    }

    /// The number of parameters `Vae::new(cfg, input_dim, ..)` creates (`None` on overflow).
    pub fn vae_parameter_count(&self, input_dim: usize) -> Option<usize> {
        // An MLP d_in -> hidden.. -> heads x d_out: every Linear has (d_in + 1) * d_out parameters.
        fn mlp(d_in: usize, hidden: &[usize], d_out: usize, heads: usize) -> Option<usize> {
            let mut total = 0usize;
            let mut d = d_in;
            for &h in hidden {
                total = total.checked_add(d.checked_add(1)?.checked_mul(h)?)?;
                d = h;
            }
            total.checked_add(d.checked_add(1)?.checked_mul(d_out)?.checked_mul(heads)?)
        }
        let mut dims = vec![input_dim];
        dims.extend(self.layers.iter().map(|l| l.latent));
        let mut total = 0usize;
        for (l, layer) in self.layers.iter().enumerate() {
            let extra = if l == 0 { self.classes } else { 0 };
            total = total.checked_add(mlp(
                dims[l].checked_add(extra)?,
                &layer.hidden,
                dims[l + 1],
                2,
            )?)?;
            let rev: Vec<usize> = layer.hidden.iter().rev().copied().collect();
            let heads = if l == 0 && self.decoder == DecoderKind::Bernoulli {
                1
            } else {
                2
            };
            total =
                total.checked_add(mlp(dims[l + 1].checked_add(extra)?, &rev, dims[l], heads)?)?;
        }
        Some(total)
    }
}

/// Architecture of a RealNVP-style flow (`[model.flow]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// Affine coupling layers (each preceded by an ActNorm when `actnorm` is on). Default: 8.
    pub coupling_layers: usize,
    /// Hidden widths (units) of every coupling network (ReLU). Default: `[512, 512]`.
    pub hidden: Vec<usize>,
    /// ActNorm before every coupling. Default: `true`.
    pub actnorm: bool,
    /// Logit-transform margin for images, a fraction of the unit interval in `[0, 0.5)`
    /// (MAF's MNIST setting; RealNVP used 0.05 on natural images). Unused on 2-D data.
    /// Default: `1e-6`.
    pub alpha: f64,
    /// The coupling masks ([`FlowMasks`]): `checkerboard` or `channel`. Default:
    /// `checkerboard`.
    pub masks: FlowMasks,
}

/// Which values a coupling layer passes through (`model.flow.masks`), RealNVP's two masks
/// (Dinh et al. 2017, section 3.3 and figure 3), alternating from layer to layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlowMasks {
    /// Layer `l` passes value `(c, y, x)` through when `(c H + y + x + l)` is odd: a
    /// checkerboard over the image (on 2-D points, the two coordinates in turn).
    #[default]
    Checkerboard,
    /// Layer `l` passes channel `c` through when `(c + l)` is odd: channel-wise masking, for
    /// images of at least 2 channels (colour images).
    Channel,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            coupling_layers: 8,
            hidden: vec![512, 512],
            actnorm: true,
            alpha: 1e-6,
            masks: FlowMasks::Checkerboard,
        }
    }
}

impl FlowConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.coupling_layers == 0 {
            return Err(Error::Config(
                "model.flow.coupling_layers must be at least 1".into(),
            ));
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(Error::Config(
                "model.flow.hidden: at least one hidden layer, every width positive".into(),
            ));
        }
        if !(self.alpha >= 0.0 && self.alpha < 0.5) {
            return Err(Error::Config(format!(
                "model.flow.alpha = {}: must be in [0, 0.5)",
                self.alpha
            )));
        }
        Ok(())
    }

    /// Parameters of a flow on `dim` values (`None` on overflow), without allocating.
    pub fn parameter_count(&self, dim: usize) -> Option<usize> {
        let mut per_layer = 0usize;
        let mut d = dim;
        for &h in &self.hidden {
            per_layer = per_layer.checked_add(d.checked_add(1)?.checked_mul(h)?)?;
            d = h;
        }
        per_layer = per_layer.checked_add(d.checked_add(1)?.checked_mul(dim.checked_mul(2)?)?)?;
        per_layer = per_layer.checked_add(dim)?; // scale c
        if self.actnorm {
            per_layer = per_layer.checked_add(dim.checked_mul(2)?)?;
        }
        per_layer.checked_mul(self.coupling_layers)
    }
}

/// The adversarial objective (`model.gan.loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GanLoss {
    /// Non-saturating (the `-log D(G(z))` generator loss).
    #[default]
    NonSaturating,
    /// Hinge.
    Hinge,
    /// Wasserstein with gradient penalty.
    WganGp,
    /// The original minimax game (Goodfellow et al. 2014, eq. 1): D as for `non_saturating`, G
    /// minimizes `log(1 - D(G(z)))`, whose gradient vanishes while D rejects the fakes (kept for
    /// the comparison; `non_saturating` is the fix the same paper proposes).
    Minimax,
}

/// An extra penalty on the discriminator (`model.gan.penalty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GanPenalty {
    /// None beyond what the loss has (`wgan_gp` always has its gradient penalty).
    #[default]
    None,
    /// The gradient penalty `gp_weight (||grad_x D(x_hat)|| - 1)^2` at interpolates of real
    /// and generated rows (Gulrajani et al. 2017), with any loss (Kurach et al. 2019).
    Gp,
    /// The zero-centred penalty on real data `r1_gamma / 2 ||grad_x D(x)||^2` (Mescheder et
    /// al. 2018, eq. 9), `D` being the logit.
    R1,
}

/// The players' architecture (`model.gan.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GanArchitecture {
    /// MLPs (`gen_hidden`, `disc_hidden`); any data.
    #[default]
    Mlp,
    /// DCGAN-style (Radford et al. 2016) for one-channel images whose sides are multiples of 4:
    /// generator `z -> Linear -> (C2, H/4, W/4) -> ConvT 4x4/2 -> (C1, H/2, W/2) -> ConvT 4x4/2
    /// -> sigmoid`, discriminator `Conv 4x4/2 -> (C1, H/2, W/2) -> Conv 4x4/2 -> (C2, H/4, W/4)
    /// -> Linear` with `[C1, C2] = conv_channels`.
    Dcgan,
}

/// A GAN's architecture and training settings (`[model.gan]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GanConfig {
    /// Dimensions of the generator's noise `z ~ N(0, I)`. Default: 64.
    pub latent: usize,
    /// Players: `mlp` or `dcgan` ([`GanArchitecture`]). Default: `mlp`.
    pub architecture: GanArchitecture,
    /// Channels `[C1, C2]` of the DCGAN layers (`architecture = "dcgan"` only). Default:
    /// `[32, 64]`.
    pub conv_channels: [usize; 2],
    /// Generator hidden widths (units, ReLU; `architecture = "mlp"` only). Default:
    /// `[256, 256]`.
    pub gen_hidden: Vec<usize>,
    /// Discriminator hidden widths (units, LeakyReLU 0.2; `architecture = "mlp"` only).
    /// Default: `[256, 256]`.
    pub disc_hidden: Vec<usize>,
    /// The adversarial loss: `non_saturating`, `minimax`, `hinge` or `wgan_gp` ([`GanLoss`]). Tunable on
    /// resume. Default: `non_saturating`.
    pub loss: GanLoss,
    /// Discriminator updates (optimizer steps) per generator update. Tunable on resume.
    /// Default: 1.
    pub n_critic: usize,
    /// Spectral normalization on every discriminator layer. Default: `false`.
    pub spectral_norm: bool,
    /// Power iterations per discriminator update (`spectral_norm = true` only). Tunable on
    /// resume. Default: 1.
    pub sn_iterations: usize,
    /// Gradient-penalty weight `lambda` (`loss = "wgan_gp"` or `penalty = "gp"`),
    /// dimensionless. Tunable on resume. Default: 10.
    pub gp_weight: f64,
    /// An extra discriminator penalty: `none`, `gp` or `r1` ([`GanPenalty`]). Tunable on
    /// resume. Default: `none`.
    pub penalty: GanPenalty,
    /// The R1 weight `gamma` (`penalty = "r1"`), dimensionless. Tunable on resume. Default: 10.
    pub r1_gamma: f64,
}

impl GanConfig {
    /// The penalty the discriminator pays: `wgan_gp` implies `gp`.
    pub fn effective_penalty(&self) -> GanPenalty {
        if self.loss == GanLoss::WganGp {
            GanPenalty::Gp
        } else {
            self.penalty
        }
    }
}

impl Default for GanConfig {
    fn default() -> Self {
        GanConfig {
            latent: 64,
            architecture: GanArchitecture::Mlp,
            conv_channels: [32, 64],
            gen_hidden: vec![256, 256],
            disc_hidden: vec![256, 256],
            loss: GanLoss::NonSaturating,
            n_critic: 1,
            spectral_norm: false,
            sn_iterations: 1,
            gp_weight: 10.0,
            penalty: GanPenalty::None,
            r1_gamma: 10.0,
        }
    }
}

impl GanConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("model.gan.{m}")));
        if self.latent == 0 {
            return bad("latent must be at least 1");
        }
        if self.conv_channels.contains(&0) {
            return bad("conv_channels must be positive");
        }
        if self.gen_hidden.contains(&0) || self.disc_hidden.contains(&0) {
            return bad("gen_hidden / disc_hidden: every width must be positive");
        }
        if self.n_critic == 0 || self.sn_iterations == 0 {
            return bad("n_critic and sn_iterations must be at least 1");
        }
        if !(self.gp_weight.is_finite() && self.gp_weight >= 0.0) {
            return bad("gp_weight must be finite and >= 0");
        }
        if !(self.r1_gamma.is_finite() && self.r1_gamma >= 0.0) {
            return bad("r1_gamma must be finite and >= 0");
        }
        if self.loss == GanLoss::WganGp && self.penalty == GanPenalty::R1 {
            return bad("penalty = \"r1\" with loss = \"wgan_gp\": that loss has its gradient penalty already");
        }
        Ok(())
    }

    /// The DCGAN players' parameters for `c`-channel images of `dim` values.
    fn dcgan_count(&self, g_in: usize, dim: usize, c: usize) -> Option<usize> {
        let [c1, c2] = self.conv_channels;
        // (H/4) (W/4) cells; a 4x4 (transposed) convolution between a and b channels has
        // 16 a b weights and b biases.
        let quarter = dim / (16 * c);
        let conv = |a: usize, b: usize| a.checked_mul(b)?.checked_mul(16)?.checked_add(b);
        let fc_g = (g_in + 1).checked_mul(c2.checked_mul(quarter)?)?;
        let fc_d = c2.checked_mul(quarter)?.checked_add(1)?;
        fc_g.checked_add(conv(c2, c1)?)?
            .checked_add(conv(c1, c)?)?
            .checked_add(conv(c, c1)?)?
            .checked_add(conv(c1, c2)?)?
            .checked_add(fc_d)
    }

    /// Parameters of both players for data of `dim` values (`None` on overflow). A DCGAN is
    /// counted for one-channel images, or when `dim` is divisible by 48 as the smaller count of
    /// one and three channels (its true shape is checked when it is built).
    pub fn parameter_count(&self, dim: usize, classes: usize) -> Option<usize> {
        fn mlp(d_in: usize, hidden: &[usize], d_out: usize) -> Option<usize> {
            let mut total = 0usize;
            let mut d = d_in;
            for &h in hidden.iter().chain(std::iter::once(&d_out)) {
                total = total.checked_add(d.checked_add(1)?.checked_mul(h)?)?;
                d = h;
            }
            Some(total)
        }
        let g_in = self.latent.checked_add(classes)?;
        let players = match self.architecture {
            GanArchitecture::Mlp => {
                mlp(g_in, &self.gen_hidden, dim)?.checked_add(mlp(dim, &self.disc_hidden, 1)?)?
            }
            GanArchitecture::Dcgan => {
                // Grey images, or (when `dim` could be either) the smaller of the grey and the
                // colour count: the checkpoint loader needs a lower bound.
                let grey = self.dcgan_count(g_in, dim, 1)?;
                if dim % 48 == 0 {
                    grey.min(self.dcgan_count(g_in, dim, 3)?)
                } else {
                    grey
                }
            }
        };
        let last_hidden = match self.architecture {
            GanArchitecture::Mlp => self.disc_hidden.last().copied().unwrap_or(dim),
            GanArchitecture::Dcgan => self.conv_channels[1].checked_mul(dim / 16)?,
        };
        players.checked_add(classes.checked_mul(last_hidden)?)
    }
}
