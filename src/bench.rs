//! `trainer bench`: training-step throughput (samples/s) of a config, measured over the same code
//! path as `trainer train` (batch gathering, dynamic binarization, noise, forward, backward,
//! optimizer), after a warm-up. `scripts/bench_cpu.py` runs it beside PyTorch.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::optim::learning_rate_at;
use crate::rng::epoch_permutation;
use crate::session;

/// Throughput figures of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub framework: &'static str,
    /// The model family timed (`vae`, `flow`, `gan` or `diffusion`).
    pub family: &'static str,
    pub mode: &'static str,
    pub device: String,
    pub threads: usize,
    pub batch: usize,
    pub k: usize,
    pub steps: usize,
    pub samples_per_s: f64,
    pub ms_per_step: f64,
}

/// Runs `warmup` untimed and `steps` timed training steps of the configured family, through
/// the same `Trainee::step` that `trainer train` runs (every player of a GAN, `n_critic`,
/// spectral norm and penalties; a diffusion model's loss and EMA update; a VAE at any k and
/// depth). The timed steps end with a device synchronization; every step's loss is read on the
/// host, as training reads it.
pub fn bench(cfg: &Config, steps: usize, warmup: usize) -> Result<BenchReport> {
    if steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    let device = crate::device::open_device(&cfg.train.device)?;
    crate::device::set_tf32(cfg.train.tf32);
    let data = session::load_datasets(cfg)?;
    crate::memory::check_training(cfg, data.dim(), data.train.len())?;
    let mut trainee = crate::train::fresh_trainee(cfg, &data, &device)?;
    let n = data.train.len();
    let bs = cfg.train.batch_size.min(n);
    let per_epoch = n / bs;
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
        let ctx = crate::train::StepContext {
            cfg,
            step: s as u64,
            epoch_progress: 0.0,
            lr: learning_rate_at(&cfg.optim, 0, s as u64),
            device: &device,
            parallel: None,
        };
        trainee.step(&ctx, &data.train, idx)?;
    }
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(BenchReport {
        framework: "gentrain",
        family: cfg.model.family.as_str(),
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

/// The inputs every benchmarked kernel reads: `rows x 784` f32 tensors on one device, a
/// 2048-row spectral-norm weight of about as many values, and one diffusion time index per row
/// with the 1000-step table of `q_sample`.
pub struct KernelInputs {
    /// Rows of 784 values.
    pub rows: usize,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    bits: Tensor,
    g_rows: Tensor,
    bias: Tensor,
    lse: Tensor,
    sn_w: Tensor,
    sn_u: Tensor,
    state: Tensor,
    grad: Tensor,
    param: Tensor,
    /// `(rows,)` u32 time indices below 1000.
    t: Tensor,
    /// `(1000, 2)` `[sqrt(abar_t), sqrt(1 - abar_t)]` of the linear beta schedule.
    table: Tensor,
}

/// Steps of the benchmarks' diffusion schedule.
const DIFFUSION_STEPS: usize = 1000;

/// `abar_t` of the linear beta schedule from 1e-4 to 0.02 (Ho et al. 2020), in f64.
fn diffusion_abars() -> Vec<f64> {
    let mut abar = 1.0;
    (0..DIFFUSION_STEPS)
        .map(|i| {
            abar *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / (DIFFUSION_STEPS - 1) as f64);
            abar
        })
        .collect()
}

/// Values per row of the benchmark inputs (an MNIST image).
const ROW: usize = 784;

impl KernelInputs {
    /// Seeded-uniform inputs of `n` values (rounded down to whole rows of 784) on `device`.
    ///
    /// # Errors
    /// [`Error::Config`] when `n` is under one row.
    pub fn new(device: &Device, n: usize) -> Result<Self> {
        if n < ROW {
            return Err(Error::Config("--elements must be at least 784".into()));
        }
        let rows = n / ROW;
        // Three inputs, the bits, the Adam state (2n) and parameter copy, and a kernel's output.
        crate::memory::check(
            &format!("--elements {n}"),
            crate::memory::f32_bytes(&[rows, ROW, 10]),
        )?;
        let u = |lo: f32, hi: f32| Tensor::rand(lo, hi, (rows, ROW), device);
        let (a, b, c) = (u(-3.0, 3.0)?, u(-3.0, 3.0)?, u(-3.0, 3.0)?);
        let sn_cols = (rows * ROW / 2048).max(1);
        Ok(KernelInputs {
            rows,
            bits: u(0.0, 1.0)?.ge(0.5)?.to_dtype(DType::F32)?,
            g_rows: Tensor::rand(-1f32, 1f32, rows, device)?,
            bias: Tensor::rand(-1f32, 1f32, ROW, device)?,
            lse: crate::ops::logsumexp::logsumexp(&a)?,
            // A wide layer's shape: the kernels give each block 32 columns, so a tall, narrow
            // matrix would leave most SMs idle.
            sn_w: Tensor::rand(-1f32, 1f32, (2048, sn_cols), device)?,
            sn_u: Tensor::rand(-1f32, 1f32, 2048, device)?,
            state: Tensor::zeros(2 * rows * ROW + 1, DType::F32, device)?,
            grad: b.flatten_all()?,
            param: c.flatten_all()?.copy()?,
            t: Tensor::from_vec(
                (0..rows)
                    .map(|i| (i * 7919 % DIFFUSION_STEPS) as u32)
                    .collect::<Vec<_>>(),
                rows,
                device,
            )?,
            table: Tensor::from_vec(
                diffusion_abars()
                    .iter()
                    .flat_map(|a| [a.sqrt() as f32, (1.0 - a).sqrt() as f32])
                    .collect::<Vec<_>>(),
                (DIFFUSION_STEPS, 2),
                device,
            )?,
            a,
            b,
            c,
        })
    }

    /// Values per input.
    pub fn elements(&self) -> usize {
        self.rows * ROW
    }
}

/// One call of a benchmarked kernel.
pub type KernelCall<'a> = Box<dyn Fn() -> candle_core::Result<()> + 'a>;

/// The benchmarked kernels, one table for `trainer bench-kernels` and the criterion benchmarks:
/// `(name, bytes each call must read and write, the call)`, a plain device copy first as the
/// bandwidth reference.
pub fn kernel_cases(x: &KernelInputs) -> Vec<(&'static str, usize, KernelCall<'_>)> {
    use crate::ops::{adam, bernoulli, gaussian, linear, logsumexp, spectral_norm};
    let (n, rows, f) = (x.elements(), x.rows, 4usize);
    let sn_cols = x.sn_w.dim(1).unwrap_or(1);
    let sn_bytes = (2 * 2048 * sn_cols + 3 * 2048 + 2 * sn_cols) * f;
    let tanh = linear::Activation::Tanh;
    let moments = adam::AdamMoments {
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.0,
    };
    let apply = adam::AdamApply {
        lr: 1e-9,
        eps: 1e-8,
        bias_correction1: 0.1,
        bias_correction2: 0.001,
    };
    let (a, b, c, bits, g_rows) = (&x.a, &x.b, &x.c, &x.bits, &x.g_rows);
    let mut cases: Vec<(&'static str, usize, KernelCall<'_>)> = vec![
        ("copy", 2 * n * f, Box::new(move || a.copy().map(drop))),
        (
            "reparameterize",
            4 * n * f,
            Box::new(move || gaussian::reparameterize(a, b, c).map(drop)),
        ),
        (
            "gaussian_kl",
            (2 * n + rows) * f,
            Box::new(move || gaussian::gaussian_kl(a, b).map(drop)),
        ),
        (
            "gaussian_log_density",
            (3 * n + rows) * f,
            Box::new(move || gaussian::gaussian_log_density(a, b, c).map(drop)),
        ),
        (
            "bernoulli_loglik",
            (2 * n + rows) * f,
            Box::new(move || bernoulli::bernoulli_log_likelihood(a, bits).map(drop)),
        ),
        (
            "bernoulli_loglik_bwd",
            (3 * n + rows) * f,
            Box::new(move || {
                a.apply_op3_no_bwd(bits, g_rows, &bernoulli::BernoulliBackward)
                    .map(drop)
            }),
        ),
        (
            "logsumexp",
            (n + rows) * f,
            Box::new(move || logsumexp::logsumexp(a).map(drop)),
        ),
        (
            "logsumexp_bwd",
            (2 * n + 2 * rows) * f,
            Box::new(move || {
                a.apply_op3_no_bwd(&x.lse, g_rows, &logsumexp::LogSumExpBackward)
                    .map(drop)
            }),
        ),
        (
            // One iteration reads W twice (W^T u, then W v).
            "spectral_norm_power_iteration",
            sn_bytes,
            Box::new(move || spectral_norm::power_iteration(&x.sn_w, &x.sn_u, 1).map(drop)),
        ),
        (
            "spectral_norm_power_iteration_candle_ops",
            sn_bytes,
            Box::new(move || spectral_norm::power_iteration_slow(&x.sn_w, &x.sn_u, 1).map(drop)),
        ),
        (
            "bias_act_tanh",
            (2 * n + ROW) * f,
            Box::new(move || linear::bias_act(a, &x.bias, tanh).map(drop)),
        ),
        (
            "activation_bwd_tanh",
            3 * n * f,
            Box::new(move || {
                b.apply_op2_no_bwd(a, &linear::ActivationBackward { act: tanh })
                    .map(drop)
            }),
        ),
        (
            "adam_moments",
            6 * n * f,
            Box::new(move || x.state.inplace_op3(&x.grad, &x.param, &moments)),
        ),
        (
            "adam_apply",
            4 * n * f,
            Box::new(move || x.param.inplace_op2(&x.state, &apply)),
        ),
    ];
    cases.extend(diffusion_cases(x));
    cases
}

/// The diffusion family's rows of [`kernel_cases`]: the forward process with its loss, and one
/// sampler update.
fn diffusion_cases(x: &KernelInputs) -> Vec<(&'static str, usize, KernelCall<'_>)> {
    use crate::ops::diffusion;
    let (n, rows, f) = (x.elements(), x.rows, 4usize);
    let (a, b, c) = (&x.a, &x.b, &x.c);
    // A DDIM step (eta = 0.5, clipped) from abar 0.5 to 0.6: every term of the update runs.
    let (abar, prev) = (0.5f64, 0.6f64);
    let sigma = 0.5 * ((1.0 - prev) / (1.0 - abar)).sqrt() * (1.0 - abar / prev).sqrt();
    let ddim = diffusion::SamplerCoefficients {
        sqrt_recip_abar: (1.0 / abar).sqrt() as f32,
        sqrt_recipm1_abar: (1.0 / abar - 1.0).sqrt() as f32,
        clip: Some((-1.0, 1.0)),
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        c_x0: prev.sqrt() as f32,
        c_xt: 0.0,
        c_eps: (1.0 - prev - sigma * sigma).sqrt() as f32,
        sigma: sigma as f32,
    };
    vec![
        (
            // x_t = q_sample(x0, eps, t) (reads 2n and the indices, writes n), then its loss
            // against eps (reads 2n, writes one value per row).
            "q_sample+simple_loss",
            (5 * n + 2 * rows) * f,
            Box::new(move || {
                let x_t = diffusion::q_sample(a, b, &x.t, &x.table)?;
                diffusion::simple_loss(&x_t, b).map(drop)
            }),
        ),
        (
            "sampler_step",
            4 * n * f,
            Box::new(move || diffusion::sampler_step(a, b, c, &ddim).map(drop)),
        ),
    ]
}

/// Times every kernel of [`kernel_cases`] on `n` f32 elements (rows of 784) against a plain
/// device copy as the bandwidth reference; each figure is the mean of `repeats` calls after two
/// warm-up calls, with the device synchronized before the clock is read.
///
/// # Errors
/// [`Error::Config`] for `n` under 784 or `repeats` 0; device errors.
pub fn bench_kernels(device: &Device, n: usize, repeats: usize) -> Result<Vec<KernelReport>> {
    if repeats == 0 {
        return Err(Error::Config("--repeats must be at least 1".into()));
    }
    let inputs = KernelInputs::new(device, n)?;
    let mut out = Vec::new();
    let mut copy_gbs = f64::NAN;
    for (name, bytes, run) in &kernel_cases(&inputs) {
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
            elements: inputs.elements(),
            bytes_per_call: *bytes,
            microseconds_per_call: secs * 1e6,
            gb_per_s: gbs,
            fraction_of_copy: gbs / copy_gbs,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_case_runs_on_the_cpu() {
        let r = bench_kernels(&Device::Cpu, 4 * ROW, 1).unwrap();
        let names: Vec<&str> = r.iter().map(|k| k.kernel).collect();
        for name in ["copy", "q_sample+simple_loss", "sampler_step"] {
            assert!(names.contains(&name), "no {name} in {names:?}");
        }
        assert!(
            r.iter().all(|k| k.microseconds_per_call.is_finite()),
            "{r:?}"
        );
    }
}
