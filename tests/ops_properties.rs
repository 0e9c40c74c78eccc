//! Property tests of the fused ops over random shapes and extreme values: finite wherever the
//! math is finite, the invariants of each function (KL >= 0, Bernoulli log-likelihood <= 0,
//! log-sum-exp between max and max + ln k, softmax weights summing to 1), and agreement with the
//! plain-candle references.

mod common;
use common::flat_f32;

use candle_core::{Device, Tensor, Var};
use gentrain::ops::bernoulli::{bernoulli_log_likelihood, bernoulli_log_likelihood_slow};
use gentrain::ops::gaussian::{
    gaussian_kl, gaussian_kl_slow, gaussian_log_density, reparameterize,
};
use gentrain::ops::logsumexp::logsumexp;
use proptest::prelude::*;

fn tensor(v: Vec<f32>, rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// (rows, cols, data) with values drawn from `range`.
fn matrix(range: std::ops::RangeInclusive<f32>) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..24, 1usize..70).prop_flat_map(move |(r, c)| {
        (
            Just(r),
            Just(c),
            proptest::collection::vec(range.clone(), r * c),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn kl_is_finite_nonnegative_and_matches_reference((r, c, mu) in matrix(-1e3..=1e3), seed in any::<u64>()) {
        let lv: Vec<f32> = (0..r * c).map(|i| (((seed.wrapping_add(i as u64 * 7919)) % 6001) as f32 / 100.0) - 30.0).collect();
        let (mu_t, lv_t) = (Var::from_tensor(&tensor(mu, r, c)).unwrap(), Var::from_tensor(&tensor(lv, r, c)).unwrap());
        let kl = gaussian_kl(&mu_t, &lv_t).unwrap();
        let slow = gaussian_kl_slow(&mu_t, &lv_t).unwrap();
        for (a, b) in flat_f32(&kl).iter().zip(flat_f32(&slow)) {
            prop_assert!(a.is_finite() && *a >= 0.0);
            prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        let g = kl.sum_all().unwrap().backward().unwrap();
        prop_assert!(flat_f32(g.get(lv_t.as_tensor()).unwrap()).iter().all(|v| v.is_finite()));
        prop_assert!(flat_f32(g.get(mu_t.as_tensor()).unwrap()).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn reparameterization_and_density_stay_finite((r, c, lv) in matrix(-30.0..=30.0), mu0 in -50f32..50.0) {
        let mu = Var::from_tensor(&tensor(vec![mu0; r * c], r, c)).unwrap();
        let lv = Var::from_tensor(&tensor(lv, r, c)).unwrap();
        let eps = Tensor::randn(0f32, 1.0, (r, c), &Device::Cpu).unwrap();
        let z = reparameterize(&mu, &lv, &eps).unwrap();
        prop_assert!(flat_f32(&z).iter().all(|v| v.is_finite()));
        let ld = gaussian_log_density(&z, &mu, &lv).unwrap();
        prop_assert!(flat_f32(&ld).iter().all(|v| v.is_finite()));
        let g = ld.sum_all().unwrap().backward().unwrap();
        for v in [&mu, &lv] {
            prop_assert!(flat_f32(g.get(v.as_tensor()).unwrap()).iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn bernoulli_loglik_is_nonpositive_with_bounded_gradient((r, c, l) in matrix(-1e4..=1e4), bits in any::<u64>()) {
        let x: Vec<f32> = (0..r * c).map(|i| ((bits >> (i % 64)) & 1) as f32).collect();
        let l = Var::from_tensor(&tensor(l, r, c)).unwrap();
        let x = tensor(x, r, c);
        let ll = bernoulli_log_likelihood(&l, &x).unwrap();
        let slow = bernoulli_log_likelihood_slow(&l, &x).unwrap();
        for (a, b) in flat_f32(&ll).iter().zip(flat_f32(&slow)) {
            prop_assert!(a.is_finite() && *a <= 0.0);
            prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        let g = ll.sum_all().unwrap().backward().unwrap();
        prop_assert!(flat_f32(g.get(l.as_tensor()).unwrap()).iter().all(|v| v.is_finite() && v.abs() <= 1.0));
    }

    #[test]
    fn logsumexp_bounds_and_softmax_gradient((r, k, mut a) in matrix(-1e30..=1e30), holes in any::<u64>()) {
        // Some entries are -inf (zero importance weight); keep at least one finite per row.
        for (i, v) in a.iter_mut().enumerate() {
            if (holes >> (i % 64)) & 1 == 1 && i % k != 0 {
                *v = f32::NEG_INFINITY;
            }
        }
        let t = Var::from_tensor(&tensor(a.clone(), r, k)).unwrap();
        let lse = logsumexp(&t).unwrap();
        let g = lse.sum_all().unwrap().backward().unwrap();
        let grad = flat_f32(g.get(t.as_tensor()).unwrap());
        for (i, v) in flat_f32(&lse).iter().enumerate() {
            let row = &a[i * k..(i + 1) * k];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(v.is_finite());
            prop_assert!(*v >= m - m.abs() * 1e-6 && *v <= m + (k as f32).ln() + m.abs() * 1e-6 + 1e-5, "{v} vs max {m}");
            let gsum: f32 = grad[i * k..(i + 1) * k].iter().sum();
            prop_assert!((gsum - 1.0).abs() < 1e-4, "softmax weights sum to {gsum}");
            prop_assert!(grad[i * k..(i + 1) * k].iter().all(|w| w.is_finite() && *w >= 0.0));
        }
    }
}
