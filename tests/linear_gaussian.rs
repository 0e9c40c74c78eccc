//! ELBO and IWAE against closed forms on a linear-Gaussian model, where everything is exact:
//! p(z) = N(0, I), p(x|z) = N(W z + b, s2 I) gives log p(x) = log N(x; b, W W^T + s2 I); a
//! diagonal Gaussian q(z|x) = N(m, diag(v)) gives
//! ELBO = log N(x; W m + b, s2 I) - tr(W diag(v) W^T) / (2 s2) - KL(q || p).
//! A VAE with no hidden layers and a Gaussian decoder is exactly this model.
#![allow(clippy::needless_range_loop)] // closed-form linear algebra reads best with indices

mod common;
use common::flat_f32;

use candle_core::{Device, Tensor};
use gentrain::config::{
    Activation, DecoderKind, KlEstimator, LayerConfig, ModelConfig, ModelFamily, ObjectiveConfig,
    ObjectiveKind,
};
use gentrain::eval::likelihood::{self, ImageEstimates};
use gentrain::eval::{Estimator, LikelihoodOptions};
use gentrain::models::Vae;
use gentrain::objectives::{log_weights, objective};
use gentrain::rng::{stream_rng, Stream};

const D: usize = 3;
const Z: usize = 2;
const W: [[f64; Z]; D] = [[1.0, 0.5], [-0.7, 1.2], [0.3, -0.4]];
const B: [f64; D] = [0.1, -0.2, 0.3];
const S2: f64 = 0.5;
const X: [f64; D] = [1.0, 0.5, -1.5];

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

fn inv3(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let d = det3(m);
    let mut inv = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let (r1, r2) = ((j + 1) % 3, (j + 2) % 3);
            let (c1, c2) = ((i + 1) % 3, (i + 2) % 3);
            inv[i][j] = (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / d;
        }
    }
    inv
}

/// Exact log p(x) = log N(x; b, W W^T + s2 I).
fn exact_log_px() -> f64 {
    let mut cov = [[0.0; 3]; 3];
    for i in 0..D {
        for j in 0..D {
            cov[i][j] =
                (0..Z).map(|k| W[i][k] * W[j][k]).sum::<f64>() + if i == j { S2 } else { 0.0 };
        }
    }
    let inv = inv3(&cov);
    let r: Vec<f64> = (0..D).map(|i| X[i] - B[i]).collect();
    let quad: f64 = (0..D)
        .map(|i| (0..D).map(|j| r[i] * inv[i][j] * r[j]).sum::<f64>())
        .sum();
    -0.5 * (D as f64 * (2.0 * std::f64::consts::PI).ln() + det3(&cov).ln() + quad)
}

/// Exact ELBO for q = N(m, diag(v)).
fn exact_elbo(m: &[f64; Z], v: &[f64; Z]) -> f64 {
    let mut e = 0.0;
    for i in 0..D {
        let mean = (0..Z).map(|k| W[i][k] * m[k]).sum::<f64>() + B[i];
        let tr = (0..Z).map(|k| W[i][k] * W[i][k] * v[k]).sum::<f64>();
        e += -0.5 * ((2.0 * std::f64::consts::PI * S2).ln() + ((X[i] - mean).powi(2) + tr) / S2);
    }
    let kl: f64 = (0..Z)
        .map(|k| 0.5 * (m[k] * m[k] + v[k] - 1.0 - v[k].ln()))
        .sum();
    e - kl
}

/// The exact posterior N(mu, Sigma) and the diagonal q we use (its marginal means, and the
/// diagonal of the precision inverted, which is the KL-optimal mean-field variance).
fn posterior() -> ([f64; Z], [f64; Z]) {
    // Precision P = I + W^T W / s2; mean = P^-1 W^T (x - b) / s2.
    let mut p = [[0.0; Z]; Z];
    for a in 0..Z {
        for c in 0..Z {
            p[a][c] = (0..D).map(|i| W[i][a] * W[i][c]).sum::<f64>() / S2
                + if a == c { 1.0 } else { 0.0 };
        }
    }
    let det = p[0][0] * p[1][1] - p[0][1] * p[1][0];
    let pinv = [
        [p[1][1] / det, -p[0][1] / det],
        [-p[1][0] / det, p[0][0] / det],
    ];
    let rhs: Vec<f64> = (0..Z)
        .map(|a| (0..D).map(|i| W[i][a] * (X[i] - B[i])).sum::<f64>() / S2)
        .collect();
    let mean = [
        pinv[0][0] * rhs[0] + pinv[0][1] * rhs[1],
        pinv[1][0] * rhs[0] + pinv[1][1] * rhs[1],
    ];
    (mean, [1.0 / p[0][0], 1.0 / p[1][1]])
}

/// A VAE whose encoder outputs exactly (m, log v) for input X and whose decoder is the linear
/// Gaussian above.
fn model(m: &[f64; Z], v: &[f64; Z]) -> Vae {
    let cfg = ModelConfig {
        family: ModelFamily::Vae,
        activation: Activation::Tanh,
        decoder: DecoderKind::Gaussian,
        layers: vec![LayerConfig {
            hidden: vec![],
            latent: Z,
        }],
        ..ModelConfig::default()
    };
    let dev = Device::Cpu;
    let vae = Vae::new(&cfg, D, &dev, &mut stream_rng(0, Stream::Init, 0)).unwrap();
    let t = |v: Vec<f64>, shape: &[usize]| {
        Tensor::from_vec(
            v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
            shape,
            &dev,
        )
        .unwrap()
    };
    for (name, var) in vae.store.iter() {
        let value = match name {
            "encoders.0.mu.weight" | "encoders.0.logvar.weight" | "decoders.0.logvar.weight" => {
                t(vec![0.0; var.elem_count()], var.dims())
            }
            "encoders.0.mu.bias" => t(m.to_vec(), &[Z]),
            "encoders.0.logvar.bias" => t(v.iter().map(|x| x.ln()).collect(), &[Z]),
            "decoders.0.mu.weight" => t(W.iter().flatten().copied().collect(), &[D, Z]),
            "decoders.0.mu.bias" => t(B.to_vec(), &[D]),
            "decoders.0.logvar.bias" => t(vec![S2.ln(); D], &[D]),
            other => panic!("unexpected parameter {other}"),
        };
        var.set(&value).unwrap();
    }
    vae
}

fn batch_of_x(n: usize) -> Tensor {
    let row: Vec<f32> = X.iter().map(|v| *v as f32).collect();
    Tensor::from_vec(row.repeat(n), (n, D), &Device::Cpu).unwrap()
}

/// Mean over `reps` independent replicates of the bound with `k` samples (batches of at most
/// 2000 replicates, averaged in f64 so that f32 summation error stays out of the comparison).
fn bound(vae: &Vae, kind: ObjectiveKind, kl: KlEstimator, k: usize, reps: usize, seed: u64) -> f64 {
    let cfg = ObjectiveConfig {
        kind,
        k,
        kl,
        ..Default::default()
    };
    let dens = !(kind == ObjectiveKind::Elbo && kl == KlEstimator::Analytic);
    let chunk = 2000.min(reps);
    let mut total = 0.0;
    for c in 0..reps / chunk {
        let x = batch_of_x(chunk);
        let eps = vae
            .draw_noise(
                k,
                chunk,
                &mut stream_rng(seed, Stream::Eval, (k * 100_000 + c) as u64),
            )
            .unwrap();
        let pass = vae.pass(&x, k, &eps, dens).unwrap();
        total += objective(&pass, &cfg, k, 1.0)
            .unwrap()
            .bound
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    total / (reps / chunk) as f64
}

#[test]
fn elbo_matches_the_closed_form_with_both_kl_estimators() {
    let (m, v) = ([0.3, -0.8], [0.4, 0.9]);
    let vae = model(&m, &v);
    let exact = exact_elbo(&m, &v);
    let analytic = bound(
        &vae,
        ObjectiveKind::Elbo,
        KlEstimator::Analytic,
        1,
        200_000,
        1,
    );
    let mc = bound(
        &vae,
        ObjectiveKind::Elbo,
        KlEstimator::MonteCarlo,
        1,
        200_000,
        2,
    );
    assert!(
        (analytic - exact).abs() < 0.02,
        "analytic-KL ELBO {analytic} vs exact {exact}"
    );
    assert!(
        (mc - exact).abs() < 0.02,
        "Monte-Carlo-KL ELBO {mc} vs exact {exact}"
    );
    assert!(exact < exact_log_px());
}

#[test]
fn elbo_equals_log_px_at_the_exact_posterior_up_to_mean_field_gap() {
    let (m, v) = posterior();
    let vae = model(&m, &v);
    let elbo = bound(
        &vae,
        ObjectiveKind::Elbo,
        KlEstimator::Analytic,
        1,
        200_000,
        3,
    );
    let exact = exact_elbo(&m, &v);
    assert!((elbo - exact).abs() < 0.02, "{elbo} vs {exact}");
    // Mean-field gap is small but positive for this correlated posterior.
    assert!(exact < exact_log_px() && exact_log_px() - exact < 0.5);
}

#[test]
fn iwae_bound_rises_toward_log_px_and_the_estimate_converges() {
    // A deliberately poor q makes the gap large, so the rise with k is visible.
    let (m, v) = ([0.0, 0.0], [1.5, 1.5]);
    let vae = model(&m, &v);
    let exact = exact_log_px();
    let ks = [1usize, 5, 50, 500];
    let bounds: Vec<f64> = ks
        .iter()
        .map(|&k| {
            bound(
                &vae,
                ObjectiveKind::Iwae,
                KlEstimator::MonteCarlo,
                k,
                if k < 50 { 100_000 } else { 4000 },
                4,
            )
        })
        .collect();
    for w in bounds.windows(2) {
        assert!(w[1] > w[0], "IWAE bound must rise with k: {bounds:?}");
    }
    assert!(
        bounds.iter().all(|b| *b < exact + 0.01),
        "{bounds:?} vs {exact}"
    );
    assert!(
        (bounds[0] - exact_elbo(&m, &v)).abs() < 0.1,
        "k = 1 is the ELBO: {} vs {}",
        bounds[0],
        exact_elbo(&m, &v)
    );
    // The importance-sampled estimate with many samples converges to log p(x); with the
    // mean-field posterior as proposal the weights are light-tailed and the estimate is tight.
    let data = gentrain::data::DataSource::from_real(X.iter().map(|v| *v as f32).collect(), D, 0);
    let ll =
        gentrain::eval::importance_sampled_log_likelihood(&vae, &data, 1, 20_000, 4096, 7).unwrap();
    assert!(
        ll[0] > bounds[2] - 0.05 && ll[0] < exact + 0.01,
        "IS estimate {} vs exact {exact}",
        ll[0]
    );
    let (pm, pv) = posterior();
    let good = model(&pm, &pv);
    let ll = gentrain::eval::importance_sampled_log_likelihood(&good, &data, 1, 20_000, 4096, 8)
        .unwrap();
    assert!(
        (ll[0] - exact).abs() < 0.005,
        "IS estimate {} vs exact {exact}",
        ll[0]
    );
    assert!(exact - bounds[3] < exact - bounds[0]);
}

#[test]
fn iwae_gradient_is_the_normalized_weight_average_of_log_weight_gradients() {
    let (m, v) = ([0.2, -0.3], [0.8, 1.3]);
    let vae = model(&m, &v);
    let k = 16;
    let reps = 8;
    let x = batch_of_x(reps);
    let eps = vae
        .draw_noise(k, reps, &mut stream_rng(9, Stream::Eval, 0))
        .unwrap();
    let pass = vae.pass(&x, k, &eps, true).unwrap();
    let cfg = ObjectiveConfig {
        kind: ObjectiveKind::Iwae,
        k,
        kl: KlEstimator::MonteCarlo,
        ..Default::default()
    };
    let g_iwae = objective(&pass, &cfg, k, 1.0).unwrap().bound.clone();
    // The bound tensor is detached; rebuild the differentiable IWAE loss and the weighted-sum
    // surrogate with constant normalized weights, and compare their gradients.
    let lw = log_weights(&pass, k).unwrap(); // (reps, k)
    let iwae = (gentrain::ops::logsumexp::logsumexp(&lw).unwrap() - (k as f64).ln())
        .unwrap()
        .mean_all()
        .unwrap();
    let w_norm = candle_nn::ops::softmax_last_dim(&lw.detach()).unwrap();
    let surrogate = (lw * w_norm).unwrap().sum(1).unwrap().mean_all().unwrap();
    assert!((iwae.to_scalar::<f32>().unwrap() - g_iwae.to_scalar::<f32>().unwrap()).abs() < 1e-4);
    let ga = iwae.backward().unwrap();
    let gb = surrogate.backward().unwrap();
    let mut checked = 0;
    for (name, var) in vae.store.iter() {
        let (Some(a), Some(b)) = (ga.get(var.as_tensor()), gb.get(var.as_tensor())) else {
            continue;
        };
        let (a, b) = (flat_f32(a), flat_f32(b));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{name}: {x} vs {y}");
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} parameters had gradients");
}

fn estimate(vae: &Vae, k: usize, seed: u64, estimator: Estimator) -> ImageEstimates {
    let data = gentrain::data::DataSource::from_real(X.iter().map(|v| *v as f32).collect(), D, 0);
    let o = LikelihoodOptions {
        k,
        max_rows: 4096,
        seed,
        estimator,
        sweep: vec![1, 10, k],
    };
    likelihood::estimate(vae, &data, 1, &o).unwrap()
}

#[test]
fn prior_sampling_converges_too_but_with_far_fewer_effective_samples() {
    let (pm, pv) = posterior();
    let vae = model(&pm, &pv);
    let exact = exact_log_px();
    let k = 20_000;
    let is = estimate(&vae, k, 11, Estimator::Importance);
    let prior = estimate(&vae, k, 11, Estimator::Prior);
    let (is_ess, prior_ess) = (is.ess[0], prior.ess[0]);
    // q is the mean-field fit of the exact posterior: most draws count.
    assert!(is_ess > 0.5 * k as f64, "importance ESS {is_ess} of {k}");
    assert!(
        prior_ess < 0.5 * is_ess && prior_ess >= 1.0,
        "prior ESS {prior_ess} vs importance {is_ess}"
    );
    assert!((is.log_likelihood[0] - exact).abs() < 0.005);
    // Unbiased in p, so with k = 20,000 the prior's estimate is close here (3 dimensions); its
    // Monte-Carlo error, from its ESS, is larger.
    let s_prior = prior.summary(k, Estimator::Prior);
    let s_is = is.summary(k, Estimator::Importance);
    assert!(s_prior.nll_mc_stderr.unwrap() > 2.0 * s_is.nll_mc_stderr.unwrap());
    assert!(
        (prior.log_likelihood[0] - exact).abs() < 5.0 * s_prior.nll_mc_stderr.unwrap() + 0.01,
        "prior estimate {} vs exact {exact} (MC error {})",
        prior.log_likelihood[0],
        s_prior.nll_mc_stderr.unwrap()
    );
    // The sweep's last point is the estimate itself; its first is one draw's log weight.
    assert_eq!(is.sweep[2], (k, is.log_likelihood.clone()));
    assert_eq!(
        s_is.k_sweep.iter().map(|p| p.k).collect::<Vec<_>>(),
        [1, 10, k]
    );
}

#[test]
fn the_reported_monte_carlo_error_matches_the_spread_over_seeds() {
    // A poor q (prior-like, too wide) so the error is visible at k = 100.
    let vae = model(&[0.0, 0.0], &[1.5, 1.5]);
    let k = 100;
    let runs: Vec<(f64, f64)> = (0..300)
        .map(|seed| {
            let e = estimate(&vae, k, 1000 + seed, Estimator::Importance);
            let s = e.summary(k, Estimator::Importance);
            (e.log_likelihood[0], s.nll_mc_stderr.unwrap())
        })
        .collect();
    let n = runs.len() as f64;
    let mean = runs.iter().map(|r| r.0).sum::<f64>() / n;
    let spread = (runs.iter().map(|r| (r.0 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let reported = runs.iter().map(|r| r.1).sum::<f64>() / n;
    assert!(
        reported > 0.7 * spread && reported < 1.4 * spread,
        "reported Monte-Carlo error {reported} vs the spread over seeds {spread}"
    );
    // And the estimate from more draws is larger on average (the bound tightens with k).
    let tighter = (0..300)
        .map(|seed| estimate(&vae, k, 1000 + seed, Estimator::Importance).sweep[1].1[0])
        .sum::<f64>()
        / n;
    assert!(mean > tighter, "k = {k}: {mean} vs k = 10: {tighter}");
}
