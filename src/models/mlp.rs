//! Multi-layer perceptron blocks of the VAE family: an `nn.Sequential` trunk of
//! `Linear, activation` pairs (`net.0`, `net.2`, ...) and output heads.

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;

use super::params::ParamStore;
use crate::config::Activation;
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
        let bound = 1.0 / (d_in as f32).sqrt();
        let weight = store.uniform(format!("{prefix}.weight"), &[d_out, d_in], bound, rng)?;
        let bias = store.uniform(format!("{prefix}.bias"), &[d_out], bound, rng)?;
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
    /// Builds `prefix.net.{0,2,4,..}` for the widths `hidden`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        act: Activation,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(hidden.len());
        let mut d = d_in;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Dense::new(
                store,
                &format!("{prefix}.net.{}", 2 * i),
                d,
                h,
                act,
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

/// A linear output head `{prefix}.{name}`: `d_in -> d_out`, no activation.
fn linear_head(
    store: &mut ParamStore,
    prefix: &str,
    name: &str,
    d_in: usize,
    d_out: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Dense> {
    Dense::new(
        store,
        &format!("{prefix}.{name}"),
        d_in,
        d_out,
        Activation::Identity,
        rng,
    )
}

/// An MLP with diagonal-Gaussian output heads `mu` and `logvar`.
#[derive(Debug, Clone)]
pub struct GaussianHead {
    trunk: Trunk,
    mu: Dense,
    logvar: Dense,
}

impl GaussianHead {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        d_out: usize,
        act: Activation,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let trunk = Trunk::new(store, prefix, d_in, hidden, act, rng)?;
        let mu = linear_head(store, prefix, "mu", trunk.out_dim, d_out, rng)?;
        let logvar = linear_head(store, prefix, "logvar", trunk.out_dim, d_out, rng)?;
        Ok(GaussianHead { trunk, mu, logvar })
    }

    /// `(mu, logvar)` of the Gaussian given the input.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.trunk.forward(x)?;
        let logvar = self
            .logvar
            .forward(&h)?
            .clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)?;
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
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        d_in: usize,
        hidden: &[usize],
        d_out: usize,
        act: Activation,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let trunk = Trunk::new(store, prefix, d_in, hidden, act, rng)?;
        let out = linear_head(store, prefix, "out", trunk.out_dim, d_out, rng)?;
        Ok(BernoulliHead { trunk, out })
    }

    /// Bernoulli logits given the input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.trunk.forward(x)?)
    }
}
