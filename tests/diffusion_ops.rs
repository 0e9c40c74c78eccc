//! The fused diffusion ops (`gentrain::ops::diffusion`) on the CPU: against their plain-candle
//! compositions on seeded inputs of several shapes (forward and gradients), their backwards
//! against central differences, non-finite inputs (the same class, NaN / `+inf` / `-inf` /
//! finite, as the compositions), the refusal of out-of-range time indices, and small cases
//! worked out in f64 here from a linear beta schedule (Ho et al. 2020, section 4).

mod common;
use common::{central_differences, flat_f32};

use candle_core::{DType, Device, Tensor, Var};
use gentrain::ops::diffusion::{
    q_sample, q_sample_slow, sampler_step, sampler_step_slow, simple_loss, simple_loss_slow,
    SamplerCoefficients,
};
use rand::{Rng, SeedableRng};

/// (B, D): B = 1, D of 1, of neither 32 nor 256 multiples, and above the CPU kernels' threshold
/// for threads (2^15 values).
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 1000),
    (3, 257),
    (17, 784),
    (64, 33),
    (300, 20),
    (2, 40_001),
];

const STEPS: usize = 1000;

fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn tensor(v: &[f32], b: usize, d: usize) -> Tensor {
    Tensor::from_slice(v, (b, d), &Device::Cpu).unwrap()
}

/// `abar_t = prod_{s <= t} (1 - beta_s)` of the linear schedule `beta` from 1e-4 to 0.02 over
/// `steps` (Ho et al. 2020, section 4), in f64: `(betas, abars)`.
fn schedule(steps: usize) -> (Vec<f64>, Vec<f64>) {
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

/// The `(T, 2)` table `[sqrt(abar_t), sqrt(1 - abar_t)]`, computed in f64 and cast.
fn table(steps: usize) -> Tensor {
    let (_, abars) = schedule(steps);
    let v: Vec<f32> = abars
        .iter()
        .flat_map(|a| [a.sqrt() as f32, (1.0 - a).sqrt() as f32])
        .collect();
    Tensor::from_vec(v, (steps, 2), &Device::Cpu).unwrap()
}

fn times(seed: u64, b: usize, steps: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t: Vec<u32> = (0..b).map(|_| rng.random_range(0..steps as u32)).collect();
    Tensor::from_vec(t, b, &Device::Cpu).unwrap()
}

/// DDPM ancestral step at 0-based index `t` (Ho et al. eq. 6-7): the posterior-mean weights of
/// `x0` and `x_t`, `sigma^2` the posterior variance `beta~_t`.
fn ddpm(t: usize, steps: usize, clip: Option<(f32, f32)>) -> SamplerCoefficients {
    let (betas, abars) = schedule(steps);
    let (beta, abar) = (betas[t], abars[t]);
    let prev = if t == 0 { 1.0 } else { abars[t - 1] };
    SamplerCoefficients {
        sqrt_recip_abar: (1.0 / abar).sqrt() as f32,
        sqrt_recipm1_abar: (1.0 / abar - 1.0).sqrt() as f32,
        clip,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        c_x0: (beta * prev.sqrt() / (1.0 - abar)) as f32,
        c_xt: ((1.0 - prev) * (1.0 - beta).sqrt() / (1.0 - abar)) as f32,
        c_eps: 0.0,
        sigma: (beta * (1.0 - prev) / (1.0 - abar)).sqrt() as f32,
    }
}

/// DDIM step from index `t` to `prev` (Song et al. eq. 12 and 16; `eta = 0` is deterministic).
fn ddim(
    t: usize,
    prev: Option<usize>,
    steps: usize,
    eta: f64,
    clip: Option<(f32, f32)>,
) -> SamplerCoefficients {
    let (_, abars) = schedule(steps);
    let abar = abars[t];
    let ap = prev.map_or(1.0, |p| abars[p]);
    let sigma = eta * ((1.0 - ap) / (1.0 - abar)).sqrt() * (1.0 - abar / ap).sqrt();
    SamplerCoefficients {
        sqrt_recip_abar: (1.0 / abar).sqrt() as f32,
        sqrt_recipm1_abar: (1.0 / abar - 1.0).sqrt() as f32,
        clip,
        sqrt_abar: abar.sqrt() as f32,
        sqrt_one_minus_abar: (1.0 - abar).sqrt() as f32,
        c_x0: ap.sqrt() as f32,
        c_xt: 0.0,
        c_eps: (1.0 - ap - sigma * sigma).sqrt() as f32,
        sigma: sigma as f32,
    }
}

/// The sampler settings every comparison runs: DDPM with and without clipping, deterministic
/// DDIM, and DDIM with eta = 1 and clipping, at early and late steps.
fn samplers(steps: usize) -> Vec<(&'static str, SamplerCoefficients)> {
    let clip = Some((-1.0, 1.0));
    vec![
        ("ddpm t=500", ddpm(500, steps, None)),
        ("ddpm t=0 clip", ddpm(0, steps, clip)),
        ("ddpm t=999 clip", ddpm(steps - 1, steps, clip)),
        (
            "ddim eta=0 999->949",
            ddim(steps - 1, Some(steps - 51), steps, 0.0, None),
        ),
        (
            "ddim eta=1 300->250 clip",
            ddim(300, Some(250), steps, 1.0, clip),
        ),
        ("ddim eta=0 20->end clip", ddim(20, None, steps, 0.0, clip)),
    ]
}

/// max `|a - b| / (1e-3 + |b|)`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat_f32(a), flat_f32(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1e-3 + y.abs()))
        .fold(0.0, f32::max)
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

fn classes_agree(fused: &Tensor, slow: &Tensor, what: &str) {
    let (f, s) = (flat_f32(fused), flat_f32(slow));
    assert_eq!(f.len(), s.len());
    for (i, (a, b)) in f.iter().zip(&s).enumerate() {
        assert_eq!(
            class(*a),
            class(*b),
            "{what}[{i}]: fused {a}, plain ops {b}"
        );
    }
}

/// Replaces about one value in 9 by one of `specials`, at seeded positions.
fn sprinkle(v: &mut [f32], seed: u64, specials: &[f32]) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (k, x) in v.iter_mut().enumerate() {
        if rng.random_range(0..9) == 0 {
            *x = specials[k % specials.len()];
        }
    }
}

/// The gradients of `sum(f(inputs) * up)` in every input.
fn gradients(f: impl Fn(&[&Tensor]) -> Tensor, vars: &[Var], up: &Tensor) -> (Tensor, Vec<Tensor>) {
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let y = f(&ts);
    let g = y
        .broadcast_mul(up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gs = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    (y, gs)
}

#[test]
fn fused_ops_match_their_compositions_forward_and_backward() {
    let tab = table(STEPS);
    for (i, &(b, d)) in SHAPES.iter().enumerate() {
        let s = 10 * i as u64;
        let x0 = tensor(&uniform(s, b * d, -1.0, 1.0), b, d);
        let eps = tensor(&uniform(s + 1, b * d, -3.0, 3.0), b, d);
        let pred = tensor(&uniform(s + 2, b * d, -3.0, 3.0), b, d);
        let t = times(s + 3, b, STEPS);
        let vars = [
            Var::from_tensor(&x0).unwrap(),
            Var::from_tensor(&eps).unwrap(),
        ];

        let up = tensor(&uniform(s + 4, b * d, -1.0, 1.0), b, d);
        let (fast, gf) = gradients(|v| q_sample(v[0], v[1], &t, &tab).unwrap(), &vars, &up);
        let (slow, gs) = gradients(|v| q_sample_slow(v[0], v[1], &t, &tab).unwrap(), &vars, &up);
        assert_eq!(fast.dims(), [b, d]);
        assert!(
            rel_err(&fast, &slow) < 1e-6,
            "q_sample {b}x{d}: {}",
            rel_err(&fast, &slow)
        );
        for (k, (a, c)) in gf.iter().zip(&gs).enumerate() {
            assert!(
                rel_err(a, c) < 1e-6,
                "q_sample {b}x{d} gradient {k}: {}",
                rel_err(a, c)
            );
        }

        let up = Tensor::from_vec(uniform(s + 5, b, -1.0, 1.0), b, &Device::Cpu).unwrap();
        let vars = [
            Var::from_tensor(&pred).unwrap(),
            Var::from_tensor(&eps).unwrap(),
        ];
        let (fast, gf) = gradients(|v| simple_loss(v[0], v[1]).unwrap(), &vars, &up);
        let (slow, gs) = gradients(|v| simple_loss_slow(v[0], v[1]).unwrap(), &vars, &up);
        assert_eq!(fast.dims(), [b]);
        assert!(
            rel_err(&fast, &slow) < 1e-5,
            "simple_loss {b}x{d}: {}",
            rel_err(&fast, &slow)
        );
        for (k, (a, c)) in gf.iter().zip(&gs).enumerate() {
            assert!(
                rel_err(a, c) < 1e-5,
                "simple_loss {b}x{d} gradient {k}: {}",
                rel_err(a, c)
            );
        }

        let noise = tensor(&uniform(s + 6, b * d, -3.0, 3.0), b, d);
        let x_t = q_sample(&x0, &eps, &t, &tab).unwrap();
        for (name, c) in samplers(STEPS) {
            let fast = sampler_step(&x_t, &pred, &noise, &c).unwrap();
            let slow = sampler_step_slow(&x_t, &pred, &noise, &c).unwrap();
            assert_eq!(fast.dims(), [b, d]);
            let e = rel_err(&fast, &slow);
            assert!(e < 1e-6, "sampler_step {name} {b}x{d}: {e}");
        }
    }
}

#[test]
fn backwards_match_central_differences() {
    let (b, d) = (3, 7);
    let tab = table(STEPS);
    let t = Tensor::new(&[0u32, 999, 400], &Device::Cpu).unwrap();
    let x0 = uniform(1, b * d, -1.0, 1.0);
    let eps = uniform(2, b * d, -2.0, 2.0);
    let w = tensor(&uniform(3, b * d, -1.0, 1.0), b, d);
    let wr = Tensor::new(&[0.7f32, -1.3, 0.4], &Device::Cpu).unwrap();
    let all: Vec<usize> = (0..b * d).collect();

    // q_sample: sum(q_sample(x0, eps) * w) in x0 and in eps.
    let q = |x: &[f32], e: &[f32]| {
        let y = q_sample(&tensor(x, b, d), &tensor(e, b, d), &t, &tab).unwrap();
        (y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (vx, ve) = (
        Var::from_slice(&x0, (b, d), &Device::Cpu).unwrap(),
        Var::from_slice(&eps, (b, d), &Device::Cpu).unwrap(),
    );
    let g = (q_sample(&vx, &ve, &t, &tab).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let fd_x = central_differences(|v| q(v, &eps), &x0, &all, 1e-2);
    let fd_e = central_differences(|v| q(&x0, v), &eps, &all, 1e-2);
    for (var, fd, what) in [(&vx, fd_x, "x0"), (&ve, fd_e, "eps")] {
        let an = flat_f32(g.get(var.as_tensor()).unwrap());
        for (i, (a, f)) in an.iter().zip(&fd).enumerate() {
            assert!(
                (*a as f64 - f).abs() < 1e-3,
                "q_sample d/d{what}[{i}]: {a} vs {f}"
            );
        }
    }

    // simple_loss: sum(simple_loss(pred, eps) * wr) in both inputs.
    let l = |p: &[f32], e: &[f32]| {
        let y = simple_loss(&tensor(p, b, d), &tensor(e, b, d)).unwrap();
        (y * &wr)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (vp, ve) = (
        Var::from_slice(&x0, (b, d), &Device::Cpu).unwrap(),
        Var::from_slice(&eps, (b, d), &Device::Cpu).unwrap(),
    );
    let g = (simple_loss(&vp, &ve).unwrap() * &wr)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let fd_p = central_differences(|v| l(v, &eps), &x0, &all, 1e-2);
    let fd_e = central_differences(|v| l(&x0, v), &eps, &all, 1e-2);
    for (var, fd, what) in [(&vp, fd_p, "eps_pred"), (&ve, fd_e, "eps")] {
        let an = flat_f32(g.get(var.as_tensor()).unwrap());
        for (i, (a, f)) in an.iter().zip(&fd).enumerate() {
            assert!(
                (*a as f64 - f).abs() < 1e-3,
                "simple_loss d/d{what}[{i}]: {a} vs {f}"
            );
        }
    }
}

#[test]
fn non_finite_inputs_give_the_class_of_the_compositions() {
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let (b, d) = (40, 33);
    let tab = table(STEPS);
    let t = times(7, b, STEPS);
    let mut v: Vec<Vec<f32>> = (0..5).map(|k| uniform(k, b * d, -3.0, 3.0)).collect();
    for (k, x) in v.iter_mut().enumerate() {
        sprinkle(x, 100 + k as u64, &specials);
    }
    let [x0, eps, pred, x_t, noise] = [0, 1, 2, 3, 4].map(|k| tensor(&v[k], b, d));
    classes_agree(
        &q_sample(&x0, &eps, &t, &tab).unwrap(),
        &q_sample_slow(&x0, &eps, &t, &tab).unwrap(),
        "q_sample",
    );
    classes_agree(
        &simple_loss(&pred, &eps).unwrap(),
        &simple_loss_slow(&pred, &eps).unwrap(),
        "simple_loss",
    );
    // Rows with one special each, so that every class of the loss shows up: NaN, an infinite
    // difference (+inf), inf - inf (NaN), equal infinities (NaN), none (finite).
    let (mut p, mut e) = (uniform(8, b * d, -3.0, 3.0), uniform(9, b * d, -3.0, 3.0));
    for r in 0..b {
        let j = r * d + r % d;
        match r % 5 {
            0 => p[j] = f32::NAN,
            1 => p[j] = f32::NEG_INFINITY,
            2 => e[j] = f32::NEG_INFINITY,
            3 => (p[j], e[j]) = (f32::INFINITY, f32::INFINITY),
            _ => {}
        }
    }
    let (p, e) = (tensor(&p, b, d), tensor(&e, b, d));
    let loss = simple_loss(&p, &e).unwrap();
    classes_agree(
        &loss,
        &simple_loss_slow(&p, &e).unwrap(),
        "simple_loss rows",
    );
    let classes: Vec<&str> = flat_f32(&loss).into_iter().map(class).collect();
    for (r, c) in classes.iter().enumerate() {
        let want = ["NaN", "+inf", "+inf", "NaN", "finite"][r % 5];
        assert_eq!(*c, want, "simple_loss row {r}");
    }
    for (name, c) in samplers(STEPS) {
        classes_agree(
            &sampler_step(&x_t, &pred, &noise, &c).unwrap(),
            &sampler_step_slow(&x_t, &pred, &noise, &c).unwrap(),
            &format!("sampler_step {name}"),
        );
    }
    // Clipping keeps NaN (f32::max / fminf would turn it into a bound) and bounds infinities.
    let one = |v: f32| Tensor::new(&[[v]], &Device::Cpu).unwrap();
    let zero = one(0.0);
    let out = |x: f32, c: &SamplerCoefficients| {
        flat_f32(&sampler_step(&one(x), &zero, &zero, c).unwrap())[0]
    };
    let (ddpm_c, ddim_c) = (
        ddpm(300, STEPS, Some((-1.0, 1.0))),
        ddim(300, Some(250), STEPS, 0.0, Some((-1.0, 1.0))),
    );
    assert!(out(f32::NAN, &ddpm_c).is_nan() && out(f32::NAN, &ddim_c).is_nan());
    // x_t = +inf: x0 clamps to 1, and DDPM's c_xt x_t is +inf; DDIM's c_xt = 0 times it is NaN
    // (IEEE, as in the composition).
    assert_eq!(out(f32::INFINITY, &ddpm_c), f32::INFINITY);
    assert!(out(f32::INFINITY, &ddim_c).is_nan());
}

#[test]
fn out_of_range_time_indices_are_refused_on_the_host() {
    let (b, d) = (4, 5);
    let tab = table(10);
    let x0 = tensor(&uniform(1, b * d, -1.0, 1.0), b, d);
    for bad in [10u32, 11, u32::MAX] {
        let t = Tensor::new(&[0u32, 9, bad, 3], &Device::Cpu).unwrap();
        for e in [
            q_sample(&x0, &x0, &t, &tab).unwrap_err(),
            q_sample_slow(&x0, &x0, &t, &tab).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains(&format!("time index {bad} of sample 2 is out of range"))
                    && e.contains("10 steps"),
                "{e}"
            );
        }
    }
    // Other shapes and dtypes are refused as well.
    let t = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    assert!(
        q_sample(&x0, &x0, &t, &tab).is_err(),
        "3 indices for 4 samples"
    );
    let t = Tensor::new(&[0i64, 1, 2, 3], &Device::Cpu).unwrap();
    assert!(q_sample(&x0, &x0, &t, &tab).is_err(), "i64 indices");
    let t = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
    assert!(
        q_sample(&x0, &x0, &t, &tab.narrow(1, 0, 1).unwrap()).is_err(),
        "(T, 1) table"
    );
    assert!(q_sample(&x0, &x0, &t, &tab.to_dtype(DType::F64).unwrap()).is_err());
    let other = tensor(&uniform(2, b * 6, -1.0, 1.0), b, 6);
    assert!(q_sample(&x0, &other, &t, &tab).is_err());
    assert!(simple_loss(&x0, &other).is_err());
    let c = ddpm(3, 10, Some((1.0, -1.0)));
    let e = sampler_step(&x0, &x0, &x0, &c).unwrap_err().to_string();
    assert!(e.contains("clip range"), "{e}");
    assert!(sampler_step(&x0, &other, &x0, &ddpm(3, 10, None)).is_err());
}

#[test]
fn small_cases_worked_out_in_f64() {
    // A 10-step linear schedule; two samples of 3 values at steps 0 and 6.
    let steps = 10;
    let (betas, abars) = schedule(steps);
    let tab = table(steps);
    let x0 = [0.5f32, -1.0, 0.25, 1.0, 0.0, -0.75];
    let eps = [1.5f32, 0.3, -2.0, -0.4, 1.1, 0.9];
    let ts = [0usize, 6];
    let close = |got: f32, want: f64, what: &str| {
        assert!(
            (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "{what}: {got} vs {want}"
        );
    };

    // q_sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4).
    let t = Tensor::new(&[0u32, 6], &Device::Cpu).unwrap();
    let xt = flat_f32(&q_sample(&tensor(&x0, 2, 3), &tensor(&eps, 2, 3), &t, &tab).unwrap());
    let mut want_xt = [0f64; 6];
    for i in 0..6 {
        let a = abars[ts[i / 3]];
        want_xt[i] = a.sqrt() * x0[i] as f64 + (1.0 - a).sqrt() * eps[i] as f64;
        close(xt[i], want_xt[i], &format!("q_sample[{i}]"));
    }
    // At step 0, abar = 1 - 1e-4: x_t is x0 plus a little noise.
    close(
        xt[0],
        0.9999f64.sqrt() * 0.5 + 1e-4f64.sqrt() * 1.5,
        "q_sample at t=0",
    );

    // simple_loss: mean_j (pred - eps)^2 per sample (eq. 14).
    let loss = flat_f32(&simple_loss(&tensor(&x0, 2, 3), &tensor(&eps, 2, 3)).unwrap());
    for r in 0..2 {
        let want: f64 = (0..3)
            .map(|j| (x0[3 * r + j] as f64 - eps[3 * r + j] as f64).powi(2))
            .sum::<f64>()
            / 3.0;
        close(loss[r], want, &format!("simple_loss[{r}]"));
    }

    // A DDPM step at t = 6 in the form of Ho et al. eq. 11 (Algorithm 2), which the coefficient
    // form of sampler_step (eq. 7 through the x0 prediction) must equal:
    // x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_pred) / sqrt(alpha_t) + sigma_t z.
    let (t6, pred, z) = (6, [0.2f32, -0.1, 0.4], [0.3f32, -1.2, 0.8]);
    let xt6: Vec<f32> = (0..3).map(|j| xt[3 + j]).collect();
    let (beta, abar, prev) = (betas[t6], abars[t6], abars[t6 - 1]);
    let sigma = (beta * (1.0 - prev) / (1.0 - abar)).sqrt();
    let got = flat_f32(
        &sampler_step(
            &tensor(&xt6, 1, 3),
            &tensor(&pred, 1, 3),
            &tensor(&z, 1, 3),
            &ddpm(t6, steps, None),
        )
        .unwrap(),
    );
    for j in 0..3 {
        let mean =
            (xt6[j] as f64 - beta / (1.0 - abar).sqrt() * pred[j] as f64) / (1.0 - beta).sqrt();
        close(
            got[j],
            mean + sigma * z[j] as f64,
            &format!("ddpm step[{j}]"),
        );
    }

    // The same step with x0 clipped to [-1, 1], written out in f64 (eq. 7 with the clamp).
    let got = flat_f32(
        &sampler_step(
            &tensor(&xt6, 1, 3),
            &tensor(&[3.0, -3.0, 0.1], 1, 3),
            &tensor(&z, 1, 3),
            &ddpm(t6, steps, Some((-1.0, 1.0))),
        )
        .unwrap(),
    );
    for (j, p) in [3.0f64, -3.0, 0.1].into_iter().enumerate() {
        let x0_hat = ((xt6[j] as f64 - (1.0 - abar).sqrt() * p) / abar.sqrt()).clamp(-1.0, 1.0);
        let want = beta * prev.sqrt() / (1.0 - abar) * x0_hat
            + (1.0 - prev) * (1.0 - beta).sqrt() / (1.0 - abar) * xt6[j] as f64
            + sigma * z[j] as f64;
        close(got[j], want, &format!("clipped ddpm step[{j}]"));
    }

    // Deterministic DDIM (Song et al. eq. 12, sigma = 0) from t = 6 to 2 with the true noise as
    // the prediction lands exactly on q(x_2 | x0) with the same noise.
    let got = flat_f32(
        &sampler_step(
            &tensor(&xt6, 1, 3),
            &tensor(&eps[3..], 1, 3),
            &tensor(&z, 1, 3),
            &ddim(t6, Some(2), steps, 0.0, None),
        )
        .unwrap(),
    );
    for j in 0..3 {
        let want = abars[2].sqrt() * x0[3 + j] as f64 + (1.0 - abars[2]).sqrt() * eps[3 + j] as f64;
        assert!(
            (got[j] as f64 - want).abs() < 1e-5,
            "ddim step[{j}]: {} vs {want}",
            got[j]
        );
    }

    // DDIM with eta = 1 and clipping, in f64: x0 clamped, eps2 re-derived from it.
    let c = ddim(t6, Some(2), steps, 1.0, Some((-0.5, 0.5)));
    let got = flat_f32(
        &sampler_step(
            &tensor(&xt6, 1, 3),
            &tensor(&pred, 1, 3),
            &tensor(&z, 1, 3),
            &c,
        )
        .unwrap(),
    );
    let ap = abars[2];
    let sig = ((1.0 - ap) / (1.0 - abar)).sqrt() * (1.0 - abar / ap).sqrt();
    for j in 0..3 {
        let x = xt6[j] as f64;
        let x0_hat = ((x - (1.0 - abar).sqrt() * pred[j] as f64) / abar.sqrt()).clamp(-0.5, 0.5);
        let eps2 = (x - abar.sqrt() * x0_hat) / (1.0 - abar).sqrt();
        let want = ap.sqrt() * x0_hat + (1.0 - ap - sig * sig).sqrt() * eps2 + sig * z[j] as f64;
        close(got[j], want, &format!("ddim eta=1 step[{j}]"));
    }
}

#[test]
fn ddim_without_noise_weight_never_divides_by_a_zero_sqrt_one_minus_abar() {
    // c_eps = 0 skips eps2, so sqrt(1 - abar) = 0 (abar = 1) cannot make a NaN.
    let c = SamplerCoefficients {
        sqrt_recip_abar: 1.0,
        sqrt_recipm1_abar: 0.0,
        clip: None,
        sqrt_abar: 1.0,
        sqrt_one_minus_abar: 0.0,
        c_x0: 1.0,
        c_xt: 0.0,
        c_eps: 0.0,
        sigma: 0.0,
    };
    let x = tensor(&[0.5, -0.25, 2.0], 1, 3);
    let zero = tensor(&[0.0; 3], 1, 3);
    type Step = fn(&Tensor, &Tensor, &Tensor, &SamplerCoefficients) -> candle_core::Result<Tensor>;
    let steps: [Step; 2] = [sampler_step, sampler_step_slow];
    for f in steps {
        assert_eq!(
            flat_f32(&f(&x, &zero, &zero, &c).unwrap()),
            vec![0.5, -0.25, 2.0]
        );
    }
}
