//! Device-against-CPU checks of every fused kernel, the GPU acceptance test of the CUDA path.
//!
//! Each check builds seeded random inputs of shapes that are not multiples of the 256-thread
//! block, runs the op and its backward (against a random upstream gradient) on the CPU and on the
//! device under test, and compares outputs and gradients by relative error
//! (`|a - b| <= tol (1 + |b|)`). Device outputs are poisoned with NaN before every launch
//! (`GENTRAIN_POISON_OUTPUTS=1`, set by [`run_all`]), so an element a kernel never writes fails.
//! `trainer check-kernels --device cuda:0` runs them on a GPU machine (no Rust needed there);
//! `tests/gpu_kernels.rs` runs the same functions under `cargo test --features cuda -- --ignored`.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ops::{bernoulli, diffusion, gaussian, linear, logsumexp, spectral_norm};
use crate::rng::Draws;

/// Shapes (rows, columns) every row and elementwise kernel is checked on.
pub const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 257),
    (129, 784),
    (1000, 50),
    (7, 1025),
    (513, 3),
];

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub check: String,
    /// Largest `|a - b| / (1 + |b|)` seen over finite outputs and gradients (NaN when the check
    /// failed before any comparison).
    pub max_rel_err: f32,
    pub tolerance: f32,
    /// True when every output and gradient agreed within `tolerance` and in class (NaN, `+inf`,
    /// `-inf`, finite).
    pub passed: bool,
    /// Why the check failed: the first disagreeing element, or the error that stopped it.
    pub error: Option<String>,
}

/// Runs one check body and turns its outcome, whatever it is, into a report: a failure is
/// recorded, never returned, so every check runs.
fn report(check: String, tolerance: f32, body: impl FnOnce() -> Result<f32>) -> CheckReport {
    match body() {
        Ok(e) => CheckReport {
            check,
            max_rel_err: e,
            tolerance,
            passed: true,
            error: None,
        },
        Err(e) => CheckReport {
            check,
            max_rel_err: f32::NAN,
            tolerance,
            passed: false,
            error: Some(e.to_string()),
        },
    }
}

fn random(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Replaces about one value in 11 by one of `specials` (cycling), at seeded positions: the
/// non-finite and overflowing inputs on which the CPU and the device must agree as well.
fn sprinkle(v: &mut [f32], seed: u64, specials: &[f32]) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut k = 0;
    for x in v.iter_mut() {
        if rng.random_range(0..11) == 0 {
            *x = specials[k % specials.len()];
            k += 1;
        }
    }
    if k == 0 && !v.is_empty() {
        v[0] = specials[0];
    }
}

/// NaN, both infinities, and arguments whose exponential overflows or underflows in f32.
const SPECIALS: &[f32] = &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 200.0, -200.0];

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
}

fn class(v: f32) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v == f32::INFINITY {
        "+inf"
    } else if v == f32::NEG_INFINITY {
        "-inf"
    } else {
        "finite"
    }
}

fn mismatch(msg: String) -> Error {
    Error::NonFinite(msg)
}

/// Max relative error of `got` against `want` over finite pairs; an error at the first element
/// whose class (NaN, `+inf`, `-inf`, finite) differs or whose error exceeds `tol`.
fn compare(got: &Tensor, want: &Tensor, tol: f32, what: &str) -> Result<f32> {
    let (g, w) = (host(got)?, host(want)?);
    if g.len() != w.len() {
        return Err(mismatch(format!(
            "{what}: {} values on the device, {} on the CPU",
            g.len(),
            w.len()
        )));
    }
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if class(*a) != class(*b) {
            let hint = if a.is_nan() {
                " (NaN can mark an output the kernel did not write)"
            } else {
                ""
            };
            return Err(mismatch(format!("{what}[{i}]: device {a}, CPU {b}{hint}")));
        }
        if b.is_finite() {
            let e = (a - b).abs() / (1.0 + b.abs());
            if e > tol {
                return Err(mismatch(format!(
                    "{what}[{i}]: device {a} vs CPU {b} (relative error {e:.2e} > {tol:.0e})"
                )));
            }
            worst = worst.max(e);
        }
    }
    Ok(worst)
}

type Op<'a> = &'a dyn Fn(&[&Tensor]) -> candle_core::Result<Tensor>;

/// Runs `op` on the CPU and on `dev` with the same inputs and upstream gradient and compares
/// outputs (tolerance `tol`) and input gradients (`10 tol`); returns the largest error.
fn compare_op(
    dev: &Device,
    name: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    tol: f32,
    op: Op,
) -> Result<f32> {
    let mut results = Vec::new();
    for d in [&Device::Cpu, dev] {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(v, s)| Var::from_tensor(&Tensor::from_vec(v.clone(), s.as_slice(), d)?))
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let y = op(&ts)?;
        let up = Tensor::from_vec(random(99, y.elem_count(), -1.0, 1.0), y.shape(), d)?;
        let grads = (&y * &up)?.sum_all()?.backward()?;
        let gs: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        results.push((y, gs));
    }
    let mut worst = compare(
        &results[1].0,
        &results[0].0,
        tol,
        &format!("{name} forward"),
    )?;
    for (i, (a, b)) in results[1].1.iter().zip(&results[0].1).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                worst = worst.max(compare(
                    a,
                    b,
                    tol * 10.0,
                    &format!("{name} gradient of input {i}"),
                )?)
            }
            (None, None) => {}
            _ => {
                return Err(mismatch(format!(
                    "{name}: gradient of input {i} exists on one device only"
                )))
            }
        }
    }
    Ok(worst)
}

/// [`compare_op`] as a report named `name`.
fn check(
    dev: &Device,
    name: String,
    inputs: &[(Vec<f32>, Vec<usize>)],
    tol: f32,
    op: Op,
) -> CheckReport {
    report(name.clone(), tol, || {
        compare_op(dev, &name, inputs, tol, op)
    })
}

/// Reparameterization, Gaussian KL and Gaussian log-density on every shape, then once more on
/// inputs with NaN, infinities and overflowing log-variances.
pub fn check_gaussian(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        let s = 10 * i as u64;
        let n = r * c;
        let shape = vec![r, c];
        let (mut mu, mut lv, mut eps) = (
            random(s, n, -3.0, 3.0),
            random(s + 1, n, -8.0, 8.0),
            random(s + 2, n, -3.0, 3.0),
        );
        let mut suffix = "";
        for special in [false, true] {
            if special {
                // Only the largest shape: the aim is the semantics, not the coverage of shapes.
                if (r, c) != (129, 784) {
                    break;
                }
                sprinkle(&mut mu, s + 3, SPECIALS);
                sprinkle(&mut lv, s + 4, SPECIALS);
                sprinkle(&mut eps, s + 5, SPECIALS);
                suffix = " non-finite";
            }
            let three = [
                (mu.clone(), shape.clone()),
                (lv.clone(), shape.clone()),
                (eps.clone(), shape.clone()),
            ];
            out.push(check(
                dev,
                format!("reparameterize {r}x{c}{suffix}"),
                &three,
                1e-5,
                &|t| gaussian::reparameterize(t[0], t[1], t[2]),
            ));
            out.push(check(
                dev,
                format!("gaussian_kl {r}x{c}{suffix}"),
                &three[..2],
                1e-5,
                &|t| gaussian::gaussian_kl(t[0], t[1]),
            ));
            let zml = [three[2].clone(), three[0].clone(), three[1].clone()];
            out.push(check(
                dev,
                format!("gaussian_log_density {r}x{c}{suffix}"),
                &zml,
                1e-5,
                &|t| gaussian::gaussian_log_density(t[0], t[1], t[2]),
            ));
        }
    }
    out
}

/// Bernoulli log-likelihood (forward and its fused backward) on every shape, and on logits with
/// NaN and infinities.
pub fn check_bernoulli(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    let shapes = SHAPES
        .iter()
        .map(|&s| (s, false))
        .chain([((129, 784), true)]);
    for (i, ((r, c), special)) in shapes.enumerate() {
        let mut logits = random(i as u64, r * c, -30.0, 30.0);
        if special {
            sprinkle(&mut logits, 77, SPECIALS);
        }
        let x: Vec<f32> = random(i as u64 + 7, r * c, 0.0, 1.0)
            .into_iter()
            .map(|u| (u < 0.3) as u8 as f32)
            .collect();
        let op = move |t: &[&Tensor]| {
            let x = Tensor::from_vec(x.clone(), (r, c), t[0].device())?;
            bernoulli::bernoulli_log_likelihood(t[0], &x)
        };
        let suffix = if special { " non-finite" } else { "" };
        out.push(check(
            dev,
            format!("bernoulli_log_likelihood {r}x{c}{suffix}"),
            &[(logits, vec![r, c])],
            1e-5,
            &op,
        ));
    }
    out
}

/// Log-sum-exp (forward and backward) on every shape, with some `-inf` log-weights; then rows
/// with NaN and `+inf` log-weights and rows that are all `-inf` or all NaN.
pub fn check_logsumexp(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    for (i, &(r, k)) in SHAPES.iter().enumerate() {
        let mut a = random(i as u64, r * k, -60.0, 20.0);
        for (j, v) in a.iter_mut().enumerate() {
            if j % 7 == 3 {
                *v = f32::NEG_INFINITY;
            }
        }
        out.push(check(
            dev,
            format!("logsumexp {r}x{k}"),
            &[(a, vec![r, k])],
            1e-5,
            &|t| logsumexp::logsumexp(t[0]),
        ));
    }
    let (r, k) = (64, 300);
    let mut a = random(5, r * k, -60.0, 20.0);
    for (row, chunk) in a.chunks_mut(k).enumerate() {
        match row % 4 {
            0 => sprinkle(chunk, row as u64, &[f32::NAN]),
            1 => sprinkle(chunk, row as u64, &[f32::INFINITY]),
            2 => chunk.fill(f32::NEG_INFINITY),
            _ if row == 3 => chunk.fill(f32::NAN),
            _ => {}
        }
    }
    out.push(check(
        dev,
        format!("logsumexp {r}x{k} non-finite"),
        &[(a, vec![r, k])],
        1e-5,
        &|t| logsumexp::logsumexp(t[0]),
    ));
    out
}

/// Spectral-norm power iteration (1 and 3 iterations; `[u, v, sigma]` compared) on weight
/// shapes that are not multiples of the kernels' 32-column and 8-row tiles, including a
/// flattened convolution kernel; then `W / sigma(W)` with its gradient in `W`; then a weight
/// holding a NaN, which must make every output NaN on both sides.
pub fn check_spectral_norm(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 257], &[129, 784], &[513, 3], &[64, 33, 4, 4]];
    for (i, dims) in shapes.iter().enumerate() {
        let (m, n) = (dims[0], dims[1..].iter().product::<usize>());
        let w = (random(40 + i as u64, m * n, -1.0, 1.0), dims.to_vec());
        let u = (random(50 + i as u64, m, -1.0, 1.0), vec![m]);
        for iterations in [1, 3] {
            out.push(check(
                dev,
                format!("spectral-norm power iteration {dims:?} x{iterations}"),
                &[w.clone(), u.clone()],
                1e-5,
                &|t| {
                    let r = spectral_norm::power_iteration_with_sigma(t[0], t[1], iterations)?;
                    Tensor::cat(&[&r.u, &r.v, &r.sigma.unsqueeze(0)?], 0)
                },
            ));
        }
        out.push(check(
            dev,
            format!("spectral-norm W / sigma {dims:?}"),
            &[w.clone(), u.clone()],
            1e-5,
            &|t| {
                let (u, v) = spectral_norm::power_iteration(t[0], t[1], 1)?;
                spectral_norm::normalized(t[0], &u, &v)
            },
        ));
        if i == 2 {
            let mut wn = w.clone();
            wn.0[1000] = f32::NAN;
            out.push(check(
                dev,
                format!("spectral-norm power iteration {dims:?} x1 non-finite"),
                &[wn, u],
                1e-5,
                &|t| {
                    let r = spectral_norm::power_iteration_with_sigma(t[0], t[1], 1)?;
                    Tensor::cat(&[&r.u, &r.v, &r.sigma.unsqueeze(0)?], 0)
                },
            ));
        }
    }
    out
}

/// The affine layer (GEMM and the fused bias + activation epilogue) for every activation, and
/// with NaN inputs and infinite biases.
pub fn check_linear(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    for act in [
        linear::Activation::Identity,
        linear::Activation::Relu,
        linear::Activation::Tanh,
        linear::Activation::Softplus,
        linear::Activation::LeakyRelu,
    ] {
        let sizes = [(1usize, 1usize, 1usize), (129, 784, 400), (37, 20, 257)];
        for (j, &(n, d_in, d_out)) in sizes.iter().enumerate() {
            for special in [false, true] {
                if special && j != 2 {
                    continue;
                }
                let mut x = random(1, n * d_in, -2.0, 2.0);
                let mut b = random(3, d_out, -0.5, 0.5);
                if special {
                    // Whole rows of NaN input; infinite biases in some columns.
                    x[d_in..2 * d_in].fill(f32::NAN);
                    sprinkle(&mut b, 8, &[f32::INFINITY, f32::NEG_INFINITY]);
                }
                let inputs = [
                    (x, vec![n, d_in]),
                    (random(2, d_out * d_in, -0.1, 0.1), vec![d_out, d_in]),
                    (b, vec![d_out]),
                ];
                let suffix = if special { " non-finite" } else { "" };
                // GEMMs run in full f32 here; TF32 would need a looser tolerance.
                out.push(check(
                    dev,
                    format!("linear {act:?} {n}x{d_in}->{d_out}{suffix}"),
                    &inputs,
                    1e-4,
                    &|t| linear::linear(t[0], t[1], t[2], act),
                ));
            }
        }
    }
    out
}

/// One Adam update (both in-place kernels) of `p0` with gradient `g0` from state `s0` on the CPU
/// and on `dev`; the largest error over the new state and parameters.
fn compare_adam(
    dev: &Device,
    name: &str,
    (p0, g0, s0): (&[f32], &[f32], &[f32]),
    weight_decay: f32,
) -> Result<f32> {
    use crate::ops::adam::{AdamApply, AdamMoments};
    let n = p0.len();
    let mut res = Vec::new();
    for d in [&Device::Cpu, dev] {
        let p = Tensor::from_slice(p0, n, d)?;
        let g = Tensor::from_slice(g0, n, d)?;
        let state = Tensor::from_slice(s0, 2 * n + 1, d)?;
        state.inplace_op3(
            &g,
            &p,
            &AdamMoments {
                beta1: 0.9,
                beta2: 0.999,
                weight_decay,
            },
        )?;
        p.inplace_op2(
            &state,
            &AdamApply {
                lr: 1e-3,
                eps: 1e-8,
                bias_correction1: 0.19,
                bias_correction2: 0.003,
            },
        )?;
        res.push((p, state));
    }
    let e1 = compare(&res[1].1, &res[0].1, 1e-6, &format!("{name} moments"))?;
    let e2 = compare(&res[1].0, &res[0].0, 1e-6, &format!("{name} parameters"))?;
    Ok(e1.max(e2))
}

/// The two in-place Adam kernels against the CPU on sizes around the block size; then with
/// infinite parameters and NaN gradients, with and without weight decay (no decay must not turn
/// an infinite parameter into NaN moments); then with a non-finite guard (the update skipped).
pub fn check_adam(dev: &Device) -> Vec<CheckReport> {
    let mut out = Vec::new();
    for &n in &[1usize, 255, 257, 100_003] {
        let (p0, g0, mut s0) = (
            random(1, n, -1.0, 1.0),
            random(2, n, -1.0, 1.0),
            random(3, 2 * n + 1, 0.0, 0.1),
        );
        s0[2 * n] = 0.0; // the found-inf guard: finite, so the update applies
        let name = format!("adam n={n}");
        out.push(report(name.clone(), 1e-6, || {
            compare_adam(dev, &name, (&p0, &g0, &s0), 0.01)
        }));
    }
    let n = 1000;
    let (mut p0, mut g0, mut s0) = (
        random(4, n, -1.0, 1.0),
        random(5, n, -1.0, 1.0),
        random(6, 2 * n + 1, 0.0, 0.1),
    );
    sprinkle(&mut p0, 7, &[f32::INFINITY, f32::NEG_INFINITY]);
    sprinkle(&mut g0, 8, &[f32::NAN]);
    for (guard, wd) in [(0.0, 0.0), (0.0, 0.01), (f32::NAN, 0.0)] {
        s0[2 * n] = guard;
        let name = format!("adam n={n} non-finite, weight decay {wd}, guard {guard}");
        out.push(report(name.clone(), 1e-6, || {
            compare_adam(dev, &name, (&p0, &g0, &s0), wd)
        }));
    }
    out
}

/// One SGD training step of the examples VAE, on dynamically binarized pixels, from the same
/// initialization and batch on both devices, with the bits and the noise drawn on both sides by
/// the generator training uses on `dev` ([`Draws::for_device`]): the counter generator for a
/// GPU, so the CPU reference draws exactly what the device draws. SGD is linear in the
/// gradients, so parameters agree to rounding.
pub fn check_train_step(dev: &Device) -> Vec<CheckReport> {
    check_train_step_drawn(dev, Draws::for_device(dev))
}

/// [`check_train_step`] with the generator of both sides given.
pub fn check_train_step_drawn(dev: &Device, draws: Draws) -> Vec<CheckReport> {
    let name = format!("train step (SGD, {draws:?} draws)");
    vec![report(name, 1e-4, || train_step_error(dev, [draws, draws]))]
}

/// The largest error between one VAE training step on the CPU drawing with `draws[0]` and one
/// on `dev` drawing with `draws[1]`.
fn train_step_error(dev: &Device, draws: [Draws; 2]) -> Result<f32> {
    use crate::config::{Config, OptimizerKind};
    let mut cfg = Config::default();
    cfg.optim.kind = OptimizerKind::Sgd;
    cfg.optim.momentum = 0.0;
    let (n, d) = (96, 784);
    let pixels: Vec<u8> = random(5, n * d, 0.0, 256.0)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let set = crate::data::ImageSet {
        pixels,
        labels: None,
        n,
        rows: 28,
        cols: 28,
    };
    let data = crate::data::DataSource::from_images(&set, crate::data::Binarization::Dynamic, 3);
    let idx: Vec<u32> = (0..64).map(|i| (i * 37 % n) as u32).collect();
    let mut res = Vec::new();
    for (d, draws) in [&Device::Cpu, dev].into_iter().zip(draws) {
        let model = crate::session::build_vae(&cfg, data.dim(), d)?;
        let mut opt = crate::optim::Optimizer::new(&cfg.optim, &model.store)?;
        let step = crate::train::train_step(
            &model, &mut opt, &cfg, &data, &idx, 5, 1.0, 0.1, d, None, draws,
        )?;
        let params: Vec<Tensor> = model
            .store
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        res.push((step.loss.to_scalar::<f32>()?, params));
    }
    let loss_err = (res[0].0 - res[1].0).abs() / (1.0 + res[0].0.abs());
    if loss_err.is_nan() || loss_err > 1e-5 {
        return Err(mismatch(format!(
            "train step loss: CPU {} vs device {}",
            res[0].0, res[1].0
        )));
    }
    let mut worst = loss_err;
    for (c, g) in res[0].1.iter().zip(&res[1].1) {
        worst = worst.max(compare(g, c, 1e-4, "parameters after one step")?);
    }
    Ok(worst)
}

/// The counter-based draws: binarized rows must match the CPU bit for bit (out-of-range row
/// indices giving NaN rows on both sides), normals to rounding.
pub fn check_random(dev: &Device) -> Vec<CheckReport> {
    use crate::ops::random::{binarize_rows, normal};
    let mut out = Vec::new();
    let (n, d) = (1000usize, 785usize);
    let pixels: Vec<u8> = random(11, n * d, 0.0, 256.0)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let mut idx: Vec<u32> = random(12, 333, 0.0, n as f32)
        .into_iter()
        .map(|v| v as u32)
        .collect();
    for (label, bad) in [
        ("", None),
        (" with out-of-range rows", Some([n as u32, u32::MAX])),
    ] {
        if let Some(bad) = bad {
            idx[7] = bad[0];
            idx[300] = bad[1];
        }
        let name = format!("binarize_rows {}x{d}{label}", idx.len());
        out.push(report(name, 0.0, || {
            let mut bits = Vec::new();
            for dv in [&Device::Cpu, dev] {
                let p = Tensor::from_slice(&pixels, (n, d), dv)?;
                let i = Tensor::from_slice(&idx, idx.len(), dv)?;
                bits.push(binarize_rows(&p, &i, 0x1234_5678_9abc_def0)?);
            }
            compare(&bits[1], &bits[0], 0.0, "binarize_rows")
        }));
    }
    for &len in &[1usize, 257, 100_003] {
        out.push(report(format!("normal n={len}"), 1e-5, || {
            let a = normal(&[len], 42, &Device::Cpu)?;
            let b = normal(&[len], 42, dev)?;
            compare(&b, &a, 1e-5, "normal")
        }));
    }
    out
}

/// `abar_t` of the linear beta schedule from 1e-4 to 0.02 over `steps` (Ho et al. 2020, section
/// 4), in f64: `(betas, abars)`.
fn linear_schedule(steps: usize) -> (Vec<f64>, Vec<f64>) {
    let betas: Vec<f64> = (0..steps)
        .map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / (steps - 1).max(1) as f64)
        .collect();
    let mut abar = 1.0;
    let abars = betas
        .iter()
        .map(|b| {
            abar *= 1.0 - b;
            abar
        })
        .collect();
    (betas, abars)
}

/// The `(T, 2)` rows `[sqrt(abar_t), sqrt(1 - abar_t)]` of [`diffusion::q_sample`], flat.
fn q_sample_table(abars: &[f64]) -> Vec<f32> {
    abars
        .iter()
        .flat_map(|a| [a.sqrt() as f32, (1.0 - a).sqrt() as f32])
        .collect()
}

/// The DDPM ancestral step at index `t` (Ho et al. eq. 6-7) and the DDIM step from `t` to
/// `prev` with `eta` (Song et al. eq. 12, 16).
fn sampler_coefficients(
    (betas, abars): (&[f64], &[f64]),
    t: usize,
    ddim: Option<(usize, f64)>,
    clip: Option<(f32, f32)>,
) -> diffusion::SamplerCoefficients {
    let abar = abars[t];
    let prev = if t == 0 { 1.0 } else { abars[t - 1] };
    let (c_x0, c_xt, c_eps, sigma) = match ddim {
        None => {
            let beta = betas[t];
            (
                beta * prev.sqrt() / (1.0 - abar),
                (1.0 - prev) * (1.0 - beta).sqrt() / (1.0 - abar),
                0.0,
                (beta * (1.0 - prev) / (1.0 - abar)).sqrt(),
            )
        }
        Some((p, eta)) => {
            let ap = abars[p];
            let sigma = eta * ((1.0 - ap) / (1.0 - abar)).sqrt() * (1.0 - abar / ap).sqrt();
            (ap.sqrt(), 0.0, (1.0 - ap - sigma * sigma).sqrt(), sigma)
        }
    };
    diffusion::SamplerCoefficients {
        sqrt_recip_abar: (1.0 / abar).sqrt() as f32,
        sqrt_recipm1_abar: (1.0 / abar - 1.0).sqrt() as f32,
        clip,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        c_x0: c_x0 as f32,
        c_xt: c_xt as f32,
        c_eps: c_eps as f32,
        sigma: sigma as f32,
    }
}

/// The diffusion ops: `q_sample` (forward, and gradients in `x0` and `eps`), `simple_loss`
/// (forward and gradients) and `sampler_step` (DDPM, clipped DDPM, DDIM with eta 0 and clipped
/// DDIM with eta 1; forward only, it has no backward) on every shape, then once more with NaN,
/// infinities and large values in every input; then `q_sample` with time indices outside the
/// table (the host check bypassed), which must give NaN rows and NaN gradient rows on both sides.
pub fn check_diffusion(dev: &Device) -> Vec<CheckReport> {
    const STEPS: usize = 1000;
    let (betas, abars) = linear_schedule(STEPS);
    let table = q_sample_table(&abars);
    let sched = (betas.as_slice(), abars.as_slice());
    let clip = Some((-1.0, 1.0));
    let samplers = [
        ("ddpm t=500", sampler_coefficients(sched, 500, None, None)),
        (
            "ddpm t=999 clip",
            sampler_coefficients(sched, 999, None, clip),
        ),
        (
            "ddim eta=0 999->949",
            sampler_coefficients(sched, 999, Some((949, 0.0)), None),
        ),
        (
            "ddim eta=1 300->250 clip",
            sampler_coefficients(sched, 300, Some((250, 1.0)), clip),
        ),
    ];
    let mut out = Vec::new();
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        let s = 200 + 10 * i as u64;
        let n = r * c;
        let shape = vec![r, c];
        let t: Vec<u32> = random(s, r, 0.0, STEPS as f32)
            .into_iter()
            .map(|v| (v as u32).min(STEPS as u32 - 1))
            .collect();
        let mut v: Vec<Vec<f32>> = (1..=5).map(|k| random(s + k, n, -3.0, 3.0)).collect();
        let mut suffix = "";
        for special in [false, true] {
            if special {
                // Only the largest shape: the aim is the semantics, not the coverage of shapes.
                if (r, c) != (129, 784) {
                    break;
                }
                for (k, x) in v.iter_mut().enumerate() {
                    sprinkle(x, s + 6 + k as u64, SPECIALS);
                }
                suffix = " non-finite";
            }
            let [x0, eps, pred, x_t, noise] =
                [0, 1, 2, 3, 4].map(|k| (v[k].clone(), shape.clone()));
            let (t, table) = (&t, &table);
            out.push(check(
                dev,
                format!("q_sample {r}x{c}{suffix}"),
                &[x0, eps.clone()],
                1e-5,
                &|ts| {
                    let t = Tensor::from_slice(t, r, ts[0].device())?;
                    let tab = Tensor::from_slice(table, (STEPS, 2), ts[0].device())?;
                    diffusion::q_sample(ts[0], ts[1], &t, &tab)
                },
            ));
            out.push(check(
                dev,
                format!("simple_loss {r}x{c}{suffix}"),
                &[pred.clone(), eps],
                1e-5,
                &|ts| diffusion::simple_loss(ts[0], ts[1]),
            ));
            for (name, coefs) in &samplers {
                let name = format!("sampler_step {name} {r}x{c}{suffix}");
                let inputs = [&x_t.0, &pred.0, &noise.0];
                out.push(report(name.clone(), 1e-5, || {
                    let mut res = Vec::new();
                    for d in [&Device::Cpu, dev] {
                        let [a, b, z] = inputs.map(|v| Tensor::from_slice(v, (r, c), d));
                        res.push(diffusion::sampler_step(&a?, &b?, &z?, coefs)?);
                    }
                    compare(&res[1], &res[0], 1e-5, &name)
                }));
            }
        }
    }
    out.push(check_q_sample_out_of_range(dev, &table));
    out
}

/// `q_sample` with time indices at and beyond T: NaN rows exactly there, on the CPU (checked
/// first, as the reference) and on the device.
fn check_q_sample_out_of_range(dev: &Device, table: &[f32]) -> CheckReport {
    const STEPS: usize = 1000;
    let (r, c) = (64, 300);
    let t: Vec<u32> = (0..r as u32)
        .map(|i| match i % 8 {
            1 => STEPS as u32,
            5 => u32::MAX,
            _ => i * 13 % STEPS as u32,
        })
        .collect();
    let inputs = [
        (random(300, r * c, -3.0, 3.0), vec![r, c]),
        (random(301, r * c, -3.0, 3.0), vec![r, c]),
    ];
    let name = format!("q_sample {r}x{c} time indices out of range");
    let op = |ts: &[&Tensor]| {
        let tt = Tensor::from_slice(&t, r, ts[0].device())?;
        let tab = Tensor::from_slice(table, (STEPS, 2), ts[0].device())?;
        diffusion::q_sample_unchecked(ts[0], ts[1], &tt, &tab)
    };
    report(name.clone(), 1e-5, || {
        // The reference itself: NaN rows exactly where the index is out of range.
        let ts = inputs
            .iter()
            .map(|(v, s)| Tensor::from_slice(v, s.as_slice(), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = host(&op(&[&ts[0], &ts[1]])?)?;
        for (row, &ti) in y.chunks(c).zip(&t) {
            let bad = ti as usize >= STEPS;
            if row.iter().any(|v| v.is_nan() != bad) {
                return Err(mismatch(format!(
                    "{name}: the CPU row of time index {ti} is not {}",
                    if bad { "all NaN" } else { "free of NaN" }
                )));
            }
        }
        compare_op(dev, &name, &inputs, 1e-5, &op)
    })
}

/// A group of checks: every check of one op family on the device under test.
pub type CheckGroup = fn(&Device) -> Vec<CheckReport>;

/// Every check group, by name: the one list that [`run_all`], `trainer check-kernels` and the
/// GPU tests (`tests/gpu_kernels.rs`) run.
pub const GROUPS: &[(&str, CheckGroup)] = &[
    ("gaussian", check_gaussian),
    ("bernoulli", check_bernoulli),
    ("logsumexp", check_logsumexp),
    ("spectral_norm", check_spectral_norm),
    ("linear", check_linear),
    ("adam", check_adam),
    ("random", check_random),
    ("diffusion", check_diffusion),
    ("train_step", check_train_step),
];

/// Runs the group `name` of [`GROUPS`] with output poisoning on.
///
/// # Panics
/// When `name` is not a group (a programming error in a caller).
pub fn run_group(dev: &Device, name: &str) -> Vec<CheckReport> {
    let (_, f) = GROUPS
        .iter()
        .find(|(g, _)| *g == name)
        .unwrap_or_else(|| panic!("no kernel check group {name:?}"));
    prepare();
    f(dev)
}

fn prepare() {
    std::env::set_var("GENTRAIN_POISON_OUTPUTS", "1");
    crate::device::set_tf32(false);
}

/// Every check of every group, with output poisoning on. A failing check is recorded in its
/// report and the rest still run, so one failure hides nothing.
pub fn run_all(dev: &Device) -> Vec<CheckReport> {
    run_groups(dev, GROUPS)
}

/// Every check of `groups`, in order, with output poisoning on; failures are recorded, not
/// returned. A group that panics (a bug in a kernel's launch glue or in candle's device backend)
/// is recorded as one failed check named after it, and the next group still runs.
pub fn run_groups(dev: &Device, groups: &[(&str, CheckGroup)]) -> Vec<CheckReport> {
    prepare();
    let mut out = Vec::new();
    for (name, f) in groups {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dev))) {
            Ok(reports) => out.extend(reports),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "no message".into());
                out.push(CheckReport {
                    check: format!("{name} (group)"),
                    max_rel_err: f32::NAN,
                    tolerance: 0.0,
                    passed: false,
                    error: Some(format!("panicked: {why}")),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_against_itself_passes_every_check() {
        let r = run_all(&Device::Cpu);
        let failed: Vec<_> = r.iter().filter(|c| !c.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(r.iter().all(|c| c.max_rel_err == 0.0), "{r:?}");
        // Every group ran, the random draws among them (run_all used to leave them out).
        for name in [
            "binarize_rows",
            "normal n=",
            "non-finite",
            "train step",
            "adam",
            "q_sample",
            "simple_loss",
            "sampler_step",
            "out of range",
        ] {
            assert!(r.iter().any(|c| c.check.contains(name)), "no {name} check");
        }
    }

    #[test]
    fn compare_catches_wrong_values_and_wrong_classes() {
        let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[1f32, 2.0, f32::NAN], &Device::Cpu).unwrap();
        assert!(compare(&a, &b, 1e-5, "x")
            .unwrap_err()
            .to_string()
            .contains("did not write"));
        let c = Tensor::new(&[1f32, 2.1, 3.0], &Device::Cpu).unwrap();
        assert!(compare(&c, &b, 1e-5, "x").is_err());
        // An infinity of the wrong sign, or NaN against infinity, is a disagreement.
        let p = Tensor::new(&[f32::INFINITY, f32::NAN], &Device::Cpu).unwrap();
        let m = Tensor::new(&[f32::NEG_INFINITY, f32::NAN], &Device::Cpu).unwrap();
        let q = Tensor::new(&[f32::INFINITY, f32::INFINITY], &Device::Cpu).unwrap();
        assert!(compare(&p, &m, 1e-5, "x").is_err());
        assert!(compare(&p, &q, 1e-5, "x").is_err());
        assert_eq!(compare(&p, &p, 1e-5, "x").unwrap(), 0.0);
    }

    fn failing_group(dev: &Device) -> Vec<CheckReport> {
        // A device op that errors and one that disagrees: both become failed reports.
        let erroring = check(
            dev,
            "erroring op".into(),
            &[(vec![1.0], vec![1])],
            1e-5,
            &|_| Err(candle_core::Error::Msg("launch failed".into())),
        );
        // The first call is the CPU reference, the second the "device", which is off by one.
        let calls = std::cell::Cell::new(0.0);
        let wrong = check(
            dev,
            "wrong op".into(),
            &[(vec![1.0], vec![1])],
            1e-5,
            &|t| {
                let shift = calls.get();
                calls.set(1.0);
                t[0].affine(1.0, shift)
            },
        );
        vec![erroring, wrong]
    }

    fn panicking_group(_: &Device) -> Vec<CheckReport> {
        panic!("index out of bounds in a launch")
    }

    #[test]
    fn a_panicking_group_is_a_failed_check_and_the_rest_still_run() {
        let r = run_groups(
            &Device::Cpu,
            &[("panicking", panicking_group), ("random", check_random)],
        );
        assert!(
            !r[0].passed && r[0].check == "panicking (group)",
            "{:?}",
            r[0]
        );
        assert!(r[0]
            .error
            .as_deref()
            .unwrap()
            .contains("index out of bounds"));
        assert!(r.len() > 1 && r[1..].iter().all(|c| c.passed));
    }

    #[test]
    fn a_failing_check_is_reported_and_the_rest_still_run() {
        // run_all used to stop at the first failure (and the CLI printed nothing), hiding every
        // later result.
        let r = run_groups(
            &Device::Cpu,
            &[("failing", failing_group), ("random", check_random)],
        );
        assert!(!r[0].passed && r[0].error.as_deref().unwrap().contains("launch failed"));
        assert!(!r[1].passed && r[1].error.as_deref().unwrap().contains("relative error"));
        assert!(r[1].max_rel_err.is_nan());
        assert!(r.len() > 2 && r[2..].iter().all(|c| c.passed), "{r:?}");
    }

    #[test]
    fn the_train_step_check_draws_the_devices_noise_on_both_sides() {
        // The GPU draws its bits and noise with the counter generator. Forced onto the CPU, the
        // check passes exactly when both sides use it ...
        let r = check_train_step_drawn(&Device::Cpu, Draws::Counter);
        assert!(r[0].passed && r[0].max_rel_err == 0.0, "{r:?}");
        // ... while a reference that drew with the host generator, as the check used to, could
        // never match a GPU: the same step then differs far beyond the tolerance.
        let e = train_step_error(&Device::Cpu, [Draws::Host, Draws::Counter]);
        assert!(e.is_err(), "{e:?}");
    }
}

#[cfg(test)]
mod ieee_tests {
    //! The CPU kernels against compositions of candle's ops, whose CPU arithmetic is libm's and
    //! IEEE's like CUDA's: on non-finite inputs the two must agree in class (NaN, +inf, -inf,
    //! finite), which is what the device checks demand of the GPU kernels.
    use super::*;
    use crate::ops::{bernoulli, gaussian, linear};

    fn classes_agree(fast: &Tensor, slow: &Tensor, what: &str) {
        let (f, s) = (host(fast).unwrap(), host(slow).unwrap());
        for (i, (a, b)) in f.iter().zip(&s).enumerate() {
            assert_eq!(
                class(*a),
                class(*b),
                "{what}[{i}]: fused {a}, plain ops {b}"
            );
        }
    }

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_cpu_ops_follow_ieee_on_non_finite_inputs() {
        let (r, c) = (40, 33);
        let mut mu = random(1, r * c, -3.0, 3.0);
        let mut lv = random(2, r * c, -8.0, 8.0);
        let mut eps = random(3, r * c, -3.0, 3.0);
        sprinkle(&mut mu, 4, SPECIALS);
        sprinkle(&mut lv, 5, SPECIALS);
        sprinkle(&mut eps, 6, SPECIALS);
        let (mu, lv, eps) = (t(&mu, (r, c)), t(&lv, (r, c)), t(&eps, (r, c)));
        classes_agree(
            &gaussian::reparameterize(&mu, &lv, &eps).unwrap(),
            &gaussian::reparameterize_slow(&mu, &lv, &eps).unwrap(),
            "reparameterize",
        );
        classes_agree(
            &gaussian::gaussian_kl(&mu, &lv).unwrap(),
            &gaussian::gaussian_kl_slow(&mu, &lv).unwrap(),
            "gaussian_kl",
        );
        classes_agree(
            &gaussian::gaussian_log_density(&eps, &mu, &lv).unwrap(),
            &gaussian::gaussian_log_density_slow(&eps, &mu, &lv).unwrap(),
            "gaussian_log_density",
        );
        let x = t(
            &random(7, r * c, 0.0, 1.0)
                .into_iter()
                .map(|u| (u < 0.3) as u8 as f32)
                .collect::<Vec<_>>(),
            (r, c),
        );
        let mut logits = random(8, r * c, -30.0, 30.0);
        sprinkle(&mut logits, 9, SPECIALS);
        let logits = t(&logits, (r, c));
        classes_agree(
            &bernoulli::bernoulli_log_likelihood(&logits, &x).unwrap(),
            &bernoulli::bernoulli_log_likelihood_slow(&logits, &x).unwrap(),
            "bernoulli",
        );
        // candle's relu maps NaN to 0; the fused one propagates it (as torch.relu does) on the
        // CPU and in the CUDA epilogue alike.
        let nan_row = t(&[f32::NAN, 1.0], (1, 2));
        let ones = t(&[1.0, 1.0], (1, 2));
        let zero = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = linear::linear(&nan_row, &ones, &zero, linear::Activation::Relu).unwrap();
        assert!(host(&y).unwrap()[0].is_nan());
        for act in [
            linear::Activation::Identity,
            linear::Activation::Tanh,
            linear::Activation::Softplus,
            linear::Activation::LeakyRelu,
        ] {
            let w = t(&random(10, 17 * c, -0.5, 0.5), (17, c));
            let mut b = random(11, 17, -0.5, 0.5);
            sprinkle(&mut b, 12, SPECIALS);
            let b = Tensor::from_slice(&b, 17, &Device::Cpu).unwrap();
            let fused = linear::linear(&mu, &w, &b, act).unwrap();
            let slow = linear::linear_slow(&mu, &w, &b, act).unwrap();
            classes_agree(&fused, &slow, &format!("{act:?}"));
        }
    }
}
