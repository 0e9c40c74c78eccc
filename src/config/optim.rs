//! `[optim]`: the optimizer and its learning-rate schedule. Every field may change on resume.

use serde::{Deserialize, Serialize};

/// Optimizer family (`optim.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam as `torch.optim.Adam` (L2 weight decay added to the gradient).
    #[default]
    Adam,
    /// SGD with momentum as `torch.optim.SGD`.
    Sgd,
}

/// Learning-rate schedule (`optim.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// `lr` throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step,
    /// The IWAE paper's: for i = 0..7, 3^i epochs at `lr * 10^(-i/7)` (3280 epochs in all).
    Iwae,
    /// Linear decay over `step_epochs` epochs: `lr * (1 - e / step_epochs)` in epoch `e`
    /// (0-based), so the last of `step_epochs` epochs runs at `lr / step_epochs`; 0 after.
    /// Set `step_epochs` to `train.epochs` for the SN-GAN decay to zero.
    Linear,
}

/// Optimizer settings (`[optim]`; a GAN's two optimizers share them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `adam` or `sgd` ([`OptimizerKind`]). Default: `adam`.
    pub kind: OptimizerKind,
    /// Learning rate per optimizer step (the schedule's starting value). Default: `1e-3`.
    pub lr: f64,
    /// Adam's decay of the first moment, in `[0, 1)`. Default: 0.9.
    pub beta1: f64,
    /// Adam's decay of the second moment, in `[0, 1)`. Default: 0.999.
    pub beta2: f64,
    /// Adam's denominator term, added to the root of the second moment. Default: `1e-8`.
    pub eps: f64,
    /// L2 weight decay, added to the gradient as `weight_decay * p` (0: off). Default: 0.
    pub weight_decay: f64,
    /// SGD momentum `mu`, in `[0, 1)` (`kind = "sgd"` only). Default: 0.9.
    pub momentum: f64,
    /// `constant`, `step`, `iwae` or `linear` ([`ScheduleKind`]). Default: `constant`.
    pub schedule: ScheduleKind,
    /// Epochs between decays of the `step` schedule, or the length of the `linear` decay, in
    /// epochs. Default: 10.
    pub step_epochs: usize,
    /// Factor of each decay of the `step` schedule. Default: 0.5.
    pub gamma: f64,
    /// Linear learning-rate warm-up over the first `warmup_steps` optimizer steps: step `s`
    /// (0-based) runs at `min(1, (s + 1) / warmup_steps)` times the schedule's rate (0: off).
    /// Default: 0.
    pub warmup_steps: u64,
    /// Gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`): when the L2 norm
    /// of all of an optimizer's gradients exceeds this, they are scaled by `max / (norm +
    /// 1e-6)` (0: off). Default: 0.
    pub clip_grad_norm: f64,
    /// Adam's initial second moment `v_0` for every parameter (0: PyTorch's Adam). The IWAE
    /// paper's released code (yburda/iwae, `optimizers.Adam`) starts it at 1, which with the
    /// bias correction `1 - beta2^t` makes the first steps small (a built-in warm-up). Default:
    /// 0.
    pub second_moment_init: f64,
    /// GANs: the discriminator's learning rate, in place of `lr` (the schedule and warm-up
    /// scale it alike; Heusel et al. 2017's two time-scale rule sets it above the generator's).
    /// Default: unset (`lr`).
    pub d_lr: Option<f64>,
    /// GANs: the generator's learning rate, in place of `lr`. Default: unset (`lr`).
    pub g_lr: Option<f64>,
    /// GANs: the discriminator's Adam `[beta1, beta2]`, in place of `beta1`, `beta2`. Default:
    /// unset.
    pub d_betas: Option<[f64; 2]>,
    /// GANs: the generator's Adam `[beta1, beta2]`. Default: unset.
    pub g_betas: Option<[f64; 2]>,
}

/// One of a GAN's two players, whose optimizer may have settings of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Player {
    /// The generator.
    Generator,
    /// The discriminator (critic).
    Discriminator,
}

impl OptimConfig {
    /// `player`'s learning rate: `d_lr` or `g_lr` where set, else `lr`.
    pub fn player_lr(&self, player: Player) -> f64 {
        match player {
            Player::Generator => self.g_lr,
            Player::Discriminator => self.d_lr,
        }
        .unwrap_or(self.lr)
    }

    /// The settings of `player`'s optimizer: `lr`, `beta1` and `beta2` replaced by the player's
    /// own where set.
    pub fn for_player(&self, player: Player) -> OptimConfig {
        let betas = match player {
            Player::Generator => self.g_betas,
            Player::Discriminator => self.d_betas,
        };
        let mut o = self.clone();
        o.lr = self.player_lr(player);
        if let Some([b1, b2]) = betas {
            (o.beta1, o.beta2) = (b1, b2);
        }
        o
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            schedule: ScheduleKind::Constant,
            step_epochs: 10,
            gamma: 0.5,
            warmup_steps: 0,
            clip_grad_norm: 0.0,
            second_moment_init: 0.0,
            d_lr: None,
            g_lr: None,
            d_betas: None,
            g_betas: None,
        }
    }
}
