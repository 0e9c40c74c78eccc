//! `trainer bench`: training-step throughput (samples/s) of a config, measured over the same code
//! path as `trainer train` (batch gathering, dynamic binarization, noise, forward, backward,
//! optimizer), after a warm-up. `scripts/bench_cpu.py` runs it beside PyTorch.

use std::time::Instant;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::optim::{learning_rate, Optimizer};
use crate::rng::epoch_permutation;
use crate::session;
use crate::train::train_step;

/// Throughput figures of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub framework: &'static str,
    pub mode: &'static str,
    pub device: String,
    pub threads: usize,
    pub batch: usize,
    pub k: usize,
    pub steps: usize,
    pub samples_per_s: f64,
    pub ms_per_step: f64,
}

/// Runs `warmup` untimed and `steps` timed training steps.
pub fn bench(cfg: &Config, steps: usize, warmup: usize) -> Result<BenchReport> {
    if steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    let device = crate::device::open_device(&cfg.train.device)?;
    let data = session::load_datasets(cfg)?;
    let model = session::build_model(cfg, data.dim(), &device)?;
    let mut opt = Optimizer::new(&cfg.optim, &model.store)?;
    let n = data.train.len();
    let bs = cfg.train.batch_size.min(n);
    let per_epoch = n / bs;
    let lr = learning_rate(&cfg.optim, 0);
    let mut perm = epoch_permutation(cfg.train.seed, 0, n);
    let mut t0 = Instant::now();
    for s in 0..warmup + steps {
        if s == warmup {
            device.synchronize()?;
            t0 = Instant::now();
        }
        let within = s % per_epoch.max(1);
        if within == 0 && s > 0 {
            perm = epoch_permutation(cfg.train.seed, (s / per_epoch.max(1)) as u64, n);
        }
        let idx = &perm[within * bs..(within + 1) * bs];
        train_step(
            &model,
            &mut opt,
            cfg,
            &data.train,
            idx,
            s as u64,
            cfg.objective.beta,
            lr,
            &device,
        )?;
    }
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(BenchReport {
        framework: "gentrain",
        mode: if device.is_cpu() { "cpu" } else { "cuda" },
        device: cfg.train.device.clone(),
        threads: rayon::current_num_threads(),
        batch: bs,
        k: cfg.objective.k,
        steps,
        samples_per_s: (steps * bs) as f64 / secs,
        ms_per_step: secs * 1e3 / steps as f64,
    })
}
