//! The VAE / IWAE family in the training loop: one optimizer step on the ELBO or the
//! importance-weighted bound (Burda et al. 2016), the test and validation -ELBO at epoch ends,
//! prior samples, and the importance-sampled NLL with reconstructions at the end.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::{restore_optimizer, EpochEval, FinalEval, StepContext, StepOutput, Trainee};
use crate::checkpoint::{LoadedFile, OPTIM_FILE};
use crate::config::Config;
use crate::data::DataSource;
use crate::distributed::DataParallel;
use crate::error::{Error, Result};
use crate::eval;
use crate::models::Vae;
use crate::objectives::{kl_weight, needs_densities, objective};
use crate::optim::{check_finite_grads, Optimizer};
use crate::rng::{stream_rng, Draws, Stream};
use crate::samples;
use crate::session::{self, Datasets};

/// A VAE and its optimizer.
pub struct VaeTrainee {
    pub model: Vae,
    pub opt: Optimizer,
}

impl VaeTrainee {
    /// A fresh model for `cfg`.
    pub fn fresh(cfg: &Config, data: &Datasets, device: &Device) -> Result<Self> {
        let model = session::build_vae(cfg, data.dim(), device)?;
        if cfg.model.output_bias == crate::config::OutputBias::DataMean {
            model.set_output_bias_from_mean(&data.train.column_means())?;
        }
        let opt = Optimizer::new(&cfg.optim, &model.store)?;
        Ok(VaeTrainee { model, opt })
    }

    /// The model and optimizer state of a checkpoint (whose data the caller has checked,
    /// [`session::LoadedCheckpoint::check_data`]).
    pub fn restore(cfg: &Config, ck: session::LoadedCheckpoint, device: &Device) -> Result<Self> {
        let crate::session::Model::Vae(model) = ck.model else {
            return Err(Error::checkpoint(&ck.dir, "not a vae checkpoint"));
        };
        let mut opt = Optimizer::new(&cfg.optim, &model.store)?;
        let optim_file = LoadedFile::read(&ck.dir.join(OPTIM_FILE))?;
        restore_optimizer(&mut opt, &optim_file, "", device)?;
        Ok(VaeTrainee { model, opt })
    }
}

impl Trainee for VaeTrainee {
    fn numel(&self) -> usize {
        self.model.store.numel()
    }

    fn parameters(&self) -> Vec<candle_core::Var> {
        self.model.store.vars()
    }

    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput> {
        let beta = kl_weight(&ctx.cfg.objective, ctx.epoch_progress);
        let out = train_step(
            &self.model,
            &mut self.opt,
            ctx.cfg,
            data,
            idx,
            ctx.step,
            beta,
            ctx.lr,
            ctx.device,
            ctx.parallel,
            Draws::for_device(ctx.device),
        )?;
        Ok(StepOutput {
            loss: out.loss,
            values: vec![("bound", out.bound)],
            constants: vec![("kl_weight", beta)],
            skipped: out.skipped,
            applied: out.applied,
        })
    }

    fn epoch_eval(&self, cfg: &Config, data: &Datasets) -> Result<EpochEval> {
        let seed = cfg.train.seed;
        // Reported as positive nats (negative ELBO), like the NLL.
        let test_elbo = -eval::mean_elbo(&self.model, &data.test, data.test.len(), 1000, seed)?;
        let mut figures = vec![("test_elbo", test_elbo)];
        let mut score = None;
        if let Some(v) = &data.valid {
            let s = -eval::mean_elbo(&self.model, v, v.len(), 1000, seed)?;
            score = Some(s);
            figures.push(("valid_elbo", s));
        }
        Ok(EpochEval {
            summary: format!("test -ELBO {test_elbo:.2} nats"),
            figures,
            score,
        })
    }

    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()> {
        samples::write_samples(
            &self.model,
            path,
            64,
            cfg.train.seed,
            epoch,
            data.image_shape(),
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.model.store.named_tensors()
    }

    fn optimizers(&self) -> Vec<(&'static str, &Optimizer)> {
        vec![("", &self.opt)]
    }

    fn finish(
        &self,
        cfg: &Config,
        data: &Datasets,
        run_dir: &Path,
        _epoch_eval: Option<&[(&'static str, f64)]>,
    ) -> Result<FinalEval> {
        let mut fin = FinalEval::default();
        if cfg.eval.final_k > 0 {
            let o = eval::LikelihoodOptions {
                k: cfg.eval.final_k,
                max_rows: cfg.eval.max_rows,
                seed: cfg.train.seed,
                estimator: eval::Estimator::Importance,
                sweep: Vec::new(),
            };
            let r = eval::evaluate(&self.model, &data.test, cfg.eval.final_limit, &o)?;
            fin.figures = vec![
                ("test_elbo", r.test_elbo),
                ("nll", r.nll),
                ("nll_stderr", r.nll_stderr),
                ("k", r.k as f64),
                ("n", r.n as f64),
                ("bits_per_dim", r.bits_per_dim),
            ];
            fin.report = Some(r);
        }
        if crate::session::is_image(data.image_shape()) {
            samples::write_reconstructions(
                &self.model,
                &data.test,
                &run_dir.join("reconstructions.png"),
                32,
                data.image_shape(),
            )?;
        }
        Ok(fin)
    }
}

/// The result of one optimizer step. The tensors are scalars on the training device; on a GPU
/// read them only at logging intervals (each read waits for the device).
pub struct VaeStepOutput {
    /// The loss (negative weighted bound).
    pub loss: Tensor,
    /// The batch-mean bound.
    pub bound: Tensor,
    /// 1 when the loss or a gradient was non-finite and the update was skipped, else 0.
    pub skipped: Tensor,
    /// Whether the update was applied, when the host knows it at once (CPU, or SGD anywhere);
    /// `None` when the device decided (fused Adam on a GPU reads the found-inf guard itself).
    pub applied: Option<bool>,
}

/// The batch `idx` of `data` and its noise for `k` samples, drawn for the whole global batch by
/// `draws` at step `step`, narrowed to this rank's `rows`: x is `(rows, d)`, each noise tensor
/// `(k rows, d_l)`, sample-major.
#[allow(clippy::too_many_arguments)]
fn shard_inputs(
    model: &Vae,
    data: &DataSource,
    idx: &[u32],
    step: u64,
    k: usize,
    seed: u64,
    device: &Device,
    draws: Draws,
    rows: &std::ops::Range<usize>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let batch = idx.len();
    let x = data.batch_drawn(idx, step, device, draws)?;
    let mut eps = match draws {
        Draws::Host => model.draw_noise(k, batch, &mut stream_rng(seed, Stream::Noise, step))?,
        Draws::Counter => {
            model.draw_noise_keyed(k, batch, crate::rng::stream_key(seed, Stream::Noise, step))?
        }
    };
    if rows.len() == batch {
        return Ok((x, eps));
    }
    for e in eps.iter_mut() {
        let d = e.dim(1)?;
        *e = e
            .reshape((k, batch, d))?
            .narrow(1, rows.start, rows.len())?
            .contiguous()?
            .reshape((k * rows.len(), d))?;
    }
    Ok((super::rows_of(&x, rows)?, eps))
}

/// One optimizer step on the rows `idx` of `data` at global step `step`.
///
/// On the CPU the loss and the gradients are tested on the host before the update. On a CUDA
/// device nothing waits for the device: the batch bits and the noise are drawn there, and the
/// guard `loss + 0 * sum(grads)` (NaN or infinite exactly when something is) is handed to the
/// fused Adam kernels, which skip the update by themselves.
///
/// `draws` picks the generator of the binarization bits and the noise: training passes
/// [`Draws::for_device`]; a device check passes the device's generator on both sides.
///
/// With `parallel`, this is one rank of a data-parallel group: `idx` is the global batch, the
/// rank trains on its shard of it (with the bits and noise the global batch draws for those
/// rows), and the gradients, loss and bound are averaged over the group before the update, so
/// every rank applies the update one process would (see [`crate::distributed`]). `None` is one
/// process.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Vae,
    opt: &mut Optimizer,
    cfg: &Config,
    data: &DataSource,
    idx: &[u32],
    step: u64,
    beta: f64,
    lr: f64,
    device: &Device,
    parallel: Option<&DataParallel>,
    draws: Draws,
) -> Result<VaeStepOutput> {
    let k = cfg.objective.k;
    let seed = cfg.train.seed;
    let batch = idx.len();
    let rows = parallel.map_or(0..batch, |p| p.shard(batch));
    let (x, eps) = shard_inputs(model, data, idx, step, k, seed, device, draws, &rows)?;
    let local = if rows.is_empty() {
        None
    } else {
        let pass = model.pass(
            &x,
            k,
            &eps,
            needs_densities(&cfg.objective, model.latents.len()),
        )?;
        let obj = objective(&pass, &cfg.objective, k, beta)?;
        if parallel.is_none() && device.is_cpu() && !obj.loss.to_scalar::<f32>()?.is_finite() {
            // One process on the CPU: skip the backward pass of a non-finite loss.
            return Ok(VaeStepOutput {
                loss: obj.loss,
                bound: obj.bound,
                skipped: Tensor::new(1f32, device)?,
                applied: Some(false),
            });
        }
        Some((obj.loss, vec![obj.bound]))
    };
    let vars = model.store.vars();
    let (loss, mut extra, grads) = super::averaged_backward(
        parallel,
        device,
        &vars,
        local.as_ref().map(|(l, e)| (l, e.clone())),
        1,
        rows.len(),
        batch,
    )?;
    let bound = extra.remove(0);
    let flag = |v: f64| Tensor::new(v as f32, device);
    let device_guard = !device.is_cpu() && cfg.optim.kind == crate::config::OptimizerKind::Adam;
    if !device_guard {
        let applied = loss.to_scalar::<f32>()?.is_finite()
            && check_finite_grads(&model.store, &grads).is_ok();
        if applied {
            opt.step(&grads, lr, None)?;
        }
        return Ok(VaeStepOutput {
            loss,
            bound,
            skipped: flag(if applied { 0.0 } else { 1.0 })?,
            applied: Some(applied),
        });
    }
    let mut guard = loss.detach();
    for (_, var) in model.store.iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            guard = (guard + (g.sum_all()? * 0.0)?)?;
        }
    }
    opt.step(&grads, lr, Some(&guard))?;
    // 0 * x is NaN exactly when x is NaN or infinite.
    let skipped = (&guard * 0.0)?
        .ne(0f32)?
        .to_dtype(candle_core::DType::F32)?;
    Ok(VaeStepOutput {
        loss,
        bound,
        skipped,
        applied: None,
    })
}
