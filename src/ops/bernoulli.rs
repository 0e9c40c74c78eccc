//! Bernoulli log-likelihood from logits, summed over the last dimension:
//! `log p(x | l) = sum_d x_d l_d - softplus(l_d)`, with the stable
//! `softplus(l) = max(l, 0) + ln(1 + e^{-|l|})` (design notes, "Numbers that are easy to get wrong").
//! Backward: `d/dl = g * (x - sigmoid(l))`; the data `x` gets no gradient.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{
    check_row_input_sizes, map_rows, reduced_shape, rows_and_last, rows_filled, sigmoid, slice,
    softplus,
};

const LANES: usize = 16;

/// Per-row `sum_d x_d l_d - softplus(l_d)` for `logits`, `x` of equal shape `(.., D)`.
pub fn bernoulli_log_likelihood(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    if logits.dims() != x.dims() {
        candle_core::bail!("bernoulli: logits {:?} vs x {:?}", logits.dims(), x.dims())
    }
    if super::fused_available(logits.device()) {
        logits
            .contiguous()?
            .apply_op2(&x.contiguous()?, BernoulliLogLik)
    } else {
        bernoulli_log_likelihood_slow(logits, x)
    }
}

/// Reference composition of plain candle ops.
pub fn bernoulli_log_likelihood_slow(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    let softplus = (logits.relu()? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    (x * logits)?.sub(&softplus)?.sum(candle_core::D::Minus1)
}

struct BernoulliLogLik;

impl CustomOp2 for BernoulliLogLik {
    fn name(&self) -> &'static str {
        "gentrain-bernoulli-loglik"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = slice(s1, l1, self.name())?;
        let x = slice(s2, l2, self.name())?;
        let (rows, d) = rows_and_last(l1.shape())?;
        let out = map_rows(rows, d, |i| {
            let (l, x) = (&logits[i * d..(i + 1) * d], &x[i * d..(i + 1) * d]);
            // 16 f32 lanes (vectorized), summed in f64 at the end: deterministic and accurate.
            let mut lanes = [0f32; LANES];
            let (lc, xc) = (l.chunks_exact(LANES), x.chunks_exact(LANES));
            let (lr, xr) = (lc.remainder(), xc.remainder());
            for (lch, xch) in lc.zip(xc) {
                for j in 0..LANES {
                    lanes[j] += xch[j] * lch[j] - softplus(lch[j]);
                }
            }
            let tail: f64 = lr
                .iter()
                .zip(xr)
                .map(|(lv, xv)| (xv * lv - softplus(*lv)) as f64)
                .sum();
            (lanes.iter().map(|v| *v as f64).sum::<f64>() + tail) as f32
        });
        Ok((CpuStorage::F32(out), reduced_shape(l1.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_rows, ptx, Output};
        launch_rows(
            self.name(),
            "gt_bernoulli_loglik",
            "bernoulli",
            ptx::BERNOULLI,
            &[(s1, l1), (s2, l2)],
            0,
            Output::PerRow,
        )
    }

    fn bwd(
        &self,
        logits: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dl = logits.apply_op3_no_bwd(x, &g, &BernoulliBackward)?;
        let dx = if x.track_op() {
            Some(logits.broadcast_mul(&g.unsqueeze(candle_core::D::Minus1)?)?)
        } else {
            None
        };
        Ok((Some(dl), dx))
    }
}

/// `g_row * (x - sigmoid(l))`.
pub(crate) struct BernoulliBackward;

impl CustomOp3 for BernoulliBackward {
    fn name(&self) -> &'static str {
        "gentrain-bernoulli-loglik-bwd"
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
        let logits = slice(s1, l1, self.name())?;
        let x = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let (rows, d) = rows_and_last(l1.shape())?;
        check_row_input_sizes(self.name(), &[logits.len(), x.len(), g.len()], 2, rows, d)?;
        let out = rows_filled(logits.len(), d, |i, r| {
            let (l, xs, gi) = (&logits[i * d..(i + 1) * d], &x[i * d..(i + 1) * d], g[i]);
            for ((o, lv), xv) in r.iter_mut().zip(l).zip(xs) {
                *o = gi * (xv - sigmoid(*lv));
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
            "gt_bernoulli_loglik_bwd",
            "bernoulli",
            ptx::BERNOULLI,
            &[(s1, l1), (s2, l2), (s3, l3)],
            1,
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
    fn matches_plain_ops_on_several_shapes() {
        for (seed, shape) in [
            (1u64, vec![1, 1]),
            (2, vec![5, 7]),
            (3, vec![3, 33, 257]),
            (4, vec![129, 784]),
        ] {
            let l = Var::from_tensor(&uniform(seed, &shape, -8.0, 8.0)).unwrap();
            let x = uniform(seed + 10, &shape, 0.0, 1.0)
                .ge(0.5)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let up = uniform(seed + 20, &shape[..shape.len() - 1], -1.0, 1.0);
            let fast = bernoulli_log_likelihood(&l, &x).unwrap();
            let slow = bernoulli_log_likelihood_slow(&l, &x).unwrap();
            assert!(rel_err(&fast, &slow) < 1e-4);
            let gf = (fast * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &up).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(
                rel_err(
                    gf.get(l.as_tensor()).unwrap(),
                    gs.get(l.as_tensor()).unwrap()
                ) < 1e-4
            );
        }
    }

    #[test]
    fn extreme_logits_stay_finite_and_exact() {
        let l = Tensor::new(&[[-100f32, 100.0, 0.0, -30.0]], &Device::Cpu).unwrap();
        let x = Tensor::new(&[[0f32, 1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let v: Vec<f32> = bernoulli_log_likelihood(&l, &x).unwrap().to_vec1().unwrap();
        // log(1 - sigmoid(-100)) ~ 0, log sigmoid(100) ~ 0, log 0.5, log sigmoid(-30) ~ -30
        let expect = -(2f32).ln() - 30.0;
        assert!((v[0] - expect).abs() < 1e-4, "{v:?}");
    }

    #[test]
    fn finite_differences() {
        let l0: Vec<f32> = vec![-3.0, -0.5, 0.2, 2.5, 7.0, -1.0];
        let x = Tensor::new(&[[0f32, 1.0, 1.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[0.7f32, -1.3], &Device::Cpu).unwrap();
        let f = |lv: &[f32]| {
            let l = Tensor::from_vec(lv.to_vec(), (2, 3), &Device::Cpu).unwrap();
            (bernoulli_log_likelihood(&l, &x).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let l = Var::from_vec(l0.clone(), (2, 3), &Device::Cpu).unwrap();
        let g = (bernoulli_log_likelihood(&l, &x).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let an: Vec<f32> = g
            .get(l.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..l0.len() {
            let h = 1e-2;
            let (mut a, mut b) = (l0.clone(), l0.clone());
            a[i] += h;
            b[i] -= h;
            let fd = (f(&a) - f(&b)) / (2.0 * h as f64);
            assert!(
                (fd - an[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "{i}: {fd} vs {}",
                an[i]
            );
        }
    }
}
