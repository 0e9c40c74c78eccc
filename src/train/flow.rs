//! The flow family in the training loop: maximum likelihood by the change of variables
//! (RealNVP, Dinh et al. 2017) with data-dependent ActNorm initialization on the first rows of
//! the first epoch (at least [`ACTNORM_INIT_ROWS`] of them, see [`init_rows`]);
//! test bits/dim (images) or NLL (2-D points) at epoch ends; sample grids or density maps.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::{restore_optimizer, EpochEval, FinalEval, StepContext, StepOutput, Trainee};
use crate::checkpoint::{LoadedFile, OPTIM_FILE};
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::eval;
use crate::models::flow::{ACTNORM_INIT_ROWS, ACTNORM_MIN_ROWS};
use crate::models::Flow;
use crate::optim::{check_finite_grads, Optimizer};
use crate::session::{self, Datasets, Model};

/// A flow and its optimizer.
pub struct FlowTrainee {
    pub flow: Flow,
    pub opt: Optimizer,
    /// ActNorm still waits for its data-dependent initialization (fresh runs, before step 0).
    needs_init: bool,
}

impl FlowTrainee {
    /// A fresh flow for `cfg`.
    ///
    /// # Errors
    /// [`Error::Config`] when ActNorm is on and the training set has fewer than
    /// [`ACTNORM_MIN_ROWS`] rows: its data-dependent initialization could not estimate a spread.
    pub fn fresh(cfg: &Config, data: &Datasets, device: &Device) -> Result<Self> {
        let n = data.train.len();
        if cfg.model.flow.actnorm && n < ACTNORM_MIN_ROWS {
            return Err(Error::Config(format!(
                "model.flow.actnorm: ActNorm is initialized from the spread of each value over the \
                 training rows, which needs at least {ACTNORM_MIN_ROWS} of them; the training set \
                 has {n}{}: use more data or set model.flow.actnorm = false",
                if cfg.data.limit_train > 0 {
                    format!(" (data.limit_train = {})", cfg.data.limit_train)
                } else {
                    String::new()
                }
            )));
        }
        let flow = session::build_flow(cfg, data.image_shape(), device)?;
        let opt = Optimizer::new(&cfg.optim, &flow.store)?;
        Ok(FlowTrainee {
            needs_init: cfg.model.flow.actnorm,
            flow,
            opt,
        })
    }

    /// The flow and optimizer state of a checkpoint (whose data the caller has checked,
    /// [`session::LoadedCheckpoint::check_data`]).
    pub fn restore(cfg: &Config, ck: session::LoadedCheckpoint, device: &Device) -> Result<Self> {
        let Model::Flow(flow) = ck.model else {
            return Err(Error::checkpoint(&ck.dir, "not a flow checkpoint"));
        };
        let mut opt = Optimizer::new(&cfg.optim, &flow.store)?;
        let optim_file = LoadedFile::read(&ck.dir.join(OPTIM_FILE))?;
        restore_optimizer(&mut opt, &optim_file, "", device)?;
        Ok(FlowTrainee {
            flow,
            opt,
            needs_init: false,
        })
    }

    /// Turns a batch-mean NLL (nats per row) into the figure reported for this data:
    /// bits/dim for dequantized images, the NLL itself for 2-D points.
    fn figure(&self, nll: &Tensor) -> Result<(&'static str, Tensor)> {
        if self.flow.uses_logit() {
            let (shift, divisor) = crate::objectives::bits_per_dim_scale(self.flow.dim, true);
            let bpd = ((nll + shift)? / divisor)?;
            Ok(("bits_per_dim", bpd))
        } else {
            Ok(("nll", nll.clone()))
        }
    }
}

/// The training rows ActNorm is initialized on, given the first batch `first` of a fresh run
/// over `n` rows: that batch when it has at least [`ACTNORM_INIT_ROWS`] rows, otherwise the first
/// `ACTNORM_INIT_ROWS` rows (all `n` when fewer) of the first epoch's order, which begins with
/// that batch. A batch of one row has no spread to measure.
pub fn init_rows(seed: u64, n: usize, first: &[u32]) -> Vec<u32> {
    if first.len() >= ACTNORM_INIT_ROWS || first.len() >= n {
        return first.to_vec();
    }
    let mut order = crate::rng::epoch_permutation(seed, 0, n);
    order.truncate(ACTNORM_INIT_ROWS);
    order
}

impl Trainee for FlowTrainee {
    fn parameters(&self) -> Vec<candle_core::Var> {
        self.flow.store.vars()
    }

    fn numel(&self) -> usize {
        self.flow.store.numel()
    }

    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput> {
        // The global batch (its dequantization noise included) is drawn on every rank; each
        // trains on its rows of it (see crate::distributed).
        let x = data.batch(idx, ctx.step, ctx.device)?;
        if self.needs_init {
            // ActNorm's data-dependent start on the global batch, or on more rows when that is
            // small: identical on every rank.
            let init = init_rows(ctx.cfg.train.seed, data.len(), idx);
            let x_init = if init.len() == idx.len() {
                x.clone()
            } else {
                data.batch(&init, ctx.step, ctx.device)?
            };
            self.flow
                .initialize(&self.flow.to_model_space(&x_init)?.0)?;
            self.needs_init = false;
        }
        let rows = ctx.shard(idx.len());
        let local = if rows.is_empty() {
            None
        } else {
            let x = super::rows_of(&x, &rows)?;
            Some(self.flow.data_log_prob(&x)?.mean_all()?.neg()?)
        };
        if let (None, Some(l)) = (ctx.parallel, &local) {
            if !l.to_scalar::<f32>()?.is_finite() {
                // One process: no backward pass for a non-finite loss.
                return Ok(StepOutput {
                    values: vec![self.figure(&l.detach())?],
                    loss: l.clone(),
                    constants: Vec::new(),
                    skipped: Tensor::new(1f32, ctx.device)?,
                    applied: Some(false),
                });
            }
        }
        let vars = self.flow.store.vars();
        let (loss, _, grads) = super::averaged_backward(
            ctx.parallel,
            ctx.device,
            &vars,
            local.as_ref().map(|l| (l, Vec::new())),
            0,
            rows.len(),
            idx.len(),
        )?;
        let applied = loss.to_scalar::<f32>()?.is_finite()
            && check_finite_grads(&self.flow.store, &grads).is_ok();
        if applied {
            self.opt.step(&grads, ctx.lr, None)?;
        }
        Ok(StepOutput {
            values: vec![self.figure(&loss.detach())?],
            loss,
            constants: Vec::new(),
            skipped: Tensor::new(if applied { 0f32 } else { 1f32 }, ctx.device)?,
            applied: Some(applied),
        })
    }

    fn epoch_eval(&self, _cfg: &Config, data: &Datasets) -> Result<EpochEval> {
        let test = eval::evaluate_flow(&self.flow, &data.test, 0, 1000)?;
        let mut figures = vec![("test_nll", test.nll)];
        let summary = match test.bits_per_dim {
            Some(b) => {
                figures.push(("test_bits_per_dim", b));
                format!("test {b:.4} bits/dim ({:.2} nats)", test.nll)
            }
            None => format!("test NLL {:.4} nats", test.nll),
        };
        let mut score = None;
        if let Some(v) = &data.valid {
            let r = eval::evaluate_flow(&self.flow, v, 0, 1000)?;
            figures.push(("valid_nll", r.nll));
            score = Some(r.nll);
        }
        Ok(EpochEval {
            summary,
            figures,
            score,
        })
    }

    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()> {
        let extent = cfg
            .data
            .synthetic()
            .map(|s| s.extent())
            .unwrap_or((-6.0, 6.0));
        crate::samples::write_flow_samples(
            &self.flow,
            path,
            64,
            cfg.train.seed,
            epoch,
            data.image_shape(),
            extent,
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.flow.store.named_tensors()
    }

    fn optimizers(&self) -> Vec<(&'static str, &Optimizer)> {
        vec![("", &self.opt)]
    }

    fn finish(
        &self,
        cfg: &Config,
        data: &Datasets,
        _run_dir: &Path,
        _epoch_eval: Option<&[(&'static str, f64)]>,
    ) -> Result<FinalEval> {
        let r = eval::evaluate_flow(&self.flow, &data.test, cfg.eval.limit, 1000)?;
        let mut figures = vec![
            ("test_nll", r.nll),
            ("nll_stderr", r.nll_stderr),
            ("n", r.n as f64),
        ];
        if let Some(b) = r.bits_per_dim {
            figures.push(("bits_per_dim", b));
        }
        Ok(FinalEval {
            figures,
            report: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actnorm_initializes_on_enough_rows() {
        let order = crate::rng::epoch_permutation(7, 0, 2000);
        // A large first batch is used as it is.
        assert_eq!(init_rows(7, 2000, &order[..200]), order[..200].to_vec());
        // A batch of one row is extended along the first epoch's order.
        let init = init_rows(7, 2000, &order[..1]);
        assert_eq!(init.len(), ACTNORM_INIT_ROWS);
        assert_eq!(init, order[..ACTNORM_INIT_ROWS].to_vec());
        // A small training set is used whole.
        let order = crate::rng::epoch_permutation(7, 0, 40);
        assert_eq!(init_rows(7, 40, &order[..4]), order);
        assert_eq!(init_rows(7, 40, &order), order);
    }
}
