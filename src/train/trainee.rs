//! What the training loop asks of a model family: one optimizer step, an epoch-end evaluation,
//! sample grids, checkpoint contents and the end-of-run evaluation ([`Trainee`]), with the
//! step's context and outputs, and the data-parallel backward pass every family shares.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::FileContents;
use crate::config::Config;
use crate::data::DataSource;
use crate::error::Result;
use crate::eval;
use crate::session::Datasets;

/// Settings of one step handed to a [`Trainee`].
pub struct StepContext<'a> {
    pub cfg: &'a Config,
    /// Global optimizer step (keys every random draw of the step).
    pub step: u64,
    /// Epochs done, fractional (for warm-up schedules).
    pub epoch_progress: f64,
    pub lr: f64,
    pub device: &'a Device,
    /// This process's data-parallel group, if any: `idx` is then the global batch.
    pub parallel: Option<&'a crate::distributed::DataParallel>,
}

impl StepContext<'_> {
    /// This rank's rows of a global batch of `batch` rows (all of them in one process).
    pub fn shard(&self, batch: usize) -> std::ops::Range<usize> {
        self.parallel.map_or(0..batch, |p| p.shard(batch))
    }
}

/// The rows `rows` of a global-batch tensor (rows along dimension 0), contiguous; the tensor
/// itself when `rows` is all of it.
pub fn rows_of(t: &Tensor, rows: &std::ops::Range<usize>) -> Result<Tensor> {
    if rows.start == 0 && rows.end == t.dim(0)? {
        return Ok(t.clone());
    }
    Ok(t.narrow(0, rows.start, rows.len())?.contiguous()?)
}

/// The backward pass of a step's mean loss over this rank's `rows` of a global batch of `batch`
/// rows, with the gradients of `vars` and the scalars `[loss, extra..]` averaged over the
/// data-parallel group when there is one (see [`crate::distributed`]). `loss` is `None` for a
/// rank whose shard is empty (a short last batch): it contributes zeros, weighted 0.
/// Returns the (averaged) loss, the (averaged) extras and the gradients.
pub fn averaged_backward(
    parallel: Option<&crate::distributed::DataParallel>,
    device: &Device,
    vars: &[candle_core::Var],
    loss: Option<(&Tensor, Vec<Tensor>)>,
    extras: usize,
    rows: usize,
    batch: usize,
) -> Result<(Tensor, Vec<Tensor>, candle_core::backprop::GradStore)> {
    let zero = || Tensor::new(0f32, device);
    let (loss, extra, grads) = match loss {
        Some((l, extra)) => (l.clone(), extra, l.backward()?),
        None => {
            let z = zero()?;
            let grads = z.backward()?;
            let extra = (0..extras)
                .map(|_| zero())
                .collect::<candle_core::Result<_>>()?;
            (z, extra, grads)
        }
    };
    let Some(p) = parallel else {
        return Ok((loss, extra, grads));
    };
    let mut scalars = vec![loss.detach()];
    scalars.extend(extra.iter().map(Tensor::detach));
    let avg = p.average(vars, grads, &scalars, rows, batch)?;
    let mut s = avg.scalars.into_iter();
    let loss = s.next().expect("the loss was passed");
    Ok((loss, s.collect(), avg.grads))
}

/// What one update reports. The tensors are scalars on the training device, read only at
/// logging intervals (on a GPU each read waits for the device).
pub struct StepOutput {
    /// The loss that was minimized (the discriminator's for GANs).
    pub loss: Tensor,
    /// Named scalars averaged over the logging window; the first is shown in the progress bar.
    pub values: Vec<(&'static str, Tensor)>,
    /// Host-side figures logged as they are (schedules).
    pub constants: Vec<(&'static str, f64)>,
    /// 1 when the update was skipped because something was non-finite, else 0.
    pub skipped: Tensor,
    /// Whether the update was applied, when the host knows it at once; `None` when the device
    /// decided (fused Adam on a GPU reads the found-inf guard itself).
    pub applied: Option<bool>,
}

/// Figures of an epoch-end evaluation.
pub struct EpochEval {
    /// One line for the console.
    pub summary: String,
    pub figures: Vec<(&'static str, f64)>,
    /// Validation score (lower is better) that marks the best checkpoint.
    pub score: Option<f64>,
}

/// Figures of the end-of-training evaluation.
#[derive(Default)]
pub struct FinalEval {
    pub figures: Vec<(&'static str, f64)>,
    /// The full VAE evaluation report, when there is one.
    pub report: Option<eval::EvalReport>,
}

impl FinalEval {
    /// The figures of an end-of-training evaluation that is the epoch-end one: those of the
    /// epoch end when it ran at this step (same weights, same figures), else `compute()`'s.
    pub fn reusing(
        epoch_eval: Option<&[(&'static str, f64)]>,
        compute: impl FnOnce() -> Result<Vec<(&'static str, f64)>>,
    ) -> Result<Self> {
        let figures = match epoch_eval {
            Some(f) => f.to_vec(),
            None => compute()?,
        };
        Ok(FinalEval {
            figures,
            report: None,
        })
    }
}

/// A model of any family with its optimizer(s), as the training loop drives it.
pub trait Trainee {
    /// Trainable scalars.
    fn numel(&self) -> usize;
    /// The variables a data-parallel group keeps identical (broadcast at start, gradients
    /// averaged every step).
    fn parameters(&self) -> Vec<candle_core::Var>;
    /// One update on the rows `idx` of `data`.
    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput>;
    /// Evaluation at an epoch end.
    fn epoch_eval(&self, cfg: &Config, data: &Datasets) -> Result<EpochEval>;
    /// A sample grid (or, for 2-D data, a plot) at `path` after epoch `epoch`.
    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()>;
    /// The files of a checkpoint: `model.safetensors` with `metadata`, and optimizer state.
    /// Every tensor of `model.safetensors` (parameters and buffers), by PyTorch name.
    fn tensors(&self) -> Vec<(String, Tensor)>;
    /// The optimizers, each with the prefix of its state's names in `optim.safetensors`.
    fn optimizers(&self) -> Vec<(&'static str, &crate::optim::Optimizer)>;
    /// The files of a checkpoint at `epoch` with the model `metadata` (see
    /// [`super::checkpoint_contents`]).
    fn checkpoint_files(
        &self,
        cfg: &Config,
        metadata: std::collections::HashMap<String, String>,
        epoch: u64,
    ) -> Result<Vec<(&'static str, FileContents)>> {
        super::checkpoint_contents(cfg, self.tensors(), metadata, &self.optimizers(), epoch)
    }
    /// The end-of-training evaluation and pictures. `epoch_eval`: the figures of the epoch-end
    /// evaluation ([`Trainee::epoch_eval`]) when one ran at this very step, which a final
    /// evaluation that would only repeat it returns instead of recomputing.
    fn finish(
        &self,
        cfg: &Config,
        data: &Datasets,
        run_dir: &Path,
        epoch_eval: Option<&[(&'static str, f64)]>,
    ) -> Result<FinalEval>;
}
