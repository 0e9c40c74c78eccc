//! `[objective]`: the bound a VAE maximizes (flows maximize the exact likelihood and GANs play
//! their own losses, `model.gan.loss`; neither reads this section).

use serde::{Deserialize, Serialize};

/// The bound that is maximized (`objective.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// ELBO averaged over `k` samples.
    #[default]
    Elbo,
    /// Importance-weighted bound with `k` samples.
    Iwae,
}

/// How the KL term of the ELBO is computed (`objective.kl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// Closed form (one stochastic layer only).
    #[default]
    Analytic,
    /// `log q(z|x) - log p(z)` at the sampled z.
    MonteCarlo,
}

/// Objective settings of the VAE family (`[objective]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// The bound: `elbo` or `iwae` ([`ObjectiveKind`]). Default: `elbo`.
    pub kind: ObjectiveKind,
    /// Latent samples per data point in training (the `k` of the bound). Default: 1.
    pub k: usize,
    /// The KL estimator of the ELBO: `analytic` or `monte_carlo` ([`KlEstimator`]). Default:
    /// `analytic`.
    pub kl: KlEstimator,
    /// Weight of the KL term (beta-VAE), dimensionless; 1 is the ELBO. Default: 1.
    pub beta: f64,
    /// Epochs (fractional allowed) over which the KL weight rises linearly from 0 to `beta`
    /// (0: no warm-up). Default: 0.
    pub warmup_epochs: f64,
    /// Free bits (Kingma et al. 2016): the least KL counted per latent dimension, in nats
    /// (0: off; needs `kind = "elbo"` with `kl = "analytic"`). Default: 0.
    pub free_bits: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            kind: ObjectiveKind::Elbo,
            k: 1,
            kl: KlEstimator::Analytic,
            beta: 1.0,
            warmup_epochs: 0.0,
            free_bits: 0.0,
        }
    }
}
