//! The RealNVP flow: invertibility, the log-determinant against a brute-force Jacobian, a 2-D
//! density that integrates to 1, the dequantization logit map and bits/dim, and training.

// Matrix code (Gaussian elimination, Jacobians) reads clearer with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;
use common::{central_differences, flat_f32, var_function};

use candle_core::{DType, Device, Tensor, Var};
use gentrain::config::{FlowConfig, FlowMasks, OptimConfig};
use gentrain::models::flow::{inverse_logit_transform, logit_transform};
use gentrain::models::Flow;
use gentrain::optim::Optimizer;
use gentrain::rng::{normal_vec, stream_rng, Stream};

/// `max |a - b|` over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    let mut rng = stream_rng(seed, Stream::Synthetic, 99);
    Tensor::from_vec(normal_vec(&mut rng, shape.0 * shape.1), shape, &Device::Cpu).unwrap()
}

/// A flow whose every parameter is moved off its initial value (so the couplings are not the
/// identity), with ActNorm initialized on `x`.
fn perturbed_flow(
    cfg: &FlowConfig,
    shape: (usize, usize, usize),
    seed: u64,
    x: &Tensor,
    amount: f64,
) -> Flow {
    let flow = Flow::new(
        cfg,
        shape,
        &Device::Cpu,
        &mut stream_rng(seed, Stream::Init, 0),
    )
    .unwrap();
    flow.initialize(x).unwrap();
    for (i, (_, var)) in flow.store.iter().enumerate() {
        let noise = randn(seed * 1000 + i as u64, (1, var.elem_count()))
            .reshape(var.shape())
            .unwrap();
        var.set(&(var.as_tensor() + (noise * amount).unwrap()).unwrap())
            .unwrap();
    }
    flow
}

fn small_cfg(layers: usize, hidden: usize) -> FlowConfig {
    FlowConfig {
        coupling_layers: layers,
        hidden: vec![hidden, hidden],
        ..Default::default()
    }
}

#[test]
fn x_to_z_to_x_round_trips() {
    // Checkerboard masks, and channel masks on colour shapes.
    let channel = |layers| FlowConfig {
        masks: FlowMasks::Channel,
        ..small_cfg(layers, 32)
    };
    for (shape, cfg) in [
        ((1, 1, 2), small_cfg(6, 32)),
        ((1, 2, 3), small_cfg(6, 32)),
        ((1, 28, 28), small_cfg(4, 32)),
        ((3, 2, 3), channel(6)),
        ((2, 4, 4), channel(4)),
    ] {
        let d = shape.0 * shape.1 * shape.2;
        let x = randn(d as u64, (64, d));
        let flow = perturbed_flow(&cfg, shape, 3, &x, 0.05);
        let (z, log_det) = flow.forward(&x).unwrap();
        assert!(
            log_det
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        let back = flow.inverse(&z).unwrap();
        let err = max_abs_diff(&back, &x);
        assert!(err < 1e-4, "D = {d}: max |x - f^-1(f(x))| = {err}");
        // And the other way: z -> x -> z.
        let z2 = flow.forward(&flow.inverse(&z).unwrap()).unwrap().0;
        let err = max_abs_diff(&z2, &z);
        assert!(err < 1e-3, "D = {d}: max |z - f(f^-1(z))| = {err}");
    }
}

/// `ln |det A|` of a small square matrix by LU with partial pivoting, in f64.
fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut total = 0.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        let pivot = a[c][c];
        total += pivot.abs().ln();
        for r in c + 1..n {
            let f = a[r][c] / pivot;
            for k in c..n {
                a[r][k] -= f * a[c][k];
            }
        }
    }
    total
}

#[test]
fn log_det_matches_a_brute_force_jacobian() {
    let channel = FlowConfig {
        masks: FlowMasks::Channel,
        ..small_cfg(4, 16)
    };
    for (shape, cfg) in [
        ((1, 1, 2), small_cfg(4, 16)),
        ((1, 1, 3), small_cfg(4, 16)),
        ((1, 2, 3), small_cfg(4, 16)),
        ((3, 1, 2), channel.clone()),
    ] {
        let d = shape.0 * shape.1 * shape.2;
        let data = randn(7 + d as u64, (32, d));
        let flow = perturbed_flow(&cfg, shape, 11, &data, 0.1);
        let x = Var::from_tensor(&randn(5, (3, d))).unwrap();
        let (z, log_det) = flow.forward(x.as_tensor()).unwrap();
        let log_det: Vec<f32> = log_det.to_vec1().unwrap();
        // Row i of every sample's Jacobian: the gradient of sum_b z[b, i] (rows are independent).
        let mut jac = vec![vec![vec![0f64; d]; d]; 3];
        for i in 0..d {
            let g = z
                .narrow(1, i, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx: Vec<Vec<f32>> = g.get(x.as_tensor()).unwrap().to_vec2().unwrap();
            for b in 0..3 {
                for j in 0..d {
                    jac[b][i][j] = gx[b][j] as f64;
                }
            }
        }
        for b in 0..3 {
            let brute = log_abs_det(jac[b].clone());
            let err = (brute - log_det[b] as f64).abs() / brute.abs().max(1.0);
            assert!(
                err < 1e-4,
                "D = {d}, row {b}: log|det J| {brute} vs flow {}",
                log_det[b]
            );
        }
    }
}

#[test]
fn a_2d_density_integrates_to_one() {
    let data = randn(21, (256, 2));
    let flow = perturbed_flow(&small_cfg(6, 32), (1, 1, 2), 4, &data, 0.05);
    let (n, lo, hi) = (400usize, -8f32, 8f32);
    let h = (hi - lo) / n as f32;
    let mut pts = Vec::with_capacity(2 * n * n);
    for i in 0..n {
        for j in 0..n {
            pts.push(lo + (i as f32 + 0.5) * h);
            pts.push(lo + (j as f32 + 0.5) * h);
        }
    }
    let grid = Tensor::from_vec(pts, (n * n, 2), &Device::Cpu).unwrap();
    let lp: Vec<f32> = flow.log_prob(&grid).unwrap().to_vec1().unwrap();
    let mass: f64 = lp.iter().map(|&v| (v as f64).exp()).sum::<f64>() * (h as f64 * h as f64);
    assert!(
        (mass - 1.0).abs() < 0.01,
        "integral of p over [-8, 8]^2 = {mass}"
    );
}

#[test]
fn logit_map_jacobian_inverse_and_bits_per_dim() {
    let alpha = 0.05;
    let x = Tensor::new(&[[0.001f32, 0.3, 0.5, 0.97]], &Device::Cpu).unwrap();
    let (y, log_jac) = logit_transform(&x, alpha).unwrap();
    // Finite differences of y_j(x_j) in f64.
    let f = |v: f64| {
        let p = alpha + (1.0 - 2.0 * alpha) * v;
        (p / (1.0 - p)).ln()
    };
    let xs = flat_f32(&x);
    let brute: f64 = xs
        .iter()
        .map(|&v| central_differences(|p: &[f64]| f(p[0]), &[v as f64], &[0], 1e-6)[0].ln())
        .sum();
    let lj = log_jac.to_vec1::<f32>().unwrap()[0] as f64;
    assert!((lj - brute).abs() < 1e-3, "{lj} vs {brute}");
    let back = inverse_logit_transform(&y, alpha).unwrap();
    let err = max_abs_diff(&back, &x);
    assert!(err < 1e-5, "{err}");

    // A fresh flow without ActNorm is the identity: log p_y(y) = log N(y; 0, I), so bits/dim
    // follows by hand.
    let cfg = FlowConfig {
        actnorm: false,
        ..small_cfg(2, 8)
    };
    let flow = Flow::new(
        &cfg,
        (1, 2, 2),
        &Device::Cpu,
        &mut stream_rng(0, Stream::Init, 0),
    )
    .unwrap();
    let lpy = flow.log_prob(&y).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let ys = flat_f32(&y);
    let by_hand: f64 = ys
        .iter()
        .map(|&v| -0.5 * ((v as f64).powi(2) + (2.0 * std::f64::consts::PI).ln()))
        .sum();
    assert!((lpy - by_hand).abs() < 1e-4, "{lpy} vs {by_hand}");
    let bpd = gentrain::objectives::bits_per_dim(-(lpy + lj), 4, true);
    let expected = -(by_hand + brute - 4.0 * 256f64.ln()) / (4.0 * std::f64::consts::LN_2);
    assert!((bpd - expected).abs() < 1e-3, "{bpd} vs {expected}");
}

#[test]
fn nll_gradient_matches_finite_differences() {
    let data = randn(3, (16, 3));
    let flow = perturbed_flow(&small_cfg(2, 6), (1, 1, 3), 8, &data, 0.2);
    let nll = |f: &Flow| -> f64 {
        -f.log_prob(&data)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = flow
        .log_prob(&data)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in flow.store.iter() {
        let g = flat_f32(grads.get(var.as_tensor()).unwrap());
        // The entry with the largest gradient of each parameter tensor.
        let (i, gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let (x, f) = var_function(var, || nll(&flow));
        let fd = central_differences(f, &x, &[i], 2e-3f32)[0];
        let err = (fd - *gi as f64).abs() / (gi.abs() as f64).max(1e-2);
        assert!(
            err < 2e-2,
            "{name}[{i}]: autograd {gi} vs finite differences {fd}"
        );
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn training_lowers_the_nll_of_two_moons() {
    let mut rng = stream_rng(0, Stream::Synthetic, 0);
    let pts: Vec<f32> = gentrain::data::synthetic::Synthetic::Moons
        .sample(512, &mut rng)
        .into_iter()
        .flatten()
        .collect();
    let x = Tensor::from_vec(pts, (512, 2), &Device::Cpu).unwrap();
    let flow = Flow::new(
        &small_cfg(6, 64),
        (1, 1, 2),
        &Device::Cpu,
        &mut stream_rng(0, Stream::Init, 0),
    )
    .unwrap();
    flow.initialize(&x).unwrap();
    let nll = |f: &Flow| -> f32 {
        -f.log_prob(&x)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = nll(&flow);
    let mut opt = Optimizer::new(
        &OptimConfig {
            lr: 3e-3,
            ..Default::default()
        },
        &flow.store,
    )
    .unwrap();
    for _ in 0..300 {
        let loss = flow
            .log_prob(&x)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        opt.step(&loss.backward().unwrap(), 3e-3, None).unwrap();
    }
    let after = nll(&flow);
    // Standardized moons under N(0, I) cost about 2.8 nats; a trained flow is far below that.
    assert!(after < before - 0.8, "NLL {before} -> {after}");
    assert!(after < 1.6, "NLL after training {after}");
}

#[test]
fn channel_masks_pass_alternate_channels_through() {
    // One coupling, no ActNorm: layer 0 passes the odd channels through unchanged and transforms
    // the even ones (their values depend on the odd ones after the perturbation).
    let cfg = FlowConfig {
        actnorm: false,
        masks: FlowMasks::Channel,
        ..small_cfg(1, 8)
    };
    let (c, h, w) = (3, 2, 2);
    let d = c * h * w;
    let x = randn(31, (4, d));
    let flow = perturbed_flow(&cfg, (c, h, w), 5, &x, 0.3);
    let (z, _) = flow.forward(&x).unwrap();
    let (xs, zs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (x.to_vec2().unwrap(), z.to_vec2().unwrap());
    for (xr, zr) in xs.iter().zip(&zs) {
        for i in 0..d {
            let passed = (i / (h * w)) % 2 == 1;
            assert_eq!(xr[i] == zr[i], passed, "value {i}: x {} z {}", xr[i], zr[i]);
        }
    }
    // One channel has nothing to alternate with.
    let refused = Flow::new(
        &cfg,
        (1, 4, 4),
        &Device::Cpu,
        &mut stream_rng(0, Stream::Init, 0),
    );
    let Err(e) = refused else {
        panic!("channel masks on one channel were accepted")
    };
    assert!(e.to_string().contains("at least 2 channels"), "{e}");
}
