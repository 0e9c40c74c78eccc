//! Known answers of the diffusion family (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al.
//! 2021), every reference computed in f64 in the test itself or taken from the published
//! schedules: the schedules' spot values, the forward process's marginals, the optimal noise
//! predictor of Gaussian data and its irreducible loss, the bound with the exact reverse
//! process (it equals the data's entropy), the discretized decoder's normalization, and the
//! samplers driven by the optimal predictor (they reproduce the data's moments).

use candle_core::{Device, Tensor};
use gentrain::config::{DiffusionConfig, NoiseSchedule, ReverseVariance, SamplerKind};
use gentrain::models::diffusion::sampler::{sample, SamplerSettings};
use gentrain::models::diffusion::{Diffusion, Schedule};
use gentrain::objectives::diffusion as obj;
use gentrain::rng::{normal_vec, stream_rng, Stream};

const MU: f64 = 0.3;
const S2: f64 = 0.25;

fn linear() -> Schedule {
    Schedule::new(&DiffusionConfig::default()).unwrap()
}

fn cosine() -> Schedule {
    Schedule::new(&DiffusionConfig {
        schedule: NoiseSchedule::Cosine,
        ..Default::default()
    })
    .unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn the_linear_schedule_has_the_published_spot_values() {
    let s = linear();
    assert_eq!(s.len(), 1000);
    assert!(rel(s.abar[0], 0.9999) < 1e-12);
    assert!(rel(s.abar[499], 7.8587242882e-2) < 1e-9, "{}", s.abar[499]);
    assert!(rel(s.abar[999], 4.0358297654e-5) < 1e-9, "{}", s.abar[999]);
    assert_eq!(s.posterior_variance[0], 0.0);
    assert!(rel(s.posterior_variance[1], 5.4531876613e-5) < 1e-9);
    assert!(
        (s.posterior_variance[487] - 0.00979).abs() < 5e-6,
        "{}",
        s.posterior_variance[487]
    );
    assert!((s.posterior_variance[999] - 0.02).abs() < 1e-6);
    // log beta~ is clipped at index 0 to index 1's value.
    assert_eq!(
        s.posterior_log_variance_clipped[0],
        s.posterior_variance[1].ln()
    );
}

#[test]
fn the_cosine_schedule_has_the_published_spot_values() {
    let s = cosine();
    assert!(rel(s.betas[0], 4.128422e-5) < 1e-5, "{}", s.betas[0]);
    assert_eq!(s.betas[999], 0.999);
    assert!(rel(s.abar[499], 0.493844) < 1e-5, "{}", s.abar[499]);
    assert!(rel(s.abar[999], 2.43e-9) < 0.01, "{}", s.abar[999]);
}

#[test]
fn bad_schedules_are_refused_by_name() {
    for (cfg, needle) in [
        (
            DiffusionConfig {
                timesteps: 0,
                ..Default::default()
            },
            "timesteps",
        ),
        (
            DiffusionConfig {
                beta_end: 1.5,
                ..Default::default()
            },
            "beta_end",
        ),
        (
            DiffusionConfig {
                beta_start: 0.0,
                ..Default::default()
            },
            "beta_start",
        ),
        (
            DiffusionConfig {
                max_beta: 1.0,
                ..Default::default()
            },
            "max_beta",
        ),
        (
            DiffusionConfig {
                sample_steps: 1001,
                ..Default::default()
            },
            "sample_steps",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = Schedule::from_betas(vec![0.1, 1.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 1"), "{e}");
}

/// 10^5 draws of x0 ~ N(MU, S2) as one column.
fn gaussian_data(n: usize, seed: u64) -> Vec<f64> {
    let z = normal_vec(&mut stream_rng(seed, Stream::Synthetic, 0), n);
    z.iter().map(|&z| MU + S2.sqrt() * z as f64).collect()
}

fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0),
    )
}

#[test]
fn iterating_the_forward_kernel_matches_the_closed_form_marginal() {
    let s = linear();
    let n = 100_000;
    let mut x = gaussian_data(n, 1);
    let x0 = Tensor::from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (n, 1),
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = stream_rng(2, Stream::Noise, 0);
    for t in 0..500 {
        let z = normal_vec(&mut rng, n);
        let b = s.betas[t];
        for (xi, zi) in x.iter_mut().zip(&z) {
            *xi = (1.0 - b).sqrt() * *xi + b.sqrt() * *zi as f64;
        }
        if t == 49 || t == 499 {
            let a = s.abar[t];
            let (m, v) = moments(&x);
            let (mt, vt) = (a.sqrt() * MU, a * S2 + 1.0 - a);
            // 10^5 draws: standard errors about 0.003 (mean) and 0.005 (variance).
            assert!(
                (m - mt).abs() < 0.012 && (v - vt).abs() < 0.02,
                "t {t}: {m} {v} vs {mt} {vt}"
            );
            // The fused q_sample draws the same marginal in one step.
            let eps = Tensor::from_vec(
                normal_vec(&mut stream_rng(3, Stream::Noise, t as u64), n),
                (n, 1),
                &Device::Cpu,
            )
            .unwrap();
            let ids = Tensor::from_vec(vec![t as u32; n], n, &Device::Cpu).unwrap();
            let xt = gentrain::ops::diffusion::q_sample(
                &x0,
                &eps,
                &ids,
                &s.q_table(&Device::Cpu).unwrap(),
            )
            .unwrap();
            let xt: Vec<f64> = xt
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let (m, v) = moments(&xt);
            assert!(
                (m - mt).abs() < 0.012 && (v - vt).abs() < 0.02,
                "q_sample t {t}: {m} {v}"
            );
        }
    }
}

/// `eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)`, the optimal
/// (posterior-mean) noise predictor of Gaussian data.
fn oracle_eps(s: &Schedule, t: usize, x: f64) -> f64 {
    let a = s.abar[t];
    (1.0 - a).sqrt() * (x - a.sqrt() * MU) / (a * S2 + 1.0 - a)
}

#[test]
fn the_optimal_predictor_reaches_the_irreducible_simple_loss() {
    // E_t Var(eps | x_t) for N(0.3, 0.25): 0.173053 (linear) and 0.327653 (cosine), T = 1000.
    for (s, want) in [(linear(), 0.173053), (cosine(), 0.327653)] {
        let n = 200_000;
        let x0 = gaussian_data(n, 4);
        let eps = normal_vec(&mut stream_rng(5, Stream::Noise, 0), n);
        let mut trng = stream_rng(6, Stream::Timestep, 0);
        let t: Vec<u32> = (0..n)
            .map(|_| rand::Rng::random_range(&mut trng, 0..1000u32))
            .collect();
        let dev = Device::Cpu;
        let col = |v: Vec<f32>| Tensor::from_vec(v, (n, 1), &dev).unwrap();
        let x0t = col(x0.iter().map(|&v| v as f32).collect());
        let epst = col(eps.clone());
        let ids = Tensor::from_vec(t.clone(), n, &dev).unwrap();
        let xt = gentrain::ops::diffusion::q_sample(&x0t, &epst, &ids, &s.q_table(&dev).unwrap())
            .unwrap();
        let xt: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
        let pred = col((0..n)
            .map(|i| oracle_eps(&s, t[i] as usize, xt[i] as f64) as f32)
            .collect());
        let loss = gentrain::ops::diffusion::simple_loss(&pred, &epst)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((loss - want).abs() < 0.004, "{loss} vs {want}");
    }
}

/// A model of 1-D points with learned variances (its network is not used: the tests feed the
/// bound the exact reverse process through the network's output).
fn one_d_model(variance: ReverseVariance) -> Diffusion {
    let cfg = DiffusionConfig {
        variance,
        hidden: vec![4],
        time_embedding: 4,
        ema_decay: 0.0,
        ..Default::default()
    };
    Diffusion::new(
        &cfg,
        1,
        None,
        &Device::Cpu,
        &mut stream_rng(0, Stream::Init, 0),
    )
    .unwrap()
}

/// The network output that makes the reverse step exact for Gaussian data at step `t`: the
/// optimal `eps` and the `v` whose interpolated variance is `beta~_t + c1_t^2 v_t` (for `t > 0`)
/// or `Var(x_0 | x_1)` (for `t = 0`).
fn oracle_output(s: &Schedule, t: usize, x: f64) -> [f32; 2] {
    let a = s.abar[t];
    let post = S2 * (1.0 - a) / (a * S2 + 1.0 - a);
    let var = if t == 0 {
        post
    } else {
        s.posterior_variance[t] + s.posterior_mean_coef1[t].powi(2) * post
    };
    let (hi, lo) = (s.betas[t].ln(), s.posterior_log_variance_clipped[t]);
    let frac = (var.ln() - lo) / (hi - lo);
    [oracle_eps(s, t, x) as f32, (2.0 * frac - 1.0) as f32]
}

#[test]
fn with_the_exact_reverse_process_the_bound_is_the_entropy_of_the_data() {
    // E[L_vlb] = H(N(0.3, 0.25)) + KL(q(x_T) || N(0, 1)) = 0.725791 nats (+ about 1e-5).
    let m = one_d_model(ReverseVariance::Learned);
    let s = &m.schedule;
    let n = 4000;
    let dev = Device::Cpu;
    let x0v = gaussian_data(n, 7);
    let x0 = Tensor::from_vec(
        x0v.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (n, 1),
        &dev,
    )
    .unwrap();
    let mut total: Vec<f64> = obj::prior_kl(s, &x0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let mut rng = stream_rng(8, Stream::Noise, 0);
    for t in 0..s.len() {
        let eps = Tensor::from_vec(normal_vec(&mut rng, n), (n, 1), &dev).unwrap();
        let ids = Tensor::from_vec(vec![t as u32; n], n, &dev).unwrap();
        let xt = gentrain::ops::diffusion::q_sample(&x0, &eps, &ids, &m.q_table).unwrap();
        let xv: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
        let out: Vec<f32> = xv
            .iter()
            .flat_map(|&x| oracle_output(s, t, x as f64))
            .collect();
        let out = Tensor::from_vec(out, (n, 2), &dev).unwrap();
        let terms: Vec<f32> = obj::vb_terms(&m, &out, &x0, &xt, &vec![t as u32; n], false)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in total.iter_mut().zip(terms) {
            *a += b as f64;
        }
    }
    let (mean, var) = moments(&total);
    let se = (var / n as f64).sqrt();
    let want = 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * S2).ln();
    assert!((want - 0.725791).abs() < 1e-6);
    assert!(
        (mean - want).abs() < 4.0 * se + 2e-3,
        "bound {mean} +- {se} vs entropy {want}"
    );
}

#[test]
fn the_discretized_decoder_is_a_distribution_over_the_256_levels() {
    let dev = Device::Cpu;
    let x: Vec<f32> = (0..256)
        .map(|k| (-1.0 + 2.0 * k as f64 / 255.0) as f32)
        .collect();
    let xt = Tensor::from_vec(x, (1, 256), &dev).unwrap();
    for (m, log_s) in [
        (0.0f32, -3.0f32),
        (0.37, -1.0),
        (-0.9, -5.0),
        (0.5, 0.5),
        (1.3, -2.0),
    ] {
        let mean = Tensor::full(m, (1, 256), &dev).unwrap();
        let ls = Tensor::full(log_s, (1, 256), &dev).unwrap();
        let lp: Vec<f32> = obj::discretized_gaussian_log_likelihood(&xt, &mean, &ls)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "m {m} log_s {log_s}: {total}");
    }
    // A narrow decoder on the right level costs nearly nothing; far off, it costs the floor.
    let one = |x: f32, m: f32, ls: f32| -> f32 {
        let t = |v: f32| Tensor::full(v, (1, 1), &dev).unwrap();
        obj::discretized_gaussian_log_likelihood(&t(x), &t(m), &t(ls))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    let centre = (-1.0 + 2.0 * 100.0 / 255.0) as f32;
    assert!(one(centre, centre, -8.0) > -1e-4);
    assert!((one(centre, 0.9, -8.0) - (1e-12f64).ln() as f32).abs() < 1e-3);
    // The edge bins are open: a mean far beyond the top level still gives it all the mass.
    assert!(one(1.0, 3.0, -4.0) > -1e-4);
    assert!(one(-1.0, -3.0, -4.0) > -1e-4);
}

/// Runs a sampler on 10^5 1-D chains driven by the optimal predictor; returns the samples.
fn oracle_samples(
    kind: SamplerKind,
    steps: usize,
    eta: f64,
    variance: ReverseVariance,
) -> Vec<f64> {
    let s = linear();
    let n = 100_000;
    let dev = Device::Cpu;
    let mut rng = stream_rng(9, Stream::Sample, steps as u64);
    let x_t = Tensor::from_vec(normal_vec(&mut rng, n), (n, 1), &dev).unwrap();
    let settings = SamplerSettings {
        kind,
        steps,
        eta,
        clip: None,
        variance,
    };
    let model = |x: &Tensor, t: usize| -> gentrain::error::Result<Tensor> {
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let e: Vec<f32> = v
            .iter()
            .map(|&x| oracle_eps(&s, t, x as f64) as f32)
            .collect();
        Ok(Tensor::from_vec(e, (n, 1), &dev)?)
    };
    let noise = |shape: &[usize]| -> gentrain::error::Result<Tensor> {
        Ok(Tensor::from_vec(
            normal_vec(&mut rng, shape.iter().product()),
            shape,
            &dev,
        )?)
    };
    let x = sample(&s, &settings, x_t, model, noise, None).unwrap();
    x.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn ancestral_sampling_with_the_optimal_predictor_reproduces_the_data() {
    // Exact propagation of mean and variance (f64): sigma^2 = beta~ gives 0.30000 / 0.24613,
    // sigma^2 = beta gives 0.30000 / 0.25075. 10^5 chains: about +-0.0016 on the mean and
    // +-0.0011 on the variance (one standard error).
    for (variance, want) in [
        (ReverseVariance::FixedSmall, 0.24613),
        (ReverseVariance::FixedLarge, 0.25075),
    ] {
        let (m, v) = moments(&oracle_samples(SamplerKind::Ddpm, 1000, 0.0, variance));
        assert!((m - 0.3).abs() < 0.007, "{variance:?}: mean {m}");
        assert!((v - want).abs() < 0.005, "{variance:?}: var {v} vs {want}");
    }
}

#[test]
fn ddim_with_the_optimal_predictor_reproduces_the_published_moments() {
    // Deterministic DDIM (eta = 0) on all 1000 steps: mean 0.2990 (the prior mismatch is carried
    // by the ODE), variance 0.2485; with 10 steps the variance is 0.1308.
    let (m, v) = moments(&oracle_samples(
        SamplerKind::Ddim,
        1000,
        0.0,
        ReverseVariance::FixedLarge,
    ));
    assert!(
        (m - 0.2990).abs() < 0.007 && (v - 0.2485).abs() < 0.005,
        "{m} {v}"
    );
    let (_, v) = moments(&oracle_samples(
        SamplerKind::Ddim,
        10,
        0.0,
        ReverseVariance::FixedLarge,
    ));
    assert!((v - 0.1308).abs() < 0.005, "{v}");
    // eta = 1 on all steps is the sigma^2 = beta~ ancestral chain.
    let (m, v) = moments(&oracle_samples(
        SamplerKind::Ddim,
        1000,
        1.0,
        ReverseVariance::FixedLarge,
    ));
    assert!(
        (m - 0.3).abs() < 0.007 && (v - 0.24613).abs() < 0.005,
        "{m} {v}"
    );
}

#[test]
fn parameter_counts_match_the_built_networks() {
    use gentrain::config::DenoiserKind;
    let unet = |mult: Vec<usize>, blocks: usize, attention: bool, variance: ReverseVariance| {
        DiffusionConfig {
            denoiser: DenoiserKind::Unet,
            channels: 16,
            channel_mult: mult,
            res_blocks: blocks,
            attention,
            groups: 4,
            variance,
            ..Default::default()
        }
    };
    let cases = [
        (DiffusionConfig::default(), 2, None),
        (
            DiffusionConfig {
                input_embedding: 16,
                hidden: vec![32, 8],
                ..Default::default()
            },
            2,
            None,
        ),
        (
            DiffusionConfig {
                variance: ReverseVariance::Learned,
                ..Default::default()
            },
            784,
            Some((28, 28)),
        ),
        (
            unet(vec![1, 2, 2], 1, false, ReverseVariance::FixedLarge),
            784,
            Some((28, 28)),
        ),
        (
            unet(vec![1, 2], 2, true, ReverseVariance::Learned),
            144,
            Some((12, 12)),
        ),
        (
            unet(vec![2], 1, true, ReverseVariance::FixedSmall),
            35,
            Some((5, 7)),
        ),
    ];
    for (cfg, dim, image) in cases {
        let m = Diffusion::new(
            &cfg,
            dim,
            image.map(|(h, w)| (1, h, w)),
            &Device::Cpu,
            &mut stream_rng(0, Stream::Init, 0),
        )
        .unwrap();
        assert_eq!(cfg.parameter_count(dim), Some(m.store.numel()), "{cfg:?}");
        // The output has D m values per row, and a fresh U-Net predicts eps = 0 (zero-initialized
        // output convolution).
        let x = Tensor::ones((3, dim), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = m.forward(&m.store.tensors(), &x, &[0, 500, 999]).unwrap();
        assert_eq!(out.dims(), &[3, dim * cfg.output_multiplier()]);
        if image.is_some() && cfg.denoiser == DenoiserKind::Unet {
            let max = out
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(max, 0.0);
        }
        // The EMA starts as a copy with the same names.
        let ema = m.named_ema();
        assert_eq!(ema.len(), m.store.named_tensors().len());
        assert!(ema.iter().all(|(n, _)| n.starts_with("ema.")));
    }
}

#[test]
fn images_the_unet_cannot_halve_are_refused() {
    let cfg = DiffusionConfig {
        denoiser: gentrain::config::DenoiserKind::Unet,
        channel_mult: vec![1, 2, 2, 2],
        ..Default::default()
    };
    let e = Diffusion::new(
        &cfg,
        784,
        Some((1, 28, 28)),
        &Device::Cpu,
        &mut stream_rng(0, Stream::Init, 0),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("28x28") && e.contains("divisible by 8"), "{e}");
}
