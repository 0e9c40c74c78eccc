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
use crate::ops::{bernoulli, gaussian, linear, logsumexp, spectral_norm};

/// Shapes (rows, columns) every row and elementwise kernel is checked on.
pub const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 257),
    (129, 784),
    (1000, 50),
    (7, 1025),
    (513, 3),
];

/// The outcome of one comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub check: String,
    /// Largest `|a - b| / (1 + |b|)` seen over outputs and gradients.
    pub max_rel_err: f32,
    pub tolerance: f32,
}

fn random(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
}

/// Max relative error of `got` against `want`; an error if a finite value is missing or the
/// error exceeds `tol`.
fn compare(got: &Tensor, want: &Tensor, tol: f32, what: &str) -> Result<f32> {
    let (g, w) = (host(got)?, host(want)?);
    if g.len() != w.len() {
        return Err(Error::NonFinite(format!(
            "{what}: {} values on the device, {} on the CPU",
            g.len(),
            w.len()
        )));
    }
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if a.is_finite() != b.is_finite() {
            return Err(Error::NonFinite(format!(
                "{what}[{i}]: device {a}, CPU {b} (NaN marks an output the kernel did not write)"
            )));
        }
        if b.is_finite() {
            let e = (a - b).abs() / (1.0 + b.abs());
            if e > tol {
                return Err(Error::NonFinite(format!(
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
/// outputs (tolerance `tol`) and input gradients (`10 tol`).
fn check(
    dev: &Device,
    name: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    tol: f32,
    op: Op,
) -> Result<CheckReport> {
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
                return Err(Error::NonFinite(format!(
                    "{name}: gradient of input {i} exists on one device only"
                )))
            }
        }
    }
    Ok(CheckReport {
        check: name.to_string(),
        max_rel_err: worst,
        tolerance: tol,
    })
}

/// Reparameterization, Gaussian KL and Gaussian log-density on every shape.
pub fn check_gaussian(dev: &Device) -> Result<Vec<CheckReport>> {
    let mut out = Vec::new();
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        let s = 10 * i as u64;
        let n = r * c;
        let shape = vec![r, c];
        let (mu, lv, eps) = (
            random(s, n, -3.0, 3.0),
            random(s + 1, n, -8.0, 8.0),
            random(s + 2, n, -3.0, 3.0),
        );
        let three = [
            (mu.clone(), shape.clone()),
            (lv.clone(), shape.clone()),
            (eps.clone(), shape.clone()),
        ];
        out.push(check(
            dev,
            &format!("reparameterize {r}x{c}"),
            &three,
            1e-5,
            &|t| gaussian::reparameterize(t[0], t[1], t[2]),
        )?);
        out.push(check(
            dev,
            &format!("gaussian_kl {r}x{c}"),
            &three[..2],
            1e-5,
            &|t| gaussian::gaussian_kl(t[0], t[1]),
        )?);
        let zml = [(eps, shape.clone()), (mu, shape.clone()), (lv, shape)];
        out.push(check(
            dev,
            &format!("gaussian_log_density {r}x{c}"),
            &zml,
            1e-5,
            &|t| gaussian::gaussian_log_density(t[0], t[1], t[2]),
        )?);
    }
    Ok(out)
}

/// Bernoulli log-likelihood (forward and its fused backward) on every shape.
pub fn check_bernoulli(dev: &Device) -> Result<Vec<CheckReport>> {
    let mut out = Vec::new();
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        let logits = random(i as u64, r * c, -30.0, 30.0);
        let x: Vec<f32> = random(i as u64 + 7, r * c, 0.0, 1.0)
            .into_iter()
            .map(|u| (u < 0.3) as u8 as f32)
            .collect();
        let op = move |t: &[&Tensor]| {
            let x = Tensor::from_vec(x.clone(), (r, c), t[0].device())?;
            bernoulli::bernoulli_log_likelihood(t[0], &x)
        };
        out.push(check(
            dev,
            &format!("bernoulli_log_likelihood {r}x{c}"),
            &[(logits, vec![r, c])],
            1e-5,
            &op,
        )?);
    }
    Ok(out)
}

/// Log-sum-exp (forward and backward) on every shape, with some `-inf` log-weights.
pub fn check_logsumexp(dev: &Device) -> Result<Vec<CheckReport>> {
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
            &format!("logsumexp {r}x{k}"),
            &[(a, vec![r, k])],
            1e-5,
            &|t| logsumexp::logsumexp(t[0]),
        )?);
    }
    Ok(out)
}

/// Spectral-norm power iteration (1 and 3 iterations; `[u, v, sigma]` compared) on weight
/// shapes that are not multiples of the kernels' 32-column and 8-row tiles, including a
/// flattened convolution kernel; then `W / sigma(W)` with its gradient in `W`.
pub fn check_spectral_norm(dev: &Device) -> Result<Vec<CheckReport>> {
    let mut out = Vec::new();
    let shapes: &[&[usize]] = &[&[1, 1], &[3, 257], &[129, 784], &[513, 3], &[64, 33, 4, 4]];
    for (i, dims) in shapes.iter().enumerate() {
        let (m, n) = (dims[0], dims[1..].iter().product::<usize>());
        let w = (random(40 + i as u64, m * n, -1.0, 1.0), dims.to_vec());
        let u = (random(50 + i as u64, m, -1.0, 1.0), vec![m]);
        for iterations in [1, 3] {
            out.push(check(
                dev,
                &format!("spectral-norm power iteration {dims:?} x{iterations}"),
                &[w.clone(), u.clone()],
                1e-5,
                &|t| {
                    let r = spectral_norm::power_iteration_with_sigma(t[0], t[1], iterations)?;
                    Tensor::cat(&[&r.u, &r.v, &r.sigma.unsqueeze(0)?], 0)
                },
            )?);
        }
        out.push(check(
            dev,
            &format!("spectral-norm W / sigma {dims:?}"),
            &[w, u],
            1e-5,
            &|t| {
                let (u, v) = spectral_norm::power_iteration(t[0], t[1], 1)?;
                spectral_norm::normalized(t[0], &u, &v)
            },
        )?);
    }
    Ok(out)
}

/// The affine layer (GEMM and the fused bias + activation epilogue) for every activation.
pub fn check_linear(dev: &Device) -> Result<Vec<CheckReport>> {
    let mut out = Vec::new();
    for act in [
        linear::Activation::Identity,
        linear::Activation::Relu,
        linear::Activation::Tanh,
        linear::Activation::Softplus,
    ] {
        for &(n, d_in, d_out) in &[(1usize, 1usize, 1usize), (129, 784, 400), (37, 20, 257)] {
            let inputs = [
                (random(1, n * d_in, -2.0, 2.0), vec![n, d_in]),
                (random(2, d_out * d_in, -0.1, 0.1), vec![d_out, d_in]),
                (random(3, d_out, -0.5, 0.5), vec![d_out]),
            ];
            // GEMMs run in full f32 here; TF32 would need a looser tolerance.
            out.push(check(
                dev,
                &format!("linear {act:?} {n}x{d_in}->{d_out}"),
                &inputs,
                1e-4,
                &|t| linear::linear(t[0], t[1], t[2], act),
            )?);
        }
    }
    Ok(out)
}

/// The two in-place Adam kernels against the CPU on sizes around the block size.
pub fn check_adam(dev: &Device) -> Result<Vec<CheckReport>> {
    use crate::ops::adam::{AdamApply, AdamMoments};
    let mut out = Vec::new();
    for &n in &[1usize, 255, 257, 100_003] {
        let (p0, g0, mut s0) = (
            random(1, n, -1.0, 1.0),
            random(2, n, -1.0, 1.0),
            random(3, 2 * n + 1, 0.0, 0.1),
        );
        s0[2 * n] = 0.0; // the found-inf guard: finite, so the update applies
        let mut res = Vec::new();
        for d in [&Device::Cpu, dev] {
            let p = Tensor::from_vec(p0.clone(), n, d)?;
            let g = Tensor::from_vec(g0.clone(), n, d)?;
            let state = Tensor::from_vec(s0.clone(), 2 * n + 1, d)?;
            state.inplace_op3(
                &g,
                &p,
                &AdamMoments {
                    beta1: 0.9,
                    beta2: 0.999,
                    weight_decay: 0.01,
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
        let e1 = compare(&res[1].1, &res[0].1, 1e-6, &format!("adam moments n={n}"))?;
        let e2 = compare(
            &res[1].0,
            &res[0].0,
            1e-6,
            &format!("adam parameters n={n}"),
        )?;
        out.push(CheckReport {
            check: format!("adam n={n}"),
            max_rel_err: e1.max(e2),
            tolerance: 1e-6,
        });
    }
    Ok(out)
}

/// One SGD training step of the examples VAE from the same initialization, batch and noise on
/// both devices (SGD is linear in the gradients, so parameters agree to rounding).
pub fn check_train_step(dev: &Device) -> Result<Vec<CheckReport>> {
    use crate::config::{Config, OptimizerKind};
    let mut cfg = Config::default();
    cfg.optim.kind = OptimizerKind::Sgd;
    cfg.optim.momentum = 0.0;
    let bits: Vec<f32> = random(5, 64 * 784, 0.0, 1.0)
        .into_iter()
        .map(|u| (u < 0.2) as u8 as f32)
        .collect();
    let data = crate::data::DataSource::from_real(bits, 784, 0);
    let idx: Vec<u32> = (0..64).collect();
    let mut res = Vec::new();
    for d in [&Device::Cpu, dev] {
        let model = crate::session::build_model(&cfg, 784, d)?;
        let mut opt = crate::optim::Optimizer::new(&cfg.optim, &model.store)?;
        let step =
            crate::train::train_step(&model, &mut opt, &cfg, &data, &idx, 0, 1.0, 0.1, d, None)?;
        let params: Vec<Tensor> = model
            .store
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        res.push((step.loss.to_scalar::<f32>()?, params));
    }
    let loss_err = (res[0].0 - res[1].0).abs() / (1.0 + res[0].0.abs());
    if loss_err > 1e-5 {
        return Err(Error::NonFinite(format!(
            "train step loss: CPU {} vs device {}",
            res[0].0, res[1].0
        )));
    }
    let mut worst = loss_err;
    for (c, g) in res[0].1.iter().zip(&res[1].1) {
        worst = worst.max(compare(g, c, 1e-4, "parameters after one step")?);
    }
    Ok(vec![CheckReport {
        check: "train step (SGD)".into(),
        max_rel_err: worst,
        tolerance: 1e-4,
    }])
}

/// The counter-based draws: binarized rows must match the CPU bit for bit, normals to rounding.
pub fn check_random(dev: &Device) -> Result<Vec<CheckReport>> {
    use crate::ops::random::{binarize_rows, normal};
    let mut out = Vec::new();
    let (n, d) = (1000usize, 785usize);
    let pixels: Vec<u8> = random(11, n * d, 0.0, 256.0)
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let idx: Vec<u32> = random(12, 333, 0.0, n as f32)
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mut bits = Vec::new();
    for dv in [&Device::Cpu, dev] {
        let p = Tensor::from_vec(pixels.clone(), (n, d), dv)?;
        let i = Tensor::from_vec(idx.clone(), idx.len(), dv)?;
        bits.push(binarize_rows(&p, &i, 0x1234_5678_9abc_def0)?);
    }
    let e = compare(&bits[1], &bits[0], 0.0, "binarize_rows")?;
    out.push(CheckReport {
        check: format!("binarize_rows {}x{d}", idx.len()),
        max_rel_err: e,
        tolerance: 0.0,
    });
    for &len in &[1usize, 257, 100_003] {
        let a = normal(&[len], 42, &Device::Cpu)?;
        let b = normal(&[len], 42, dev)?;
        let e = compare(&b, &a, 1e-5, "normal")?;
        out.push(CheckReport {
            check: format!("normal n={len}"),
            max_rel_err: e,
            tolerance: 1e-5,
        });
    }
    Ok(out)
}

/// Every check above, with output poisoning on; stops at the first failure.
pub fn run_all(dev: &Device) -> Result<Vec<CheckReport>> {
    std::env::set_var("GENTRAIN_POISON_OUTPUTS", "1");
    crate::device::set_tf32(false);
    let mut out = Vec::new();
    for f in [
        check_gaussian,
        check_bernoulli,
        check_logsumexp,
        check_spectral_norm,
        check_linear,
        check_adam,
        check_train_step,
    ] {
        out.extend(f(dev)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_against_itself_passes_and_a_wrong_value_fails() {
        // The harness itself: CPU vs CPU agrees exactly, and compare() catches a bad value.
        let r = run_all(&Device::Cpu).unwrap();
        assert!(r.iter().all(|c| c.max_rel_err == 0.0), "{r:?}");
        let a = Tensor::new(&[1f32, 2.0, f32::NAN], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        assert!(compare(&a, &b, 1e-5, "x")
            .unwrap_err()
            .to_string()
            .contains("did not write"));
        let c = Tensor::new(&[1f32, 2.1, 3.0], &Device::Cpu).unwrap();
        assert!(compare(&c, &b, 1e-5, "x").is_err());
    }
}
