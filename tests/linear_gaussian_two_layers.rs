//! The IWAE bound and the likelihood estimate of a VAE with two stochastic layers against the
//! exact `log p(x)` of a linear-Gaussian chain (Burda et al. 2016's two-layer architecture with
//! no hidden layers and a Gaussian decoder is exactly this model):
//!
//! `z2 ~ N(0, 1)`, `z1 | z2 ~ N(A z2 + a, diag(s1))`, `x | z1 ~ N(W z1 + b, s2 I)`, so
//! `z1 ~ N(a, S1)`, `S1 = A A^T + diag(s1)`, and `x ~ N(W a + b, W S1 W^T + s2 I)`.
//!
//! The encoder's second layer is set to the exact `p(z2 | z1)` (linear in `z1`), so every
//! importance weight is `p(x | z1) p(z1) / q(z1 | x)`: the first layer's `q(z1 | x)` alone sets
//! the gap, and making it poor makes the rise of the bound with k visible.
#![allow(clippy::needless_range_loop)] // small dense linear algebra reads best with indices

use candle_core::{Device, Tensor};
use gentrain::config::{
    Activation, DecoderKind, LayerConfig, ModelConfig, ModelFamily, ObjectiveConfig, ObjectiveKind,
};
use gentrain::eval::likelihood::{self};
use gentrain::eval::{Estimator, LikelihoodOptions};
use gentrain::models::Vae;
use gentrain::objectives::objective;
use gentrain::rng::{stream_rng, Stream};

const D: usize = 3;
const Z1: usize = 2;
const A: [f64; Z1] = [0.8, -0.5];
const A0: [f64; Z1] = [0.2, -0.1];
const S1: [f64; Z1] = [0.3, 0.5];
const W: [[f64; Z1]; D] = [[1.0, 0.5], [-0.7, 1.2], [0.3, -0.4]];
const B: [f64; D] = [0.1, -0.2, 0.3];
const S2: f64 = 0.5;
const X: [f64; D] = [1.0, 0.5, -1.5];

type Mat = Vec<Vec<f64>>;

/// Inverse and log-determinant of a symmetric positive-definite matrix (Gauss-Jordan).
fn inv_logdet(m: &Mat) -> (Mat, f64) {
    let n = m.len();
    let mut a = m.clone();
    let mut inv: Mat = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let mut logdet = 0.0;
    for c in 0..n {
        let p = a[c][c];
        logdet += p.ln();
        for j in 0..n {
            a[c][j] /= p;
            inv[c][j] /= p;
        }
        for r in 0..n {
            if r != c {
                let f = a[r][c];
                for j in 0..n {
                    a[r][j] -= f * a[c][j];
                    inv[r][j] -= f * inv[c][j];
                }
            }
        }
    }
    (inv, logdet)
}

/// `S1 = A A^T + diag(s1)`, the marginal covariance of z1.
fn cov_z1() -> Mat {
    (0..Z1)
        .map(|i| {
            (0..Z1)
                .map(|j| A[i] * A[j] + if i == j { S1[i] } else { 0.0 })
                .collect()
        })
        .collect()
}

/// Exact `log p(x) = log N(x; W a + b, W S1 W^T + s2 I)`.
fn exact_log_px() -> f64 {
    let s1 = cov_z1();
    let cov: Mat = (0..D)
        .map(|i| {
            (0..D)
                .map(|j| {
                    let wsw: f64 = (0..Z1)
                        .map(|k| (0..Z1).map(|l| W[i][k] * s1[k][l] * W[j][l]).sum::<f64>())
                        .sum();
                    wsw + if i == j { S2 } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let (inv, logdet) = inv_logdet(&cov);
    let r: Vec<f64> = (0..D)
        .map(|i| X[i] - B[i] - (0..Z1).map(|k| W[i][k] * A0[k]).sum::<f64>())
        .collect();
    let quad: f64 = (0..D)
        .map(|i| (0..D).map(|j| r[i] * inv[i][j] * r[j]).sum::<f64>())
        .sum();
    -0.5 * (D as f64 * (2.0 * std::f64::consts::PI).ln() + logdet + quad)
}

/// The mean-field fit of `p(z1 | x)`: its mean and the inverted diagonal of its precision
/// `S1^-1 + W^T W / s2`.
fn posterior_z1() -> ([f64; Z1], [f64; Z1]) {
    let (s1_inv, _) = inv_logdet(&cov_z1());
    let p: Mat = (0..Z1)
        .map(|a| {
            (0..Z1)
                .map(|c| s1_inv[a][c] + (0..D).map(|i| W[i][a] * W[i][c]).sum::<f64>() / S2)
                .collect()
        })
        .collect();
    let rhs: Vec<f64> = (0..Z1)
        .map(|a| {
            (0..Z1).map(|c| s1_inv[a][c] * A0[c]).sum::<f64>()
                + (0..D).map(|i| W[i][a] * (X[i] - B[i])).sum::<f64>() / S2
        })
        .collect();
    let (pinv, _) = inv_logdet(&p);
    let mean = [
        pinv[0][0] * rhs[0] + pinv[0][1] * rhs[1],
        pinv[1][0] * rhs[0] + pinv[1][1] * rhs[1],
    ];
    (mean, [1.0 / p[0][0], 1.0 / p[1][1]])
}

/// The exact `p(z2 | z1) = N(c . (z1 - a), 1 / prec)`, `prec = 1 + sum_k A_k^2 / s1_k`,
/// `c_k = A_k / (s1_k prec)`: `(c, -c . a, variance)`.
fn posterior_z2() -> ([f64; Z1], f64, f64) {
    let prec = 1.0 + (0..Z1).map(|k| A[k] * A[k] / S1[k]).sum::<f64>();
    let c = [A[0] / (S1[0] * prec), A[1] / (S1[1] * prec)];
    (c, -(c[0] * A0[0] + c[1] * A0[1]), 1.0 / prec)
}

/// The two-layer VAE of the chain, with `q(z1 | x) = N(m, diag(v))` and the exact `q(z2 | z1)`.
fn model(m: &[f64; Z1], v: &[f64; Z1]) -> Vae {
    let cfg = ModelConfig {
        family: ModelFamily::Vae,
        activation: Activation::Tanh,
        decoder: DecoderKind::Gaussian,
        layers: vec![
            LayerConfig {
                hidden: vec![],
                latent: Z1,
            },
            LayerConfig {
                hidden: vec![],
                latent: 1,
            },
        ],
        ..ModelConfig::default()
    };
    let dev = Device::Cpu;
    let vae = Vae::new(&cfg, D, &dev, &mut stream_rng(0, Stream::Init, 0)).unwrap();
    let t = |v: Vec<f64>, shape: &[usize]| {
        let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let (c, d, var2) = posterior_z2();
    for (name, var) in vae.store.iter() {
        let zeros = || t(vec![0.0; var.elem_count()], var.dims());
        let value = match name {
            "encoders.0.mu.weight" | "encoders.0.logvar.weight" => zeros(),
            "encoders.0.mu.bias" => t(m.to_vec(), &[Z1]),
            "encoders.0.logvar.bias" => t(v.iter().map(|x| x.ln()).collect(), &[Z1]),
            "encoders.1.mu.weight" => t(c.to_vec(), &[1, Z1]),
            "encoders.1.mu.bias" => t(vec![d], &[1]),
            "encoders.1.logvar.weight" => zeros(),
            "encoders.1.logvar.bias" => t(vec![var2.ln()], &[1]),
            "decoders.1.mu.weight" => t(A.to_vec(), &[Z1, 1]),
            "decoders.1.mu.bias" => t(A0.to_vec(), &[Z1]),
            "decoders.1.logvar.weight" | "decoders.0.logvar.weight" => zeros(),
            "decoders.1.logvar.bias" => t(S1.iter().map(|x| x.ln()).collect(), &[Z1]),
            "decoders.0.mu.weight" => t(W.iter().flatten().copied().collect(), &[D, Z1]),
            "decoders.0.mu.bias" => t(B.to_vec(), &[D]),
            "decoders.0.logvar.bias" => t(vec![S2.ln(); D], &[D]),
            other => panic!("unexpected parameter {other}"),
        };
        var.set(&value).unwrap();
    }
    vae
}

/// Mean over `reps` replicates of the IWAE bound with `k` samples.
fn iwae_bound(vae: &Vae, k: usize, reps: usize, seed: u64) -> f64 {
    let cfg = ObjectiveConfig {
        kind: ObjectiveKind::Iwae,
        k,
        ..Default::default()
    };
    let chunk = 2000.min(reps);
    let row: Vec<f32> = X.iter().map(|v| *v as f32).collect();
    let x = Tensor::from_vec(row.repeat(chunk), (chunk, D), &Device::Cpu).unwrap();
    let mut total = 0.0;
    for c in 0..reps / chunk {
        let mut rng = stream_rng(seed, Stream::Eval, (k * 100_000 + c) as u64);
        let eps = vae.draw_noise(k, chunk, &mut rng).unwrap();
        let pass = vae.pass(&x, k, &eps, true).unwrap();
        let b = objective(&pass, &cfg, k, 1.0).unwrap().bound;
        total += b.to_scalar::<f32>().unwrap() as f64;
    }
    total / (reps / chunk) as f64
}

/// The importance-sampled estimate with k draws and its Monte-Carlo error.
fn estimate(vae: &Vae, k: usize, seed: u64) -> (f64, f64) {
    let data = gentrain::data::DataSource::from_real(X.iter().map(|v| *v as f32).collect(), D, 0);
    let o = LikelihoodOptions {
        k,
        max_rows: 8192,
        seed,
        estimator: Estimator::Importance,
        sweep: Vec::new(),
    };
    let e = likelihood::estimate(vae, &data, 1, &o).unwrap();
    let s = e.summary(k, Estimator::Importance);
    (e.log_likelihood[0], s.nll_mc_stderr.unwrap())
}

#[test]
fn the_two_layer_iwae_bound_rises_toward_the_exact_log_likelihood() {
    let exact = exact_log_px();
    // A poor first-layer q (centred, too wide): a large gap that closes with k.
    let vae = model(&[0.0, 0.0], &[1.5, 1.5]);
    let ks = [1usize, 5, 50, 500];
    let bounds: Vec<f64> = ks
        .iter()
        .map(|&k| iwae_bound(&vae, k, if k < 50 { 100_000 } else { 4000 }, 5))
        .collect();
    for w in bounds.windows(2) {
        assert!(
            w[1] > w[0],
            "the bound must rise with k: {bounds:?} (exact {exact})"
        );
    }
    assert!(
        bounds.iter().all(|b| *b < exact + 0.01),
        "{bounds:?} vs {exact}"
    );
    assert!(
        exact - bounds[3] < 0.25 * (exact - bounds[0]),
        "{bounds:?} vs {exact}"
    );
    // The estimate converges to log p(x) from both proposals, within its own Monte-Carlo error.
    for (label, vae) in [
        ("poor q", vae),
        ("mean-field posterior", {
            let (m, v) = posterior_z1();
            model(&m, &v)
        }),
    ] {
        let (ll, mc) = estimate(&vae, 20_000, 9);
        assert!(
            (ll - exact).abs() < 4.0 * mc + 0.003,
            "{label}: estimate {ll} vs exact {exact} (Monte-Carlo error {mc})"
        );
    }
}
