//! Optimizers with state that is saved and restored exactly, and learning-rate schedules.
//!
//! - Adam (Kingma & Ba 2015) as PyTorch's `torch.optim.Adam` computes it (L2 weight decay added
//!   to the gradient, bias corrections `1 - beta^t`), fused in place on the CPU
//!   ([`crate::ops::adam`]).
//! - SGD with momentum as `torch.optim.SGD` (`buf = mu buf + g`, first step `buf = g`).
//! - Schedules: constant; step (`lr * gamma^floor(epoch / step_epochs)`); the IWAE paper's
//!   (section 5: for i = 0..7, 3^i passes at `lr * 10^(-i/7)`, 3280 passes in all).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::config::{OptimConfig, OptimizerKind, ScheduleKind};
use crate::error::{Error, Result};
use crate::models::ParamStore;
use crate::ops::adam::{AdamApply, AdamMoments};

/// Optimizer state for every parameter of a store, in the store's order.
#[derive(Debug)]
pub struct Optimizer {
    cfg: OptimConfig,
    params: Vec<(String, Var)>,
    /// Adam: flat `m, v, guard` (`2n + 1` floats, see [`crate::ops::adam`]); SGD: `(n)` momentum
    /// buffers.
    state: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub step: u64,
}

impl Optimizer {
    /// Fresh state for the parameters of `store`: zeros, except Adam's second moment, which
    /// starts at `cfg.second_moment_init`.
    pub fn new(cfg: &OptimConfig, store: &ParamStore) -> Result<Self> {
        let params: Vec<(String, Var)> = store
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let state = params
            .iter()
            .map(|(_, v)| {
                let n = v.elem_count();
                let shape: Vec<usize> = match cfg.kind {
                    OptimizerKind::Adam => vec![2 * n + 1],
                    OptimizerKind::Sgd => vec![n],
                };
                let state = Tensor::zeros(shape, candle_core::DType::F32, v.device())?;
                if cfg.kind == OptimizerKind::Adam && cfg.second_moment_init != 0.0 {
                    let v0 = Tensor::full(cfg.second_moment_init as f32, n, v.device())?;
                    state.slice_set(&v0, 0, n)?;
                }
                Ok(state)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            cfg: cfg.clone(),
            params,
            state,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from the gradients in `grads`. Parameters without a
    /// gradient are left alone (their moments are not decayed, as in PyTorch). With `guard`
    /// (a scalar on the parameters' device), the fused Adam kernels skip the update on the device
    /// when it is NaN or infinite; the step counter advances either way, so callers that skip
    /// on the host must not call `step` at all.
    pub fn step(&mut self, grads: &GradStore, lr: f64, guard: Option<&Tensor>) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let clip = if c.clip_grad_norm > 0.0 {
            clip_factor(&self.params, grads, c.clip_grad_norm)?
        } else {
            None
        };
        for ((_, var), state) in self.params.iter().zip(&self.state) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = match &clip {
                Some(f) => g.broadcast_mul(f)?,
                None => g.contiguous()?,
            };
            match c.kind {
                OptimizerKind::Adam => {
                    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
                    let bc1 = 1.0 - (c.beta1).powi(t);
                    let bc2 = 1.0 - (c.beta2).powi(t);
                    if crate::ops::fused_available(var.device()) {
                        if let Some(guard) = guard {
                            state.slice_set(&guard.reshape(1)?, 0, 2 * var.elem_count())?;
                        }
                        let flat_g = g.flatten_all()?;
                        let flat_p = var.as_tensor().flatten_all()?;
                        state.inplace_op3(
                            &flat_g,
                            &flat_p,
                            &AdamMoments {
                                beta1: b1,
                                beta2: b2,
                                weight_decay: c.weight_decay as f32,
                            },
                        )?;
                        flat_p.inplace_op2(
                            state,
                            &AdamApply {
                                lr: lr as f32,
                                eps: c.eps as f32,
                                bias_correction1: bc1 as f32,
                                bias_correction2: bc2 as f32,
                            },
                        )?;
                    } else {
                        adam_composed(var, &g, state, c, lr, bc1, bc2)?;
                    }
                }
                OptimizerKind::Sgd => {
                    let mut g = g.flatten_all()?;
                    let p = var.as_tensor().flatten_all()?;
                    if c.weight_decay != 0.0 {
                        g = (g + (&p * c.weight_decay)?)?;
                    }
                    let buf = if self.step == 1 || c.momentum == 0.0 {
                        g
                    } else {
                        ((state * c.momentum)? + g)?
                    };
                    let new_p = (p - (&buf * lr)?)?;
                    var.set(&new_p.reshape(var.shape())?)?;
                    // Keep the buffer in the state tensor (same storage, updated in place).
                    state.slice_set(&buf, 0, 0)?;
                }
            }
        }
        Ok(())
    }

    /// The state tensors under their checkpoint names (`{param}.exp_avg`, ...).
    pub fn named_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((name, var), s) in self.params.iter().zip(&self.state) {
            match self.cfg.kind {
                OptimizerKind::Adam => {
                    let n = var.elem_count();
                    let m = s.narrow(0, 0, n)?.reshape(var.shape())?;
                    let v = s.narrow(0, n, n)?.reshape(var.shape())?;
                    out.push((format!("{name}.exp_avg"), m));
                    out.push((format!("{name}.exp_avg_sq"), v));
                }
                OptimizerKind::Sgd => {
                    out.push((format!("{name}.momentum_buffer"), s.reshape(var.shape())?))
                }
            }
        }
        Ok(out)
    }

    /// Restores state written by [`Optimizer::named_state`].
    pub fn load_state(
        &mut self,
        step: u64,
        mut lookup: impl FnMut(&str, &[usize]) -> std::result::Result<Tensor, String>,
    ) -> std::result::Result<(), String> {
        for ((name, var), s) in self.params.iter().zip(self.state.iter_mut()) {
            let dims = var.dims().to_vec();
            let dev = var.device();
            *s = match self.cfg.kind {
                OptimizerKind::Adam => {
                    let m = lookup(&format!("{name}.exp_avg"), &dims)?
                        .flatten_all()
                        .map_err(|e| e.to_string())?;
                    let v = lookup(&format!("{name}.exp_avg_sq"), &dims)?
                        .flatten_all()
                        .map_err(|e| e.to_string())?;
                    // The trailing found-inf guard starts finite (0).
                    let guard = Tensor::zeros(1, candle_core::DType::F32, m.device())
                        .map_err(|e| e.to_string())?;
                    Tensor::cat(&[m, v, guard], 0)
                        .and_then(|t| t.to_device(dev))
                        .map_err(|e| e.to_string())?
                }
                OptimizerKind::Sgd => lookup(&format!("{name}.momentum_buffer"), &dims)?
                    .flatten_all()
                    .and_then(|t| t.to_device(dev))
                    .map_err(|e| e.to_string())?,
            };
        }
        self.step = step;
        Ok(())
    }

    /// The optimizer's name in checkpoints.
    pub fn kind_name(&self) -> &'static str {
        match self.cfg.kind {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        }
    }
}

fn adam_composed(
    var: &Var,
    g: &Tensor,
    state: &Tensor,
    c: &OptimConfig,
    lr: f64,
    bc1: f64,
    bc2: f64,
) -> Result<()> {
    let p = var.as_tensor().flatten_all()?;
    let mut g = g.flatten_all()?;
    if c.weight_decay != 0.0 {
        g = (g + (&p * c.weight_decay)?)?;
    }
    let n = p.elem_count();
    let m = ((state.narrow(0, 0, n)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
    let v = ((state.narrow(0, n, n)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
    let new_p = (p - ((m.clone() / denom)? * (lr / bc1))?)?;
    var.set(&new_p.reshape(var.shape())?)?;
    state.slice_set(&Tensor::cat(&[m, v], 0)?, 0, 0)?;
    Ok(())
}

/// Learning rate at `epoch` (0-based) under the configured schedule.
pub fn learning_rate(cfg: &OptimConfig, epoch: usize) -> f64 {
    match cfg.schedule {
        ScheduleKind::Constant => cfg.lr,
        ScheduleKind::Step => cfg.lr * cfg.gamma.powi((epoch / cfg.step_epochs) as i32),
        ScheduleKind::Linear => cfg.lr * (1.0 - epoch as f64 / cfg.step_epochs as f64).max(0.0),
        ScheduleKind::Iwae => {
            let (mut start, mut i) = (0usize, 0i32);
            while i < 7 && epoch >= start + 3usize.pow(i as u32) {
                start += 3usize.pow(i as u32);
                i += 1;
            }
            cfg.lr * 10f64.powf(-(i as f64) / 7.0)
        }
    }
}

/// Learning rate of optimizer step `step` (0-based, global) in `epoch`: the schedule's
/// [`learning_rate`] times the linear warm-up factor `min(1, (step + 1) / warmup_steps)`.
pub fn learning_rate_at(cfg: &OptimConfig, epoch: usize, step: u64) -> f64 {
    let lr = learning_rate(cfg, epoch);
    if cfg.warmup_steps == 0 {
        return lr;
    }
    lr * ((step + 1) as f64 / cfg.warmup_steps as f64).min(1.0)
}

/// The factor `min(1, max_norm / (norm + 1e-6))` that clips the gradients of `store` in
/// `grads` to the global L2 norm `max_norm` (`torch.nn.utils.clip_grad_norm_`), as a scalar
/// tensor on the parameters' device (no read on the host); the norm is accumulated in f32.
pub fn clip_factor(
    store_vars: &[(String, Var)],
    grads: &GradStore,
    max_norm: f64,
) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (_, var) in store_vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
    }
    let Some(total) = total else {
        return Ok(None);
    };
    let factor = (total.sqrt()? + 1e-6)?.recip()?.affine(max_norm, 0.0)?;
    Ok(Some(factor.clamp(0f32, 1f32)?))
}

/// Total epochs of the IWAE schedule (sum of 3^i, i = 0..7).
pub const IWAE_SCHEDULE_EPOCHS: usize = 3280;

/// Checks that no gradient is NaN or infinite; names the first offending parameter.
pub fn check_finite_grads(store: &ParamStore, grads: &GradStore) -> Result<()> {
    for (name, var) in store.iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let finite = match crate::ops::with_cpu(g, crate::ops::all_finite)? {
                Some(f) => f,
                None => g.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite(),
            };
            if !finite {
                return Err(Error::NonFinite(format!("gradient of {name}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adam_matches_a_hand_computed_step() {
        check_adam_steps(0.9, 0.0);
    }

    #[test]
    fn adam_with_the_iwae_codes_settings_matches_a_hand_computed_step() {
        // yburda/iwae's optimizers.Adam: beta1 0.99, second moment started at ones. The first
        // steps are much smaller than PyTorch's (v_hat starts near 1 / (1 - beta2) = 1000).
        check_adam_steps(0.99, 1.0);
    }

    /// Two steps of Adam on p = [1, -2] with gradients [0.5, -1] then [0.1, 0.3], lr 0.1,
    /// against the update computed here in f64.
    fn check_adam_steps(b1: f64, v0: f64) {
        let mut store = ParamStore::new(Device::Cpu);
        let mut rng = crate::rng::stream_rng(0, crate::rng::Stream::Init, 0);
        let p = store.uniform("p".into(), &[2], 1.0, &mut rng).unwrap();
        let var = store.iter().next().unwrap().1.clone();
        var.set(&Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            beta1: b1,
            second_moment_init: v0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&cfg, &store).unwrap();
        let (b2, eps, lr) = (0.999f64, 1e-8f64, 0.1f64);
        let mut expect = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [v0; 2]);
        for (t, g) in [[0.5f64, -1.0], [0.1, 0.3]].iter().enumerate() {
            // loss = sum(g * p) has gradient g.
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            let grads = (p.clone() * gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&grads, lr, None).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - b1.powi(t));
                let vhat = v[i] / (1.0 - b2.powi(t));
                expect[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 3e-6,
                "{got:?} vs {expect:?}"
            );
        }
        let state = opt.named_state().unwrap();
        assert_eq!(state[0].0, "p.exp_avg");
        let m0: Vec<f32> = state[0].1.to_vec1().unwrap();
        assert!((m0[0] as f64 - m[0]).abs() < 1e-7);
        let v_saved: Vec<f32> = state[1].1.to_vec1().unwrap();
        assert!(
            (v_saved[1] as f64 - v[1]).abs() < 1e-6,
            "{v_saved:?} vs {v:?}"
        );
    }

    #[test]
    fn sgd_with_momentum_matches_pytorch_semantics() {
        // torch.optim.SGD: buf_1 = g_1, buf_t = mu buf_{t-1} + g_t, p -= lr buf_t.
        let mut store = ParamStore::new(Device::Cpu);
        let mut rng = crate::rng::stream_rng(0, crate::rng::Stream::Init, 0);
        let p = store.uniform("p".into(), &[2], 1.0, &mut rng).unwrap();
        let var = store.iter().next().unwrap().1.clone();
        var.set(&Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        let cfg = OptimConfig {
            kind: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&cfg, &store).unwrap();
        let mut expect = [1f64, -2.0];
        let mut buf = [0f64; 2];
        for (t, g) in [[0.5f64, -1.0], [0.1, 0.3], [-0.2, 0.05]]
            .iter()
            .enumerate()
        {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            let grads = (p.clone() * gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&grads, 0.1, None).unwrap();
            for i in 0..2 {
                buf[i] = if t == 0 { g[i] } else { 0.9 * buf[i] + g[i] };
                expect[i] -= 0.1 * buf[i];
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
        let state = opt.named_state().unwrap();
        assert_eq!(state[0].0, "p.momentum_buffer");
        let b: Vec<f32> = state[0].1.to_vec1().unwrap();
        assert!((b[0] as f64 - buf[0]).abs() < 1e-6);
    }

    #[test]
    fn step_schedule_decays_by_gamma() {
        let cfg = OptimConfig {
            lr: 0.1,
            schedule: ScheduleKind::Step,
            step_epochs: 3,
            gamma: 0.5,
            ..Default::default()
        };
        let lrs: Vec<f64> = (0..7).map(|e| learning_rate(&cfg, e)).collect();
        assert_eq!(lrs, vec![0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]);
    }

    #[test]
    fn iwae_schedule_follows_the_paper() {
        let cfg = OptimConfig {
            lr: 1e-3,
            schedule: ScheduleKind::Iwae,
            ..Default::default()
        };
        assert_eq!(learning_rate(&cfg, 0), 1e-3);
        let linear = OptimConfig {
            schedule: ScheduleKind::Linear,
            step_epochs: 4,
            ..OptimConfig::default()
        };
        let lrs: Vec<f64> = (0..6).map(|e| learning_rate(&linear, e)).collect();
        for (got, want) in lrs.iter().zip([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-15, "{lrs:?}");
        }
        assert!((learning_rate(&cfg, 1) - 1e-3 * 10f64.powf(-1.0 / 7.0)).abs() < 1e-12);
        assert!((learning_rate(&cfg, 3) - 1e-3 * 10f64.powf(-1.0 / 7.0)).abs() < 1e-12);
        assert!((learning_rate(&cfg, 4) - 1e-3 * 10f64.powf(-2.0 / 7.0)).abs() < 1e-12);
        assert!(
            (learning_rate(&cfg, IWAE_SCHEDULE_EPOCHS - 1) - 1e-3 * 10f64.powf(-7.0 / 7.0)).abs()
                < 1e-12
        );
        assert_eq!(
            (0..8).map(|i| 3usize.pow(i)).sum::<usize>(),
            IWAE_SCHEDULE_EPOCHS
        );
    }
}
