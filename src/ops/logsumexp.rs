//! Max-shifted log-sum-exp over the last dimension, the core of the importance-weighted bound
//! (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders", eq. 8):
//! `LSE(a) = m + ln sum_i exp(a_i - m)`, `m = max_i a_i`.
//! Backward: `d/da_i = g * exp(a_i - LSE(a)) = g * w~_i`, the normalized importance weights,
//! which makes the gradient of the IWAE bound `sum_i w~_i grad log w_i` (eq. 10).
//! Rows whose entries are all `-inf` give `-inf` and a zero gradient. A NaN anywhere in a row
//! makes the row's result NaN, and its gradient NaN, on every device (as `torch.logsumexp` does):
//! a NaN log-weight is never read as the largest weight, nor skipped as probability zero.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fastmath::exp_nonpos;
use super::{check_row_input_sizes, map_rows, reduced_shape, rows_and_last, rows_filled, slice};

/// `ln sum_i exp(a_i)` over the last dimension, max-shifted.
pub fn logsumexp(a: &Tensor) -> Result<Tensor> {
    if super::fused_available(a.device()) {
        a.contiguous()?.apply_op1(LogSumExp)
    } else {
        logsumexp_slow(a)
    }
}

/// Reference composition of plain candle ops (max-shifted as well).
pub fn logsumexp_slow(a: &Tensor) -> Result<Tensor> {
    let m = a.max_keepdim(D::Minus1)?.detach();
    let m_safe = m.clamp(f32::MIN, f32::MAX)?;
    (a.broadcast_sub(&m_safe)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + m_safe)?
        .squeeze(D::Minus1)
}

/// The row maximum with NaN propagated (`f32::max` would skip a NaN).
pub fn nan_max(r: &[f32]) -> f32 {
    r.iter().copied().fold(f32::NEG_INFINITY, |m, v| {
        if v.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    })
}

fn row_lse(r: &[f32]) -> f32 {
    let m = nan_max(r);
    if !m.is_finite() {
        return m;
    }
    let s: f64 = r.iter().map(|v| exp_nonpos(v - m) as f64).sum();
    m + s.ln() as f32
}

struct LogSumExp;

impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "gentrain-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = slice(s, l, self.name())?;
        let (rows, k) = rows_and_last(l.shape())?;
        let out = map_rows(rows, k, |i| row_lse(&a[i * k..(i + 1) * k]));
        Ok((CpuStorage::F32(out), reduced_shape(l.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_rows, ptx, Output};
        launch_rows(
            self.name(),
            "gt_logsumexp",
            "logsumexp",
            ptx::LOGSUMEXP,
            &[(s, l)],
            0,
            Output::PerRow,
        )
    }

    fn bwd(&self, a: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(a.apply_op3_no_bwd(
            &res.contiguous()?,
            &g.contiguous()?,
            &LogSumExpBackward,
        )?))
    }
}

/// `g_row * exp(a_i - lse_row)`, zero where the row is all `-inf`; NaN where `a_i - lse_row` is
/// NaN (a NaN row, or `+inf` entries), as the device's `expf` gives.
pub(crate) struct LogSumExpBackward;

impl CustomOp3 for LogSumExpBackward {
    fn name(&self) -> &'static str {
        "gentrain-logsumexp-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, self.name())?;
        let lse = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let (rows, k) = rows_and_last(l1.shape())?;
        check_row_input_sizes(self.name(), &[a.len(), lse.len(), g.len()], 1, rows, k)?;
        let out = rows_filled(a.len(), k, |i, r| {
            let (m, gi) = (lse[i], g[i]);
            if m == f32::NEG_INFINITY {
                return;
            }
            for (o, v) in r.iter_mut().zip(&a[i * k..(i + 1) * k]) {
                // exp_nonpos keeps a NaN difference NaN.
                *o = gi * exp_nonpos(v - m);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_rows, ptx, Output};
        launch_rows(
            self.name(),
            "gt_logsumexp_bwd",
            "logsumexp",
            ptx::LOGSUMEXP,
            &[(s1, l1), (s2, l2), (s3, l3)],
            2,
            Output::PerElement,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{rel_err, uniform};
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_ops_and_softmax_gradient() {
        for (seed, shape) in [
            (1u64, vec![1, 1]),
            (2, vec![3, 5]),
            (3, vec![4, 7, 50]),
            (4, vec![129, 1000]),
        ] {
            let a = Var::from_tensor(&uniform(seed, &shape, -50.0, 10.0)).unwrap();
            let up = uniform(seed + 1, &shape[..shape.len() - 1], -1.0, 1.0);
            let f = logsumexp(&a).unwrap();
            let s = logsumexp_slow(&a).unwrap();
            assert!(rel_err(&f, &s) < 1e-5);
            let gf = (f * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (s * &up).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(
                rel_err(
                    gf.get(a.as_tensor()).unwrap(),
                    gs.get(a.as_tensor()).unwrap()
                ) < 1e-4
            );
        }
    }

    #[test]
    fn huge_and_infinite_log_weights() {
        let dev = Device::Cpu;
        let a = Var::new(
            &[
                [1000f32, 1000.0, f32::NEG_INFINITY],
                [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
                [-1e4, -1e4 + 2f32.ln(), -1e30],
            ],
            &dev,
        )
        .unwrap();
        let v: Vec<f32> = logsumexp(&a).unwrap().to_vec1().unwrap();
        assert!((v[0] - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert_eq!(v[1], f32::NEG_INFINITY);
        assert!((v[2] - (-1e4 + 3f32.ln())).abs() < 1e-2);
        let g = logsumexp(&a)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gv: Vec<f32> = g
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gv.iter().all(|v| v.is_finite()), "{gv:?}");
        assert!(
            (gv[0] - 0.5).abs() < 1e-4 && (gv[1] - 0.5).abs() < 1e-4 && gv[2] == 0.0,
            "{gv:?}"
        );
    }

    #[test]
    fn a_backward_with_mis_sized_inputs_is_an_error_not_a_read_past_them() {
        // The row kernels' launch glue checked only the first input's size.
        let a = uniform(1, &[4, 5], -1.0, 1.0);
        let lse = logsumexp(&a).unwrap();
        let short_g = uniform(2, &[3], -1.0, 1.0);
        let e = a
            .apply_op3_no_bwd(&lse, &short_g, &LogSumExpBackward)
            .unwrap_err();
        assert!(
            e.to_string().contains("input 2 has 3 values, expected 4"),
            "{e}"
        );
        let full_g = uniform(3, &[4], -1.0, 1.0);
        assert!(a
            .apply_op3_no_bwd(&lse, &full_g, &LogSumExpBackward)
            .is_ok());
    }

    #[test]
    fn nan_log_weights_give_nan_rows_and_gradients() {
        // Before: the CPU skipped a NaN in the maximum and weighted it as exp(0) = 1 (a lone NaN
        // among finite values read as the largest weight); an all-NaN row read as -inf.
        let dev = Device::Cpu;
        let a = Var::new(
            &[
                [0f32, f32::NAN, 1.0],
                [f32::NAN, f32::NAN, f32::NAN],
                [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY],
                [0.0, 1.0, 2.0],
            ],
            &dev,
        )
        .unwrap();
        let v: Vec<f32> = logsumexp(&a).unwrap().to_vec1().unwrap();
        assert!(v[..3].iter().all(|x| x.is_nan()), "{v:?}");
        assert!(v[3].is_finite());
        let g = logsumexp(&a)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Vec<f32>> = g.get(a.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(g[..3].iter().flatten().all(|x| x.is_nan()), "{g:?}");
        assert!(g[3].iter().all(|x| x.is_finite()), "{g:?}");
    }

    #[test]
    fn finite_differences() {
        let a0 = vec![0.3f32, -1.2, 2.0, 0.0, -0.7, 1.1];
        let w = Tensor::new(&[0.6f32, -1.4], &Device::Cpu).unwrap();
        let f = |v: &[f32]| {
            let t = Tensor::from_vec(v.to_vec(), (2, 3), &Device::Cpu).unwrap();
            (logsumexp(&t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let a = Var::from_vec(a0.clone(), (2, 3), &Device::Cpu).unwrap();
        let g = (logsumexp(&a).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let an: Vec<f32> = g
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..a0.len() {
            let (mut p, mut m) = (a0.clone(), a0.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            let fd = (f(&p) - f(&m)) / 2e-2;
            assert!((fd - an[i] as f64).abs() < 1e-3, "{i}: {fd} vs {}", an[i]);
        }
    }
}
