//! The training loop: seeded minibatches, one optimizer step per batch, metrics at a fixed
//! cadence, evaluation, sample grids and crash-safe checkpoints at epoch ends, and exact resume.
//!
//! Determinism: on the CPU, for a given seed and thread count, a run is bit-for-bit reproducible,
//! and a run resumed from any checkpoint continues exactly as the uninterrupted run (every random
//! draw is keyed by seed, stream and step, see [`crate::rng`]).

use std::path::PathBuf;

use crate::config::Config;
use crate::error::Result;
use crate::eval;

pub mod checkpoints;
pub mod diffusion;
pub mod flow;
pub mod gan;
pub mod progress;
mod run;
mod signals;
pub mod trainee;
pub mod vae;

pub use checkpoints::{checkpoint_contents, optim_contents, restore_optimizer};
pub use trainee::{
    averaged_backward, rows_of, EpochEval, FinalEval, StepContext, StepOutput, Trainee,
};

pub use diffusion::DiffusionTrainee;
pub use flow::FlowTrainee;
pub use gan::GanTrainee;
pub use vae::{train_step, VaeStepOutput, VaeTrainee};

/// Where and how to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Run directory.
    pub out: PathBuf,
    /// Resume from this run or checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Stop after this many optimizer steps in this process (tests of resume; None: run to the end).
    pub max_steps: Option<u64>,
    /// Install SIGINT/SIGTERM handlers: the first signal finishes the current step, writes a
    /// checkpoint and returns; a second one exits at once without touching saved checkpoints.
    pub handle_signals: bool,
    /// Join a data-parallel group (see [`crate::distributed`]); `None` trains in this process
    /// alone. Only rank 0 writes into the run directory.
    pub parallel: Option<crate::distributed::ParallelSpec>,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    /// Trainable scalars (a data-parallel step all-reduces this many gradients).
    pub parameters: usize,
    /// Ranks that trained together (1 for one process).
    pub world_size: usize,
    pub epochs: usize,
    pub samples_per_s: f64,
    pub test_elbo: Option<f64>,
    /// Figures of the last epoch-end evaluation.
    pub last_eval: std::collections::BTreeMap<String, f64>,
    /// Figures of the end-of-training evaluation (any family).
    pub final_figures: std::collections::BTreeMap<String, f64>,
    pub final_eval: Option<eval::EvalReport>,
    pub seconds: f64,
    /// True when a signal stopped the run early (a checkpoint was written).
    pub interrupted: bool,
}

/// Trains according to `cfg`, writing everything into `opts.out` (see the `run` module for the
/// steps).
///
/// # Errors
/// Bad data, config or checkpoint, a device or group failure, or a non-finite loss under
/// `train.on_nonfinite = "stop"` (the last checkpoint is kept).
/// A fresh model of `cfg`'s family with its optimizer(s), as a training run starts it (what
/// `trainer bench` times).
pub fn fresh_trainee(
    cfg: &Config,
    data: &crate::session::Datasets,
    device: &candle_core::Device,
) -> Result<Box<dyn Trainee>> {
    Ok(checkpoints::start(cfg, None, data, device)?.0)
}

pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let mut run = run::Run::start(cfg, opts)?;
    let t_train = std::time::Instant::now();
    let interrupted = run.train_loop()?;
    run.finish(interrupted, t_train.elapsed().as_secs_f64())
}
