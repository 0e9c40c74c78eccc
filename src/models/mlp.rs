//! Multi-layer perceptron blocks of the VAE family: an `nn.Sequential` trunk of
//! `Linear, activation` pairs (`net.0`, `net.2`, ...) and output heads.

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;

use super::params::ParamStore;
use crate::config::{Activation, GaussianScale, WeightInit};
use crate::error::Result;
use crate::ops::linear::linear;

/// An affine layer (`weight (out, in)`, `bias (out)`) with a fused activation.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Tensor,
    pub act: Activation,
}

impl Dense {
    /// Creates `prefix.weight` and `prefix.bias` with PyTorch's default initialization.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        act: Activation,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        Self::with_init(store, prefix, d_in, d_out, act, WeightInit::Pytorch, rng)
    }

    /// Creates `prefix.weight (d_out, d_in)` and `prefix.bias (d_out)` initialized by `init`
    /// ([`WeightInit`]: PyTorch's `U(+-1/sqrt(d_in))` for both, or Glorot-uniform weights
    /// `U(+-sqrt(6 / (d_in + d_out)))` with a zero bias).
    pub fn with_init(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        act: Activation,
        init: WeightInit,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (weight, bias) = match init {
            WeightInit::Pytorch => {
                let bound = 1.0 / (d_in as f32).sqrt();
                let w = store.uniform(format!("{prefix}.weight"), &[d_out, d_in], bound, rng)?;
                (
                    w,
                    store.uniform(format!("{prefix}.bias"), &[d_out], bound, rng)?,
                )
            }
            WeightInit::GlorotUniform => {
                let bound = (6.0 / (d_in + d_out) as f32).sqrt();
                let w = store.uniform(format!("{prefix}.weight"), &[d_out, d_in], bound, rng)?;
                (w, store.zeros(format!("{prefix}.bias"), &[d_out])?)
            }
        };
        Ok(Dense { weight, bias, act })
    }

    /// `act(x W^T + b)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(linear(x, &self.weight, &self.bias, self.act)?)
    }
}

/// A stack of hidden layers, each followed by the activation.
#[derive(Debug, Clone)]
pub struct Trunk {
    layers: Vec<Dense>,
    pub out_dim: usize,
}

impl Trunk {
    /// Builds `prefix.net.{0,2,4,..}` for the widths `hidden`, with PyTorch's initialization.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        act: Activation,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let spec = BlockSpec {
            act,
            ..BlockSpec::default()
        };
        Self::with_spec(store, prefix, d_in, hidden, spec, rng)
    }

    /// Builds `prefix.net.{0,2,4,..}` for the widths `hidden` with `spec`'s activation and
    /// initialization.
    pub fn with_spec(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        spec: BlockSpec,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(hidden.len());
        let mut d = d_in;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Dense::with_init(
                store,
                &format!("{prefix}.net.{}", 2 * i),
                d,
                h,
                spec.act,
                spec.init,
                rng,
            )?);
            d = h;
        }
        Ok(Trunk { layers, out_dim: d })
    }

    /// Runs the stack.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        Ok(h)
    }
}

/// Bound on `|logvar|` of every Gaussian head: sigma stays in [3e-7, 3.3e6]. Inside it every
/// term of the objective is finite in f32 (`exp(logvar)`, `exp(-logvar)`, `exp(logvar / 2)`);
/// outside it the model has already failed, and the clamp (zero gradient beyond it) keeps one
/// bad batch from turning the parameters into NaN. A trained model's heads stay far inside.
pub const LOGVAR_LIMIT: f64 = 30.0;

/// How an MLP block of the VAE is built (`model.activation`, `model.init`,
/// `model.gaussian_head`).
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockSpec {
    /// Nonlinearity after every hidden layer.
    pub act: Activation,
    /// Initialization of every affine layer.
    pub init: WeightInit,
    /// What a Gaussian head's scale output means.
    pub scale: GaussianScale,
}

/// A linear output head `{prefix}.{name}`: `d_in -> d_out`, no activation.
fn linear_head(
    store: &mut ParamStore,
    prefix: &str,
    name: &str,
    d_in: usize,
    d_out: usize,
    init: WeightInit,
    rng: &mut ChaCha8Rng,
) -> Result<Dense> {
    Dense::with_init(
        store,
        &format!("{prefix}.{name}"),
        d_in,
        d_out,
        Activation::Identity,
        init,
        rng,
    )
}

/// An MLP with diagonal-Gaussian output heads `mu` and a scale head: `logvar`, or `log_sigma`
/// ([`GaussianScale`]).
#[derive(Debug, Clone)]
pub struct GaussianHead {
    trunk: Trunk,
    mu: Dense,
    scale_head: Dense,
    scale: GaussianScale,
}

impl GaussianHead {
    /// Builds `{prefix}.net.*`, `{prefix}.mu` and `{prefix}.logvar` or `{prefix}.log_sigma`
    /// (`d_in -> hidden -> d_out`).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        d_out: usize,
        spec: BlockSpec,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let trunk = Trunk::with_spec(store, prefix, d_in, hidden, spec, rng)?;
        let d = trunk.out_dim;
        let mu = linear_head(store, prefix, "mu", d, d_out, spec.init, rng)?;
        let name = spec.scale.head_name();
        let scale_head = linear_head(store, prefix, name, d, d_out, spec.init, rng)?;
        Ok(GaussianHead {
            trunk,
            mu,
            scale_head,
            scale: spec.scale,
        })
    }

    /// `(mu, logvar)` of the Gaussian given the input, each `(rows, d_out)`; `logvar` is
    /// clamped to `[-LOGVAR_LIMIT, LOGVAR_LIMIT]` (a `log_sigma` head's output is doubled
    /// first).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.trunk.forward(x)?;
        let raw = self.scale_head.forward(&h)?;
        let logvar = match self.scale {
            GaussianScale::Logvar => raw,
            GaussianScale::LogSigma => (raw * 2.0)?,
        };
        let logvar = logvar.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)?;
        Ok((self.mu.forward(&h)?, logvar))
    }
}

/// An MLP with one logits head `out`.
#[derive(Debug, Clone)]
pub struct BernoulliHead {
    trunk: Trunk,
    out: Dense,
}

impl BernoulliHead {
    /// Builds `{prefix}.net.*` and `{prefix}.out` (`d_in -> hidden -> d_out` logits).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        d_out: usize,
        spec: BlockSpec,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let trunk = Trunk::with_spec(store, prefix, d_in, hidden, spec, rng)?;
        let out = linear_head(store, prefix, "out", trunk.out_dim, d_out, spec.init, rng)?;
        Ok(BernoulliHead { trunk, out })
    }

    /// Bernoulli logits given the input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.trunk.forward(x)?)
    }
}
