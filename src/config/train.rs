//! `[train]`: the training loop's length, batch, seed, device and cadences. Every field may
//! change on resume.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Training-loop settings (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Epochs (passes over the training set) the run trains in all. Default: 10.
    pub epochs: usize,
    /// Rows per optimizer step (the global batch of a data-parallel group). Default: 128.
    pub batch_size: usize,
    /// Seed of every random stream (initialization, shuffling, binarization, noise).
    /// Default: 0.
    pub seed: u64,
    /// CPU threads (0: all cores). Default: 0.
    pub threads: usize,
    /// Device: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. Default: `cpu`.
    pub device: String,
    /// Log training metrics every N optimizer steps (and at every epoch end); for a GAN a step
    /// is one discriminator update. Default: 50.
    pub log_every: usize,
    /// Evaluate on the test set every N epochs and after the last (0: never during training).
    /// Default: 1.
    pub eval_every: usize,
    /// Write a checkpoint every N epochs (0: only the final one; the final epoch always writes
    /// one). Default: 1.
    pub checkpoint_every: usize,
    /// Also write a checkpoint every N optimizer steps (0: off). Default: 0.
    pub checkpoint_every_steps: usize,
    /// Write a sample grid every N epochs (0: only at the end). Default: 1.
    pub sample_every: usize,
    /// What to do when the loss or a gradient is NaN or infinite: `stop` or `skip`
    /// ([`NonFinitePolicy`]). Default: `stop`.
    pub on_nonfinite: NonFinitePolicy,
    /// Checkpoints to keep in the run directory, newest first (0: all). Default: 3.
    pub keep_checkpoints: usize,
    /// Allow TF32 tensor-core GEMMs on CUDA devices (no effect on the CPU). Default: `true`.
    pub tf32: bool,
}

/// Policy for a non-finite loss or gradient (`train.on_nonfinite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Stop with an error; the last checkpoint is left as it was.
    #[default]
    Stop,
    /// Skip the update (counted and logged) and go on.
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            seed: 0,
            threads: 0,
            device: "cpu".into(),
            log_every: 50,
            eval_every: 1,
            checkpoint_every: 1,
            checkpoint_every_steps: 0,
            sample_every: 1,
            on_nonfinite: NonFinitePolicy::Stop,
            keep_checkpoints: 3,
            tf32: true,
        }
    }
}

/// A parsed device request (`train.device`); `device::open_device` opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

/// Parses `cpu | cuda | cuda:N`.
pub fn parse_device_spec(s: &str) -> Result<DeviceSpec> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => Err(Error::Device(format!(
                "unknown device {s:?}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}
