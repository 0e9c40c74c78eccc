//! `ops::group_norm`: the fused GroupNorm (+ shift, + SiLU) against the composition of candle ops
//! (forward and the four gradients), against central differences of an f64 definition, NaN
//! staying inside its group, results independent of the thread count, the refused second
//! derivative, and shape errors.

mod common;
use common::{central_differences, flat_f32};

use candle_core::{Device, Tensor, Var};
use gentrain::ops::group_norm::{group_norm, group_norm_slow};

const EPS: f64 = 1e-5;

/// (B, C, H, W, groups): groups of one channel (instance norm) and of all channels (layer norm),
/// odd and rectangular images, a 1 x 1 map, and the MNIST U-Net's 64 channels at 14 x 14.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (2, 8, 5, 3, 4),
    (3, 6, 7, 7, 3),
    (1, 5, 4, 4, 5),
    (2, 6, 3, 5, 1),
    (4, 4, 1, 1, 2),
    (5, 64, 14, 14, 8),
];

fn uniform(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    common::seeded_uniform(seed, shape, lo, hi)
}

/// `max_i |a_i - b_i| / (1e-2 max |b| + |b_i| + 1e-3)`: the absolute floor is for gradients
/// that are zero in exact arithmetic (the shift of a one-channel group cancels in its mean).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    common::rel_err_floored(a, b, 1e-3)
}

struct Inputs {
    x: Tensor,
    shift: Tensor,
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

fn inputs(shape: (usize, usize, usize, usize, usize), seed: u64) -> Inputs {
    let (b, c, h, w, groups) = shape;
    Inputs {
        // An offset and a scale per call, so the statistics matter.
        x: uniform(seed, &[b, c, h, w], -2.0, 2.0)
            .affine(3.0, 1.5)
            .unwrap(),
        shift: uniform(seed + 1, &[b, c], -1.0, 1.0),
        gamma: uniform(seed + 2, &[c], 0.5, 1.5),
        beta: uniform(seed + 3, &[c], -0.5, 0.5),
        groups,
    }
}

type Norm =
    fn(&Tensor, Option<&Tensor>, &Tensor, &Tensor, usize, f64, bool) -> candle_core::Result<Tensor>;

#[test]
fn forward_matches_the_composition() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let a = inputs(shape, 10 * i as u64);
        for shifted in [false, true] {
            for silu in [false, true] {
                let s = shifted.then_some(&a.shift);
                let fused = group_norm(&a.x, s, &a.gamma, &a.beta, a.groups, EPS, silu).unwrap();
                let slow =
                    group_norm_slow(&a.x, s, &a.gamma, &a.beta, a.groups, EPS, silu).unwrap();
                assert_eq!(fused.dims(), a.x.dims());
                let e = rel_err(&flat_f32(&fused), &flat_f32(&slow));
                assert!(
                    e < 1e-4,
                    "{shape:?} shift {shifted} silu {silu}: rel err {e}"
                );
            }
        }
    }
}

/// Gradients of `sum(y * r)` with respect to x, the shift, gamma and beta.
fn gradients(f: Norm, a: &Inputs, r: &Tensor, shifted: bool, silu: bool) -> Vec<Vec<f32>> {
    let vars: Vec<Var> = [&a.x, &a.shift, &a.gamma, &a.beta]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let s = shifted.then(|| vars[1].as_tensor());
    let y = f(
        vars[0].as_tensor(),
        s,
        vars[2].as_tensor(),
        vars[3].as_tensor(),
        a.groups,
        EPS,
        silu,
    )
    .unwrap();
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .enumerate()
        .filter(|(i, _)| *i != 1 || shifted)
        .map(|(_, v)| flat_f32(grads.get(v.as_tensor()).expect("a gradient")))
        .collect()
}

#[test]
fn gradients_match_the_composition() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let a = inputs(shape, 100 + 10 * i as u64);
        let r = uniform(7 + i as u64, a.x.dims(), -1.0, 1.0);
        for shifted in [false, true] {
            for silu in [false, true] {
                let fused = gradients(group_norm, &a, &r, shifted, silu);
                let slow = gradients(group_norm_slow, &a, &r, shifted, silu);
                for (k, (f, s)) in fused.iter().zip(&slow).enumerate() {
                    let e = rel_err(f, s);
                    assert!(
                        e < 1e-3,
                        "{shape:?} shift {shifted} silu {silu} gradient {k}: rel err {e}"
                    );
                }
            }
        }
    }
}

/// The definition in f64: `y = act(gamma (u - mu) / sqrt(var + eps) + beta)`, `u = x + s`.
fn definition(p: &[f64], dims: (usize, usize, usize, usize), r: &[f64], silu: bool) -> f64 {
    let (b, c, hw, g) = dims;
    let n = b * c * hw;
    let (x, rest) = p.split_at(n);
    let (s, rest) = rest.split_at(b * c);
    let (gamma, beta) = rest.split_at(c);
    let cg = c / g;
    let mut total = 0.0;
    for bi in 0..b {
        for gi in 0..g {
            let u: Vec<(usize, f64)> = (gi * cg..(gi + 1) * cg)
                .flat_map(|ch| (0..hw).map(move |p| (ch, p)))
                .map(|(ch, pos)| (ch, x[(bi * c + ch) * hw + pos] + s[bi * c + ch]))
                .collect();
            let mean = u.iter().map(|v| v.1).sum::<f64>() / u.len() as f64;
            let var = u.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / u.len() as f64;
            for (k, &(ch, v)) in u.iter().enumerate() {
                let z = gamma[ch] * (v - mean) / (var + EPS).sqrt() + beta[ch];
                let y = if silu { z / (1.0 + (-z).exp()) } else { z };
                let idx = (bi * c + gi * cg) * hw + k;
                total += y * r[idx];
            }
        }
    }
    total
}

#[test]
fn gradients_match_central_differences_of_the_f64_definition() {
    let shape = (2, 6, 3, 4, 3);
    let (b, c, h, w, g) = shape;
    let a = inputs(shape, 500);
    let r = uniform(501, a.x.dims(), -1.0, 1.0);
    let rf: Vec<f64> = flat_f32(&r).iter().map(|&v| v as f64).collect();
    let params: Vec<f64> = [&a.x, &a.shift, &a.gamma, &a.beta]
        .iter()
        .flat_map(|t| flat_f32(t))
        .map(|v| v as f64)
        .collect();
    for silu in [false, true] {
        let fused: Vec<f32> = gradients(group_norm, &a, &r, true, silu).concat();
        let idx: Vec<usize> = (0..params.len()).step_by(7).collect();
        let fd = central_differences(
            |p: &[f64]| definition(p, (b, c, h * w, g), &rf, silu),
            &params,
            &idx,
            1e-6,
        );
        for (&i, d) in idx.iter().zip(&fd) {
            let e = (fused[i] as f64 - d).abs() / (1e-3 + d.abs());
            assert!(
                e < 2e-3,
                "silu {silu} parameter {i}: op {} vs fd {d}",
                fused[i]
            );
        }
    }
}

#[test]
fn nan_and_infinity_stay_inside_their_group() {
    let a = inputs((2, 6, 3, 3, 3), 900);
    let mut x = flat_f32(&a.x);
    x[2 * 9 + 4] = f32::NAN; // sample 0, channel 2: group 1
    x[54 + 4 * 9] = f32::INFINITY; // sample 1, channel 4: group 2
    let x = Tensor::from_vec(x, a.x.dims(), &Device::Cpu).unwrap();
    for silu in [false, true] {
        let f = flat_f32(&group_norm(&x, Some(&a.shift), &a.gamma, &a.beta, 3, EPS, silu).unwrap());
        let s = flat_f32(
            &group_norm_slow(&x, Some(&a.shift), &a.gamma, &a.beta, 3, EPS, silu).unwrap(),
        );
        for (i, (fv, sv)) in f.iter().zip(&s).enumerate() {
            let (sample, ch) = (i / 54, (i % 54) / 9);
            let poisoned = (sample == 0 && ch / 2 == 1) || (sample == 1 && ch / 2 == 2);
            assert_eq!(fv.is_nan(), poisoned, "element {i} (silu {silu}): {fv}");
            assert_eq!(sv.is_nan(), poisoned, "the composition, element {i}: {sv}");
            if !poisoned {
                assert!((fv - sv).abs() <= 1e-4 * (1.0 + sv.abs()), "element {i}");
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let a = inputs((6, 16, 9, 9, 4), 1200);
    let r = uniform(1201, a.x.dims(), -1.0, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| gradients(group_norm, &a, &r, true, true))
    };
    let one = run(1);
    for (k, (x, y)) in one.iter().zip(&run(3)).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "gradient {k} differs between 1 and 3 threads");
    }
}

#[test]
fn a_second_derivative_is_refused_not_zero() {
    let a = inputs((2, 4, 3, 3, 2), 1300);
    let x = Var::from_tensor(&a.x).unwrap();
    let y = group_norm(x.as_tensor(), None, &a.gamma, &a.beta, 2, EPS, true).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).unwrap();
    let err = dx.sqr().unwrap().sum_all().unwrap().backward().unwrap_err();
    assert!(err.to_string().contains("second derivative"), "{err}");
}

#[test]
fn bad_shapes_are_errors() {
    let a = inputs((2, 6, 3, 3, 3), 1400);
    let cases: Vec<(&str, candle_core::Result<Tensor>)> = vec![
        (
            "do not divide",
            group_norm(&a.x, None, &a.gamma, &a.beta, 4, EPS, false),
        ),
        (
            "do not divide",
            group_norm(&a.x, None, &a.gamma, &a.beta, 0, EPS, false),
        ),
        (
            "gamma has shape",
            group_norm(
                &a.x,
                None,
                &a.beta.narrow(0, 0, 5).unwrap(),
                &a.beta,
                3,
                EPS,
                false,
            ),
        ),
        (
            "shift has shape",
            group_norm(&a.x, Some(&a.gamma), &a.gamma, &a.beta, 3, EPS, false),
        ),
        (
            "rank",
            group_norm(
                &a.x.flatten_from(2).unwrap(),
                None,
                &a.gamma,
                &a.beta,
                3,
                EPS,
                false,
            ),
        ),
    ];
    for (needle, r) in cases {
        let e = r.expect_err(needle).to_string();
        assert!(e.contains(needle) || needle == "rank", "{needle}: {e}");
    }
}
