//! GAN objectives (Goodfellow et al. 2014), functions of a [`Gan`]'s discriminator outputs:
//!
//! - non-saturating: D minimizes `softplus(-D(x)) + softplus(D(G(z)))` (the cross-entropy of
//!   real against generated), G minimizes `softplus(-D(G(z)))` (Goodfellow et al., section 3);
//! - hinge: D minimizes `relu(1 - D(x)) + relu(1 + D(G(z)))`, G minimizes `-D(G(z))` (Lim & Ye
//!   2017; Miyato et al. 2018);
//! - WGAN-GP: D minimizes `D(G(z)) - D(x) + lambda (||grad_x D(x_hat)|| - 1)^2` at random
//!   interpolates `x_hat = t x + (1 - t) G(z)`, G minimizes `-D(G(z))` (Gulrajani et al. 2017,
//!   algorithm 1). The input gradient is the discriminator's forward-graph chain rule
//!   ([`Gan::input_gradient_with`]), so one `backward()` of the penalty gives its exact gradient;
//! - minimax: D as non-saturating, G minimizes `log(1 - sigmoid(D(G(z)))) = -softplus(D(G(z)))`
//!   (Goodfellow et al., eq. 1; saturates while D rejects the fakes).
//!
//! Penalties on D with any loss (`model.gan.penalty`): the same gradient penalty at interpolates
//! (non-saturating + GP and hinge + GP as in Kurach et al. 2019, "A Large-Scale Study of
//! Regularization and Normalization in GANs"), or R1, `gamma / 2 ||grad_x D(x)||^2` at the real
//! rows (Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do actually
//! Converge?", eq. 9), both through the same exact input gradient.
//!
//! All batch terms are means over rows.

use candle_core::{Tensor, D};

use crate::config::{GanLoss, GanPenalty};
use crate::error::Result;
use crate::models::Gan;

/// What one discriminator update optimizes, with the figures it logs (scalars).
pub struct DiscriminatorLoss {
    /// The loss to minimize.
    pub loss: Tensor,
    /// Mean `D(x)` over the real rows.
    pub d_real: Tensor,
    /// Mean `D(G(z))` over the generated rows.
    pub d_fake: Tensor,
    /// The penalty before its weight: `mean (||grad D(x_hat)|| - 1)^2` (GP) or
    /// `mean ||grad D(x)||^2` (R1); `None` without one.
    pub penalty: Option<Tensor>,
}

/// `ln(1 + e^x)`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The discriminator loss of `gan` on real rows `x` and generated rows `fake` (`(B, D)`, already
/// detached from the generator; for a conditional GAN both carry the same one-hot labels, which
/// the penalty's interpolation then leaves unchanged), with the interpolation weights `t:
/// (B, 1)` in `[0, 1]` of the gradient penalty. `W / sigma(W)` is computed once for the real
/// rows, the fakes and the penalty.
pub fn discriminator_loss(
    gan: &Gan,
    x: &Tensor,
    fake: &Tensor,
    t: &Tensor,
) -> Result<DiscriminatorLoss> {
    let cfg = gan.config();
    let ws = gan.effective_weights()?;
    let d_real = gan.discriminate_with(x, &ws)?;
    let d_fake = gan.discriminate_with(fake, &ws)?;
    let loss = match cfg.loss {
        GanLoss::NonSaturating | GanLoss::Minimax => {
            (softplus(&d_real.neg()?)?.mean_all()? + softplus(&d_fake)?.mean_all()?)?
        }
        GanLoss::Hinge => {
            ((1.0 - &d_real)?.relu()?.mean_all()? + (&d_fake + 1.0)?.relu()?.mean_all()?)?
        }
        GanLoss::WganGp => (d_fake.mean_all()? - d_real.mean_all()?)?,
    };
    let (loss, penalty) = match cfg.effective_penalty() {
        GanPenalty::None => (loss, None),
        GanPenalty::Gp => {
            let b = x.dim(0)?;
            let t = t.broadcast_as((b, x.dim(1)?))?;
            let x_hat = ((x * &t)? + (fake * (1.0 - &t)?)?)?.detach();
            let (_, g) = gan.input_gradient_with(&x_hat, &ws)?;
            let norm = (g.sqr()?.sum(D::Minus1)? + 1e-12)?.sqrt()?;
            let gp = (norm - 1.0)?.sqr()?.mean_all()?;
            ((loss + (&gp * cfg.gp_weight)?)?, Some(gp))
        }
        GanPenalty::R1 => {
            let (_, g) = gan.input_gradient_with(&x.detach(), &ws)?;
            let r1 = g.sqr()?.sum(D::Minus1)?.mean_all()?;
            ((loss + (&r1 * (cfg.r1_gamma / 2.0))?)?, Some(r1))
        }
    };
    Ok(DiscriminatorLoss {
        loss,
        d_real: d_real.mean_all()?,
        d_fake: d_fake.mean_all()?,
        penalty,
    })
}

/// The generator loss of `gan` on generated rows `fake` (differentiable through the
/// generator).
pub fn generator_loss(gan: &Gan, fake: &Tensor) -> Result<Tensor> {
    let d = gan.discriminate(fake)?;
    Ok(match gan.config().loss {
        GanLoss::NonSaturating => softplus(&d.neg()?)?.mean_all()?,
        GanLoss::Minimax => softplus(&d)?.mean_all()?.neg()?,
        GanLoss::Hinge | GanLoss::WganGp => d.mean_all()?.neg()?,
    })
}
