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
    crate::device::set_tf32(cfg.train.tf32);
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
            None,
            crate::rng::Draws::for_device(&device),
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

/// Achieved memory bandwidth of one fused kernel.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    pub kernel: &'static str,
    pub elements: usize,
    /// Bytes each call reads and writes (the minimum the kernel must move).
    pub bytes_per_call: usize,
    pub microseconds_per_call: f64,
    pub gb_per_s: f64,
    /// `gb_per_s` over the device's copy bandwidth measured in the same run.
    pub fraction_of_copy: f64,
}

/// Times every fused kernel on `n` f32 elements (rows of 784) and a plain device copy as the
/// bandwidth reference; each figure is the mean of `repeats` calls after two warm-up calls,
/// with the device synchronized before the clock is read.
pub fn bench_kernels(
    device: &candle_core::Device,
    n: usize,
    repeats: usize,
) -> Result<Vec<KernelReport>> {
    use crate::ops::{adam, bernoulli, gaussian, linear, logsumexp, spectral_norm};
    use candle_core::{DType, Tensor};
    if n < 784 || repeats == 0 {
        return Err(Error::Config(
            "--elements must be at least 784 and --repeats at least 1".into(),
        ));
    }
    let d = 784;
    let rows = n / d;
    let n = rows * d;
    let u = |lo: f64, hi: f64| Tensor::rand(lo as f32, hi as f32, (rows, d), device);
    let (a, b, c) = (u(-3.0, 3.0)?, u(-3.0, 3.0)?, u(-3.0, 3.0)?);
    let bits = u(0.0, 1.0)?.ge(0.5)?.to_dtype(DType::F32)?;
    let g_rows = Tensor::rand(-1f32, 1f32, rows, device)?;
    let bias = Tensor::rand(-1f32, 1f32, d, device)?;
    let lse = logsumexp::logsumexp(&a)?;
    // Spectral norm on a 2048-row weight of about n values (a wide layer's shape; the kernels
    // give each block 32 columns, so a tall, narrow matrix would leave most SMs idle).
    let sn_cols = (n / 2048).max(1);
    let sn_w = Tensor::rand(-1f32, 1f32, (2048, sn_cols), device)?;
    let sn_u = Tensor::rand(-1f32, 1f32, 2048, device)?;
    let sn_bytes = (2 * 2048 * sn_cols + 3 * 2048 + 2 * sn_cols) * 4;
    let flat = a.flatten_all()?;
    let grad = b.flatten_all()?;
    let state = Tensor::zeros(2 * n + 1, DType::F32, device)?;
    let param = c.flatten_all()?.copy()?;
    let f = 4usize; // bytes per f32
    type Run<'a> = Box<dyn Fn() -> candle_core::Result<()> + 'a>;
    let cases: Vec<(&'static str, usize, Run)> = vec![
        ("copy", 2 * n * f, Box::new(|| a.copy().map(|_| ()))),
        (
            "reparameterize",
            4 * n * f,
            Box::new(|| gaussian::reparameterize(&a, &b, &c).map(|_| ())),
        ),
        (
            "gaussian_kl",
            (2 * n + rows) * f,
            Box::new(|| gaussian::gaussian_kl(&a, &b).map(|_| ())),
        ),
        (
            "gaussian_log_density",
            (3 * n + rows) * f,
            Box::new(|| gaussian::gaussian_log_density(&a, &b, &c).map(|_| ())),
        ),
        (
            "bernoulli_loglik",
            (2 * n + rows) * f,
            Box::new(|| bernoulli::bernoulli_log_likelihood(&a, &bits).map(|_| ())),
        ),
        (
            "bernoulli_loglik_bwd",
            (3 * n + rows) * f,
            Box::new(|| {
                a.apply_op3_no_bwd(&bits, &g_rows, &bernoulli::BernoulliBackward)
                    .map(|_| ())
            }),
        ),
        (
            "logsumexp",
            (n + rows) * f,
            Box::new(|| logsumexp::logsumexp(&a).map(|_| ())),
        ),
        (
            "logsumexp_bwd",
            (2 * n + 2 * rows) * f,
            Box::new(|| {
                a.apply_op3_no_bwd(&lse, &g_rows, &logsumexp::LogSumExpBackward)
                    .map(|_| ())
            }),
        ),
        (
            // One iteration reads W twice (W^T u, then W v).
            "spectral_norm_power_iteration",
            sn_bytes,
            Box::new(|| spectral_norm::power_iteration(&sn_w, &sn_u, 1).map(|_| ())),
        ),
        (
            "spectral_norm_power_iteration_candle_ops",
            sn_bytes,
            Box::new(|| spectral_norm::power_iteration_slow(&sn_w, &sn_u, 1).map(|_| ())),
        ),
        (
            "bias_act_tanh",
            (2 * n + d) * f,
            Box::new(|| linear::bias_act(&a, &bias, linear::Activation::Tanh).map(|_| ())),
        ),
        (
            "activation_bwd_tanh",
            3 * n * f,
            Box::new(|| {
                b.apply_op2_no_bwd(
                    &a,
                    &linear::ActivationBackward {
                        act: linear::Activation::Tanh,
                    },
                )
                .map(|_| ())
            }),
        ),
        (
            "adam_moments",
            6 * n * f,
            Box::new(|| {
                state.inplace_op3(
                    &grad,
                    &param,
                    &adam::AdamMoments {
                        beta1: 0.9,
                        beta2: 0.999,
                        weight_decay: 0.0,
                    },
                )
            }),
        ),
        (
            "adam_apply",
            4 * n * f,
            Box::new(|| {
                param.inplace_op2(
                    &state,
                    &adam::AdamApply {
                        lr: 1e-9,
                        eps: 1e-8,
                        bias_correction1: 0.1,
                        bias_correction2: 0.001,
                    },
                )
            }),
        ),
    ];
    let _ = &flat;
    let mut out = Vec::new();
    let mut copy_gbs = f64::NAN;
    for (name, bytes, run) in &cases {
        run()?;
        run()?;
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..repeats {
            run()?;
        }
        device.synchronize()?;
        let secs = t0.elapsed().as_secs_f64() / repeats as f64;
        let gbs = *bytes as f64 / secs / 1e9;
        if *name == "copy" {
            copy_gbs = gbs;
        }
        out.push(KernelReport {
            kernel: name,
            elements: n,
            bytes_per_call: *bytes,
            microseconds_per_call: secs * 1e6,
            gb_per_s: gbs,
            fraction_of_copy: gbs / copy_gbs,
        });
    }
    Ok(out)
}
