//! Diagonal-Gaussian pieces of the VAE objective (Kingma & Welling 2014, "Auto-Encoding
//! Variational Bayes", eq. 10 and appendix B):
//!
//! - reparameterization `z = mu + exp(logvar / 2) * eps`, `eps ~ N(0, I)`;
//!   backward `d/dmu = g`, `d/dlogvar = g * 0.5 * exp(logvar / 2) * eps`;
//! - `KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)` per row;
//!   backward `d/dmu = g mu`, `d/dlogvar = 0.5 g (exp(logvar) - 1)`;
//! - log-density `log N(z; mu, sigma^2) = -0.5 * sum_j (ln 2pi + logvar_j + (z_j - mu_j)^2 e^{-logvar_j})`
//!   per row; backward `d/dz = -g (z - mu) e^{-logvar}`, `d/dmu = -d/dz`,
//!   `d/dlogvar = 0.5 g ((z - mu)^2 e^{-logvar} - 1)`.
//!
//! Forwards are fused (CPU loops here, kernels in `cuda/gaussian.cu`); the backwards are short compositions of candle ops (latent
//! tensors are small, so they cost little next to the GEMMs).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fastmath::exp;
use super::{map_rows, reduced_shape, rows_and_last, rows_filled, slice, LN_2PI};

/// `z = mu + exp(logvar / 2) * eps` (all the same shape).
pub fn reparameterize(mu: &Tensor, logvar: &Tensor, eps: &Tensor) -> Result<Tensor> {
    same_shapes("reparameterize", &[mu, logvar, eps])?;
    if super::fused_available(mu.device()) {
        mu.contiguous()?
            .apply_op3(&logvar.contiguous()?, &eps.contiguous()?, Reparameterize)
    } else {
        reparameterize_slow(mu, logvar, eps)
    }
}

/// Reference composition of plain candle ops.
pub fn reparameterize_slow(mu: &Tensor, logvar: &Tensor, eps: &Tensor) -> Result<Tensor> {
    mu + (logvar * 0.5)?.exp()? * eps
}

/// Per-row `KL(N(mu, exp(logvar)) || N(0, I))`.
pub fn gaussian_kl(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    same_shapes("gaussian_kl", &[mu, logvar])?;
    if super::fused_available(mu.device()) {
        mu.contiguous()?
            .apply_op2(&logvar.contiguous()?, GaussianKl)
    } else {
        gaussian_kl_slow(mu, logvar)
    }
}

/// Reference composition of plain candle ops.
pub fn gaussian_kl_slow(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    (((mu.sqr()? + logvar.exp()?)? - 1.0)? - logvar)?.sum(D::Minus1)? * 0.5
}

/// Per-row `log N(z; mu, diag(exp(logvar)))`.
pub fn gaussian_log_density(z: &Tensor, mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    same_shapes("gaussian_log_density", &[z, mu, logvar])?;
    if super::fused_available(z.device()) {
        z.contiguous()?
            .apply_op3(&mu.contiguous()?, &logvar.contiguous()?, GaussianLogDensity)
    } else {
        gaussian_log_density_slow(z, mu, logvar)
    }
}

/// Reference composition of plain candle ops.
pub fn gaussian_log_density_slow(z: &Tensor, mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let sq = ((z - mu)?.sqr()? * logvar.neg()?.exp()?)?;
    ((sq + logvar)? + LN_2PI as f64)?.sum(D::Minus1)? * -0.5
}

/// Per-row `log N(z; 0, I) = -0.5 sum_j (z_j^2 + ln 2pi)`.
pub fn standard_normal_log_density(z: &Tensor) -> Result<Tensor> {
    (z.sqr()? + LN_2PI as f64)?.sum(D::Minus1)? * -0.5
}

fn same_shapes(op: &str, ts: &[&Tensor]) -> Result<()> {
    for t in &ts[1..] {
        if t.dims() != ts[0].dims() {
            candle_core::bail!("{op}: shape {:?} vs {:?}", ts[0].dims(), t.dims())
        }
    }
    Ok(())
}

struct Reparameterize;

impl CustomOp3 for Reparameterize {
    fn name(&self) -> &'static str {
        "gentrain-reparameterize"
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
        let (mu, lv, eps) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let (_, d) = rows_and_last(l1.shape())?;
        let z = rows_filled(mu.len(), d, |i, r| {
            let o = i * d;
            for (j, zv) in r.iter_mut().enumerate() {
                *zv = mu[o + j] + exp(0.5 * lv[o + j]) * eps[o + j];
            }
        });
        Ok((CpuStorage::F32(z), l1.shape().clone()))
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
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s1);
        let (mu, lv, eps) = (
            view(s1, l1, self.name())?,
            view(s2, l2, self.name())?,
            view(s3, l3, self.name())?,
        );
        let n = l1.shape().elem_count();
        let n32 = u32_len(n, self.name())?;
        let out = alloc_out(&dev, n)?;
        let f = func(&dev, "gt_reparameterize", "gaussian", ptx::GAUSSIAN)?;
        let mut b = f.builder();
        b.arg(&mu).arg(&lv).arg(&eps).arg(&out).arg(&n32);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(n)) })?;
        Ok((storage(out, &dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _mu: &Tensor,
        logvar: &Tensor,
        eps: &Tensor,
        _z: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sigma = (logvar * 0.5)?.exp()?;
        let dlv = ((g * eps)? * &sigma)? * 0.5;
        let deps = if eps.track_op() {
            Some((g * &sigma)?)
        } else {
            None
        };
        Ok((Some(g.clone()), Some(dlv?), deps))
    }
}

struct GaussianKl;

impl CustomOp2 for GaussianKl {
    fn name(&self) -> &'static str {
        "gentrain-gaussian-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mu, lv) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (rows, d) = rows_and_last(l1.shape())?;
        let out = map_rows(rows, d, |i| {
            let mut acc = 0f64;
            for j in i * d..(i + 1) * d {
                let (m, l) = (mu[j] as f64, lv[j] as f64);
                acc += m * m + exp(l as f32) as f64 - 1.0 - l;
            }
            (0.5 * acc) as f32
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
            "gt_gaussian_kl",
            "gaussian",
            ptx::GAUSSIAN,
            &[(s1, l1), (s2, l2)],
            0,
            Output::PerRow,
        )
    }

    fn bwd(
        &self,
        mu: &Tensor,
        logvar: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.unsqueeze(D::Minus1)?;
        let dmu = mu.broadcast_mul(&g)?;
        let dlv = ((logvar.exp()? - 1.0)?.broadcast_mul(&g)? * 0.5)?;
        Ok((Some(dmu), Some(dlv)))
    }
}

struct GaussianLogDensity;

impl CustomOp3 for GaussianLogDensity {
    fn name(&self) -> &'static str {
        "gentrain-gaussian-log-density"
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
        let (z, mu, lv) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let (rows, d) = rows_and_last(l1.shape())?;
        let out = map_rows(rows, d, |i| {
            let mut acc = 0f64;
            for j in i * d..(i + 1) * d {
                let diff = z[j] - mu[j];
                acc += (LN_2PI + lv[j] + diff * diff * exp(-lv[j])) as f64;
            }
            (-0.5 * acc) as f32
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_rows, ptx, Output};
        launch_rows(
            self.name(),
            "gt_gaussian_logpdf",
            "gaussian",
            ptx::GAUSSIAN,
            &[(s1, l1), (s2, l2), (s3, l3)],
            0,
            Output::PerRow,
        )
    }

    fn bwd(
        &self,
        z: &Tensor,
        mu: &Tensor,
        logvar: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.unsqueeze(D::Minus1)?;
        let prec = logvar.neg()?.exp()?;
        let diff = (z - mu)?;
        let scaled = (&diff * &prec)?;
        let dz = scaled.broadcast_mul(&g)?.neg()?;
        let dmu = if mu.track_op() { Some(dz.neg()?) } else { None };
        let dlv = if logvar.track_op() {
            Some((((&diff * &scaled)? - 1.0)?.broadcast_mul(&g)? * 0.5)?)
        } else {
            None
        };
        let dz = if z.track_op() { Some(dz) } else { None };
        Ok((dz, dmu, dlv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{rel_err, uniform};
    use candle_core::{Device, Var};

    fn grads_match(
        fast: impl Fn(&[&Tensor]) -> Tensor,
        slow: impl Fn(&[&Tensor]) -> Tensor,
        inputs: &[Tensor],
        up: &Tensor,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let f = fast(&ts);
        let s = slow(&ts);
        assert!(rel_err(&f, &s) < 1e-4, "forward {}", rel_err(&f, &s));
        let gf = f
            .broadcast_mul(up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = s
            .broadcast_mul(up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in &vars {
            let (a, b) = (gf.get(v.as_tensor()), gs.get(v.as_tensor()));
            if let (Some(a), Some(b)) = (a, b) {
                assert!(rel_err(a, b) < 1e-3, "grad {}", rel_err(a, b));
            }
        }
    }

    #[test]
    fn ops_match_plain_candle_on_several_shapes() {
        for (seed, shape) in [
            (1u64, vec![1, 1]),
            (2, vec![7, 3]),
            (3, vec![5, 129, 50]),
            (4, vec![300, 20]),
        ] {
            let mu = uniform(seed, &shape, -3.0, 3.0);
            let lv = uniform(seed + 1, &shape, -6.0, 4.0);
            let eps = uniform(seed + 2, &shape, -3.0, 3.0);
            let rows = &shape[..shape.len() - 1];
            grads_match(
                |t| reparameterize(t[0], t[1], t[2]).unwrap(),
                |t| reparameterize_slow(t[0], t[1], t[2]).unwrap(),
                &[mu.clone(), lv.clone(), eps.clone()],
                &uniform(seed + 3, &shape, -1.0, 1.0),
            );
            grads_match(
                |t| gaussian_kl(t[0], t[1]).unwrap(),
                |t| gaussian_kl_slow(t[0], t[1]).unwrap(),
                &[mu.clone(), lv.clone()],
                &uniform(seed + 4, rows, -1.0, 1.0),
            );
            grads_match(
                |t| gaussian_log_density(t[0], t[1], t[2]).unwrap(),
                |t| gaussian_log_density_slow(t[0], t[1], t[2]).unwrap(),
                &[eps.clone(), mu.clone(), lv.clone()],
                &uniform(seed + 5, rows, -1.0, 1.0),
            );
        }
    }

    #[test]
    fn extreme_logvar_stays_finite() {
        let dev = Device::Cpu;
        let mu = Tensor::new(&[[0.5f32, -0.5]], &dev).unwrap();
        let lv = Tensor::new(&[[30f32, -30.0]], &dev).unwrap();
        let eps = Tensor::new(&[[1f32, 1.0]], &dev).unwrap();
        let kl: Vec<f32> = gaussian_kl(&mu, &lv).unwrap().to_vec1().unwrap();
        let expect =
            0.5 * ((0.25f64 + 30f64.exp() - 1.0 - 30.0) + (0.25 + (-30f64).exp() - 1.0 + 30.0));
        assert!(((kl[0] as f64 - expect) / expect).abs() < 1e-5);
        let z = reparameterize(&mu, &lv, &eps).unwrap();
        assert!(z
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
        let ld: Vec<f32> = gaussian_log_density(&z, &mu, &lv)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(ld[0].is_finite());
    }

    #[test]
    fn kl_is_the_expected_log_ratio() {
        // KL = E_q[log q(z) - log N(z; 0, I)], checked by Monte Carlo with 200k samples.
        let dev = Device::Cpu;
        let n = 200_000;
        let mu = Tensor::new(&[0.7f32, -1.2, 0.1], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((n, 1))
            .unwrap();
        let lv = Tensor::new(&[-0.5f32, 0.8, -2.0], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((n, 1))
            .unwrap();
        let eps = Tensor::randn(0f32, 1.0, (n, 3), &dev).unwrap();
        let z = reparameterize(&mu, &lv, &eps).unwrap();
        let mc = (gaussian_log_density(&z, &mu, &lv).unwrap()
            - standard_normal_log_density(&z).unwrap())
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let exact = gaussian_kl(&mu.narrow(0, 0, 1).unwrap(), &lv.narrow(0, 0, 1).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((mc - exact).abs() < 0.02, "mc {mc} exact {exact}");
    }
}
