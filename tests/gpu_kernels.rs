//! GPU tests of the fused kernels against their CPU references (feature `cuda`).
//!
//! They are `#[ignore]`d, so a plain `cargo test --features cuda` reports them as ignored
//! (skipped), never as passed. On a GPU machine run the test executable with `--ignored`; there
//! each test fails loudly if the device is missing or any kernel disagrees with the CPU.
//! Inputs are seeded random tensors of shapes that are not multiples of the 256-thread block,
//! outputs are poisoned with NaN before every launch (`GENTRAIN_POISON_OUTPUTS=1`), forward
//! values and gradients are compared by relative error.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use gentrain::ops::{bernoulli, gaussian, linear, logsumexp};
use rand::{Rng, SeedableRng};

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 257),
    (129, 784),
    (1000, 50),
    (7, 1025),
    (513, 3),
];

fn gpu() -> Device {
    std::env::set_var("GENTRAIN_POISON_OUTPUTS", "1");
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn random(seed: u64, shape: (usize, usize), lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..shape.0 * shape.1)
        .map(|_| rng.random_range(lo..hi))
        .collect()
}

fn on(v: &[f32], shape: &[usize], dev: &Device) -> Var {
    Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, dev).unwrap()).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(gpu: &Tensor, cpu: &Tensor, tol: f32, what: &str) {
    let (g, c) = (host(gpu), host(cpu));
    assert_eq!(g.len(), c.len(), "{what}: length");
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!(
            a.is_finite() == b.is_finite(),
            "{what}[{i}]: gpu {a} cpu {b} (NaN means an unwritten output)"
        );
        if b.is_finite() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}[{i}]: gpu {a} vs cpu {b}"
            );
        }
    }
}

/// Runs `op` on both devices with the same inputs and a random upstream gradient, and compares
/// the outputs and the gradients of every input.
fn check(
    name: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    out_shape: &[usize],
    tol: f32,
    op: impl Fn(&[&Tensor]) -> Tensor,
) {
    let g = gpu();
    let up: Vec<f32> = random(99, (out_shape.iter().product(), 1), -1.0, 1.0);
    let mut results = Vec::new();
    for dev in [&Device::Cpu, &g] {
        let vars: Vec<Var> = inputs.iter().map(|(v, s)| on(v, s, dev)).collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let y = op(&ts);
        let upt = Tensor::from_vec(up.clone(), out_shape, dev).unwrap();
        let grads = (&y * &upt).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        results.push((y, gs));
    }
    let (cpu, gpu_r) = (&results[0], &results[1]);
    assert_close(&gpu_r.0, &cpu.0, tol, &format!("{name} forward"));
    for (i, (a, b)) in gpu_r.1.iter().zip(&cpu.1).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => assert_close(a, b, tol * 10.0, &format!("{name} grad {i}")),
            (None, None) => {}
            _ => panic!("{name} grad {i}: present on one device only"),
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn gaussian_kernels_match_cpu() {
    for (s, &(r, c)) in SHAPES.iter().enumerate() {
        let s = s as u64 * 10;
        let (mu, lv, eps) = (
            random(s, (r, c), -3.0, 3.0),
            random(s + 1, (r, c), -8.0, 8.0),
            random(s + 2, (r, c), -3.0, 3.0),
        );
        let shape = vec![r, c];
        check(
            "reparameterize",
            &[
                (mu.clone(), shape.clone()),
                (lv.clone(), shape.clone()),
                (eps.clone(), shape.clone()),
            ],
            &[r, c],
            1e-5,
            |t| gaussian::reparameterize(t[0], t[1], t[2]).unwrap(),
        );
        check(
            "gaussian_kl",
            &[(mu.clone(), shape.clone()), (lv.clone(), shape.clone())],
            &[r],
            1e-5,
            |t| gaussian::gaussian_kl(t[0], t[1]).unwrap(),
        );
        check(
            "gaussian_log_density",
            &[
                (eps.clone(), shape.clone()),
                (mu.clone(), shape.clone()),
                (lv.clone(), shape.clone()),
            ],
            &[r],
            1e-5,
            |t| gaussian::gaussian_log_density(t[0], t[1], t[2]).unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn bernoulli_kernels_match_cpu() {
    for (s, &(r, c)) in SHAPES.iter().enumerate() {
        let logits = random(s as u64, (r, c), -30.0, 30.0);
        let x: Vec<f32> = random(s as u64 + 7, (r, c), 0.0, 1.0)
            .into_iter()
            .map(|u| (u < 0.3) as u8 as f32)
            .collect();
        let xs = x.clone();
        check(
            "bernoulli_log_likelihood",
            &[(logits, vec![r, c])],
            &[r],
            1e-5,
            move |t| {
                let x = Tensor::from_vec(xs.clone(), (r, c), t[0].device()).unwrap();
                bernoulli::bernoulli_log_likelihood(t[0], &x).unwrap()
            },
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn logsumexp_kernels_match_cpu_including_infinite_log_weights() {
    for (s, &(r, k)) in SHAPES.iter().enumerate() {
        let mut a = random(s as u64, (r, k), -60.0, 20.0);
        for (i, v) in a.iter_mut().enumerate() {
            if i % 7 == 3 {
                *v = f32::NEG_INFINITY;
            }
        }
        check("logsumexp", &[(a, vec![r, k])], &[r], 1e-5, |t| {
            logsumexp::logsumexp(t[0]).unwrap()
        });
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn linear_epilogue_matches_cpu() {
    for act in [
        linear::Activation::Identity,
        linear::Activation::Relu,
        linear::Activation::Tanh,
        linear::Activation::Softplus,
    ] {
        for &(n, d_in, d_out) in &[(1usize, 1usize, 1usize), (129, 784, 400), (37, 20, 257)] {
            let (x, w, b) = (
                random(1, (n, d_in), -2.0, 2.0),
                random(2, (d_out, d_in), -0.1, 0.1),
                random(3, (d_out, 1), -0.5, 0.5),
            );
            check(
                &format!("linear {act:?}"),
                &[(x, vec![n, d_in]), (w, vec![d_out, d_in]), (b, vec![d_out])],
                &[n, d_out],
                1e-4,
                move |t| linear::linear(t[0], t[1], t[2], act).unwrap(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn a_training_step_matches_cpu() {
    // Same initialization, same batch and noise: one SGD step on each device (linear in the
    // gradients, so parameters agree to rounding; Adam's first step is sign-like and would
    // magnify rounding differences of near-zero gradients).
    use gentrain::config::{Config, OptimizerKind};
    let g = gpu();
    let mut cfg = Config::default();
    cfg.optim.kind = OptimizerKind::Sgd;
    cfg.optim.momentum = 0.0;
    let data = gentrain::data::DataSource::from_real(
        random(5, (64, 784), 0.0, 1.0)
            .into_iter()
            .map(|u| (u < 0.2) as u8 as f32)
            .collect(),
        784,
        0,
    );
    let idx: Vec<u32> = (0..64).collect();
    let mut params = Vec::new();
    for dev in [&Device::Cpu, &g] {
        let model = gentrain::session::build_model(&cfg, 784, dev).unwrap();
        let mut opt = gentrain::optim::Optimizer::new(&cfg.optim, &model.store).unwrap();
        let out =
            gentrain::train::train_step(&model, &mut opt, &cfg, &data, &idx, 0, 1.0, 1e-3, dev)
                .unwrap();
        assert!(out.finite);
        params.push((
            out.loss,
            model
                .store
                .iter()
                .map(|(_, v)| v.as_tensor().clone())
                .collect::<Vec<_>>(),
        ));
    }
    assert!(
        (params[0].0 - params[1].0).abs() < 1e-3 * params[0].0.abs(),
        "loss cpu {} gpu {}",
        params[0].0,
        params[1].0
    );
    for (c, gp) in params[0].1.iter().zip(&params[1].1) {
        assert_close(gp, c, 1e-4, "parameters after one step");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
fn adam_kernels_match_cpu() {
    use gentrain::ops::adam::{AdamApply, AdamMoments};
    let g = gpu();
    for &n in &[1usize, 255, 257, 100_003] {
        let (p0, g0, s0) = (
            random(1, (n, 1), -1.0, 1.0),
            random(2, (n, 1), -1.0, 1.0),
            random(3, (2 * n, 1), 0.0, 0.1),
        );
        let mut out = Vec::new();
        for dev in [&Device::Cpu, &g] {
            let p = Tensor::from_vec(p0.clone(), n, dev).unwrap();
            let grad = Tensor::from_vec(g0.clone(), n, dev).unwrap();
            let state = Tensor::from_vec(s0.clone(), 2 * n, dev).unwrap();
            state
                .inplace_op3(
                    &grad,
                    &p,
                    &AdamMoments {
                        beta1: 0.9,
                        beta2: 0.999,
                        weight_decay: 0.01,
                    },
                )
                .unwrap();
            p.inplace_op2(
                &state,
                &AdamApply {
                    lr: 1e-3,
                    eps: 1e-8,
                    bias_correction1: 0.19,
                    bias_correction2: 0.003,
                },
            )
            .unwrap();
            out.push((p, state));
        }
        assert_close(&out[1].1, &out[0].1, 1e-6, "adam moments");
        assert_close(&out[1].0, &out[0].0, 1e-6, "adam parameters");
    }
}
