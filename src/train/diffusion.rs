//! The diffusion family in the training loop: one update of the simple (or hybrid) loss per
//! step with `t` uniform over the T steps and `eps ~ N(0, I)`, both drawn for the global batch
//! from streams keyed by the step (so a resumed or data-parallel run draws exactly what an
//! uninterrupted one-process run draws), then the EMA update. Epoch ends report sample
//! figures from the EMA weights (mode coverage on 2-D sets, MNIST-FID on labelled images) and
//! a Monte-Carlo estimate of the test bound.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;

use super::{restore_optimizer, EpochEval, FinalEval, StepContext, StepOutput, Trainee};
use crate::checkpoint::{LoadedFile, OPTIM_FILE};
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::models::Diffusion;
use crate::optim::{check_finite_grads, Optimizer};
use crate::rng::{normal_vec, stream_rng, Stream};
use crate::session::{self, Datasets, Model};

/// Test rows of the epoch-end bound estimate.
const EPOCH_BOUND_ROWS: usize = 200;

/// Steps drawn per row for the epoch-end bound: all of them (exact) for 2-D points, where a
/// pass is cheap, 8 strata for images.
fn epoch_t_draws(m: &Diffusion) -> usize {
    if m.image.is_some() {
        8
    } else {
        0
    }
}

/// A diffusion model and its optimizer.
pub struct DiffusionTrainee {
    pub model: Diffusion,
    pub opt: Optimizer,
}

impl DiffusionTrainee {
    /// A fresh model for `cfg`.
    pub fn fresh(cfg: &Config, data: &Datasets, device: &Device) -> Result<Self> {
        let model = session::build_diffusion(cfg, data.dim(), data.image_shape(), device)?;
        let opt = Optimizer::new(&cfg.optim, &model.store)?;
        Ok(DiffusionTrainee { model, opt })
    }

    /// The model, its EMA and the optimizer state of a checkpoint (whose data the caller has
    /// checked). A checkpoint saved without an EMA starts one from its weights when the config
    /// now asks for one.
    pub fn restore(cfg: &Config, ck: session::LoadedCheckpoint, device: &Device) -> Result<Self> {
        let Model::Diffusion(model) = ck.model else {
            return Err(Error::checkpoint(&ck.dir, "not a diffusion checkpoint"));
        };
        let mut model = *model;
        model.cfg = cfg.model.diffusion.clone();
        if cfg.model.diffusion.ema_decay == 0.0 {
            model.ema = None;
        } else if model.ema.is_none() {
            model.ema = Some(model.store.deep_copy()?);
        }
        let mut opt = Optimizer::new(&cfg.optim, &model.store)?;
        let file = LoadedFile::read(&ck.dir.join(OPTIM_FILE))?;
        restore_optimizer(&mut opt, &file, "", device)?;
        Ok(DiffusionTrainee { model, opt })
    }

    /// The global batch's steps `t` (B) and noise `eps` (B D values), keyed by the step.
    fn draws(&self, seed: u64, step: u64, batch: usize) -> (Vec<u32>, Vec<f32>) {
        let steps = self.model.schedule.len() as u32;
        let mut rng = stream_rng(seed, Stream::Timestep, step);
        let t = (0..batch).map(|_| rng.random_range(0..steps)).collect();
        let eps = normal_vec(
            &mut stream_rng(seed, Stream::Noise, step),
            batch * self.model.dim,
        );
        (t, eps)
    }

    /// The sample figures (EMA weights) and the bound on the first test rows, in the order
    /// both evaluations report them.
    fn figures(&self, cfg: &Config, data: &Datasets) -> Result<Vec<(&'static str, f64)>> {
        let model = Model::Diffusion(Box::new(self.model.clone()));
        let mut figures = crate::metrics::quick_sample_figures(&model, cfg, data)?;
        let r = crate::eval::diffusion_bound(
            &self.model,
            &data.test,
            EPOCH_BOUND_ROWS,
            epoch_t_draws(&self.model),
            cfg.train.seed,
        )?;
        figures.push(("test_bound_nats", r.nll));
        figures.push(("test_bound_stderr", r.nll_stderr));
        if let Some(b) = r.bits_per_dim {
            figures.push(("test_bound_bits_per_dim", b));
        }
        Ok(figures)
    }

    fn output(
        &self,
        loss: Tensor,
        simple: Tensor,
        vlb: Option<Tensor>,
        applied: bool,
        ema: Option<f64>,
        ctx: &StepContext,
    ) -> Result<StepOutput> {
        let mut values = vec![("l_simple", simple.detach())];
        if let Some(v) = vlb {
            values.push(("l_vlb", v.detach()));
        }
        Ok(StepOutput {
            loss,
            values,
            constants: ema.map(|d| vec![("ema_decay", d)]).unwrap_or_default(),
            skipped: Tensor::new(if applied { 0f32 } else { 1f32 }, ctx.device)?,
            applied: Some(applied),
        })
    }
}

impl Trainee for DiffusionTrainee {
    fn numel(&self) -> usize {
        self.model.store.numel()
    }

    fn parameters(&self) -> Vec<candle_core::Var> {
        let mut vars = self.model.store.vars();
        // The EMA is kept identical on every rank too (it starts from the broadcast weights).
        if let Some(e) = &self.model.ema {
            vars.extend(e.vars());
        }
        vars
    }

    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput> {
        let batch = idx.len();
        let rows = ctx.shard(batch);
        let (t, eps) = self.draws(ctx.cfg.train.seed, ctx.step, batch);
        let d = self.model.dim;
        let local = if rows.is_empty() {
            None
        } else {
            let x = super::rows_of(&data.batch(idx, ctx.step, ctx.device)?, &rows)?;
            let x0 = self.model.to_model_space(&x)?;
            let eps = Tensor::from_slice(
                &eps[rows.start * d..rows.end * d],
                (rows.len(), d),
                ctx.device,
            )?;
            let w = self.model.store.tensors();
            let l = crate::objectives::diffusion::training_loss(
                &self.model,
                &w,
                &x0,
                &t[rows.clone()],
                &eps,
            )?;
            let mut extra = vec![l.simple];
            extra.extend(l.vlb);
            Some((l.loss, extra))
        };
        let extras = if self.model.cfg.variance == crate::config::ReverseVariance::Learned {
            2
        } else {
            1
        };
        if let (None, Some((l, e))) = (ctx.parallel, &local) {
            if !l.to_scalar::<f32>()?.is_finite() {
                // One process: no backward pass for a non-finite loss.
                return self.output(l.clone(), e[0].clone(), e.get(1).cloned(), false, None, ctx);
            }
        }
        let vars = self.model.store.vars();
        let (loss, extra, grads) = super::averaged_backward(
            ctx.parallel,
            ctx.device,
            &vars,
            local.as_ref().map(|(l, e)| (l, e.clone())),
            extras,
            rows.len(),
            batch,
        )?;
        let applied = loss.to_scalar::<f32>()?.is_finite()
            && check_finite_grads(&self.model.store, &grads).is_ok();
        let mut ema = None;
        if applied {
            self.opt.step(&grads, ctx.lr, None)?;
            ema = self.model.update_ema(self.opt.step)?;
        }
        self.output(
            loss,
            extra[0].clone(),
            extra.get(1).cloned(),
            applied,
            ema,
            ctx,
        )
    }

    fn epoch_eval(&self, cfg: &Config, data: &Datasets) -> Result<EpochEval> {
        let figures = self.figures(cfg, data)?;
        let summary = figures
            .iter()
            .filter(|(n, _)| *n != "test_bound_stderr")
            .map(|(n, v)| format!("{n} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(EpochEval {
            summary,
            figures,
            score: None,
        })
    }

    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()> {
        crate::samples::write_model_samples(
            &Model::Diffusion(Box::new(self.model.clone())),
            cfg,
            path,
            64,
            epoch,
            data.image_shape(),
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = self.model.store.named_tensors();
        tensors.extend(self.model.named_ema());
        tensors
    }

    fn optimizers(&self) -> Vec<(&'static str, &Optimizer)> {
        vec![("", &self.opt)]
    }

    fn finish(
        &self,
        cfg: &Config,
        data: &Datasets,
        _run_dir: &Path,
        epoch_eval: Option<&[(&'static str, f64)]>,
    ) -> Result<FinalEval> {
        FinalEval::reusing(epoch_eval, || self.figures(cfg, data))
    }
}
