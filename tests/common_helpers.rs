//! The shared finite-difference helpers of `tests/common` on functions with known derivatives,
//! so that a gradient test that relies on them cannot pass because they are wrong.

mod common;
use common::{central_differences, flat_f32, kink_checked_differences, var_function};

use candle_core::{Device, Tensor, Var};

/// f(x) = x0^3 + 2 x0 x1 - sin(x2): the gradient is (3 x0^2 + 2 x1, 2 x0, -cos(x2)).
fn cubic(x: &[f64]) -> f64 {
    x[0].powi(3) + 2.0 * x[0] * x[1] - x[2].sin()
}

#[test]
fn central_differences_give_the_gradient_at_the_indices_asked() {
    let x = [0.7, -1.3, 0.4];
    let want = [3.0 * 0.49 - 2.6, 1.4, -(0.4f64).cos()];
    let got = central_differences(cubic, &x, &[2, 0, 1, 0], 1e-5);
    for (g, i) in got.iter().zip([2, 0, 1, 0]) {
        assert!(
            (g - want[i]).abs() < 1e-8,
            "d f / d x{i}: {g} vs {}",
            want[i]
        );
    }
    // In f32 the step is taken in f32: the estimate is as good as f32 allows.
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let f32_fn = |v: &[f32]| cubic(&v.iter().map(|&e| e as f64).collect::<Vec<_>>());
    let got = central_differences(f32_fn, &x32, &[0], 1e-3)[0];
    assert!(
        (got - (3.0 * (x32[0] as f64).powi(2) - 2.6)).abs() < 1e-3,
        "{got}"
    );
}

#[test]
fn a_kink_within_the_step_is_reported_and_a_smooth_point_is_not() {
    // |x0| + 3 x1: a kink at x0 = 0.002 lies within the coarse step (4e-3) but not the fine
    // one (1e-3), so the two disagree there; x1 is smooth.
    let f = |v: &[f32]| (v[0] as f64 - 0.002).abs() + 3.0 * v[1] as f64;
    let got = kink_checked_differences(f, &[0.0f32, 1.0], &[0, 1], 4e-3, 1e-3);
    assert_eq!(got[0], None, "the kink went unnoticed");
    let d1 = got[1].expect("a smooth entry is not a kink");
    assert!((d1 - 3.0).abs() < 1e-3, "{d1}");
    // Away from the kink both steps agree on the slope -1.
    let d0 = kink_checked_differences(f, &[-1.0f32, 1.0], &[0], 4e-3, 1e-3)[0];
    assert!((d0.expect("smooth here") + 1.0).abs() < 1e-3, "{d0:?}");
}

#[test]
fn var_function_evaluates_at_the_given_entries_and_restores_the_variable() {
    let start = [1.0f32, -2.0, 0.5, 4.0];
    let var = Var::from_tensor(
        &Tensor::new(&start, &Device::Cpu)
            .unwrap()
            .reshape((2, 2))
            .unwrap(),
    )
    .unwrap();
    // The sum of squares of the variable's entries: gradient 2 x.
    let value = || {
        let t = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        t.to_scalar::<f32>().unwrap() as f64
    };
    let (x, f) = var_function(&var, value);
    assert_eq!(x, start);
    assert_eq!(f(&[0.0, 0.0, 3.0, 0.0]), 9.0);
    assert_eq!(flat_f32(var.as_tensor()), start, "not restored");
    let d = central_differences(&f, &x, &[0, 1, 2, 3], 1e-2);
    for (g, v) in d.iter().zip(start) {
        assert!((g - 2.0 * v as f64).abs() < 1e-3, "{g} vs {}", 2.0 * v);
    }
    assert_eq!(flat_f32(var.as_tensor()), start, "not restored");
    assert_eq!(var.dims(), [2, 2]);
}
