//! Spectral normalization (Miyato et al. 2018, "Spectral Normalization for Generative
//! Adversarial Networks", algorithm 1): `W_sn = W / sigma(W)`, with the largest singular value
//! `sigma(W)` estimated by power iteration on a persistent vector `u`:
//!
//! `v <- W^T u / ||W^T u||`, `u <- W v / ||W v||` (`iterations` times, no gradient), then
//! `sigma = u^T W v`, differentiable in `W` with `u`, `v` held fixed; the gradient of a loss
//! through `W / sigma` is the paper's eq. 12 (`(dL/dW_sn - (dL/dW_sn . W_sn) u v^T) / sigma`).
//! `u` and `v` are buffers carried from step to step (and in checkpoints), as in PyTorch's
//! `torch.nn.utils.spectral_norm`, whose `eps = 1e-12` normalization this follows.
//!
//! The iteration is the fused op [`PowerIteration`]: two matrix-vector products per step with the
//! normalizations folded in, then one pass that normalizes `u` and `v` and writes `sigma`
//! (`cuda/spectral_norm.cu`: `2 iterations + 1` launches instead of about a dozen candle ops; the
//! CPU forward, f64-accumulated, is the fallback and the reference). [`power_iteration_slow`] is
//! the same algorithm in plain candle ops, for devices without the kernel and for the tests.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::{map_rows, slice, PAR_THRESHOLD};
use rayon::prelude::*;

/// PyTorch's normalization epsilon.
const EPS: f64 = 1e-12;

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_all()?.sqrt()?;
    x.broadcast_div(&(norm + EPS)?)
}

/// `w` as the matrix spectral normalization sees: `(out, in)` for a dense layer, and a
/// convolution kernel `(out, in, kh, kw)` flattened to `(out, in * kh * kw)` (PyTorch's
/// `dim = 0`).
fn as_matrix(w: &Tensor) -> Result<Tensor> {
    w.flatten_from(1)
}

/// The result of [`power_iteration`]: the new unit vectors and `sigma = u^T W v` (detached).
#[derive(Debug, Clone)]
pub struct PowerIterationResult {
    pub u: Tensor,
    pub v: Tensor,
    pub sigma: Tensor,
}

/// `iterations` (at least 1) power-iteration steps for the weight `w` (any rank, see
/// `as_matrix`) from `u: (out)`; returns the new `(u, v)`, detached.
pub fn power_iteration(w: &Tensor, u: &Tensor, iterations: usize) -> Result<(Tensor, Tensor)> {
    let r = power_iteration_with_sigma(w, u, iterations)?;
    Ok((r.u, r.v))
}

/// [`power_iteration`], also returning the (detached) `sigma` estimate.
pub fn power_iteration_with_sigma(
    w: &Tensor,
    u: &Tensor,
    iterations: usize,
) -> Result<PowerIterationResult> {
    if !super::fused_available(w.device()) {
        let (u, v) = power_iteration_slow(w, u, iterations)?;
        let sigma = sigma(&w.detach(), &u, &v)?;
        return Ok(PowerIterationResult { u, v, sigma });
    }
    let w = as_matrix(&w.detach())?.contiguous()?;
    let (m, n) = w.dims2()?;
    let packed = w.apply_op2_no_bwd(
        &u.detach().contiguous()?,
        &PowerIteration {
            iterations: iterations.max(1),
        },
    )?;
    Ok(PowerIterationResult {
        u: packed.narrow(0, 0, m)?,
        v: packed.narrow(0, m, n)?,
        sigma: packed.narrow(0, m + n, 1)?.squeeze(0)?,
    })
}

/// [`power_iteration`] composed of plain candle ops (the reference the fused op is tested
/// against, and the path on devices without the kernel).
pub fn power_iteration_slow(w: &Tensor, u: &Tensor, iterations: usize) -> Result<(Tensor, Tensor)> {
    let w = as_matrix(&w.detach())?;
    let mut u = u.detach();
    let mut v;
    let mut i = 0;
    loop {
        v = normalize(&w.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
        u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
        i += 1;
        if i >= iterations {
            return Ok((u, v));
        }
    }
}

/// `sigma = u^T W v` (differentiable in `w`, any rank).
pub fn sigma(w: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    u.unsqueeze(0)?
        .matmul(&as_matrix(w)?.matmul(&v.unsqueeze(1)?)?)?
        .squeeze(D::Minus1)?
        .squeeze(0)
}

/// `W / sigma(W)` with `sigma` from the (fixed) vectors `u`, `v`, in `w`'s own shape.
pub fn normalized(w: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    w.broadcast_div(&sigma(w, u, v)?)
}

/// The fused power iteration on `W: (m, n)` and `u: (m)`; writes `[u (m), v (n), sigma]`.
pub struct PowerIteration {
    pub iterations: usize,
}

/// `1 / (||x|| + eps)`, or 1 when `normalize` is false.
fn inverse_norm(x: &[f32], normalize: bool) -> f64 {
    if normalize {
        1.0 / (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() + EPS)
    } else {
        1.0
    }
}

/// `y = W^T x / (||x|| + eps)` (unnormalized when `normalize` is false), f64-accumulated.
fn matvec_t(w: &[f32], x: &[f32], y: &mut [f32], n: usize, normalize: bool) {
    let scale = inverse_norm(x, normalize);
    let columns = |j0: usize, out: &mut [f32]| {
        let mut acc = vec![0f64; out.len()];
        for (i, &xi) in x.iter().enumerate() {
            let row = &w[i * n + j0..i * n + j0 + out.len()];
            for (a, &wij) in acc.iter_mut().zip(row) {
                *a += wij as f64 * xi as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = (a * scale) as f32;
        }
    };
    if w.len() >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        const CHUNK: usize = 256;
        y.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, out)| columns(c * CHUNK, out));
    } else {
        columns(0, y);
    }
}

/// `y = W x / (||x|| + eps)` (unnormalized when `normalize` is false), f64-accumulated.
fn matvec(w: &[f32], x: &[f32], n: usize, normalize: bool) -> Vec<f32> {
    let scale = inverse_norm(x, normalize);
    map_rows(w.len() / n.max(1), n, |i| {
        let dot: f64 = w[i * n..(i + 1) * n]
            .iter()
            .zip(x)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        (dot * scale) as f32
    })
}

impl PowerIteration {
    fn dims(&self, lw: &Layout, lu: &Layout) -> Result<(usize, usize)> {
        let (m, n) = lw.shape().dims2()?;
        if lu.shape().elem_count() != m || m == 0 || n == 0 {
            candle_core::bail!(
                "spectral norm: weight {:?} and u {:?} do not match",
                lw.dims(),
                lu.dims()
            )
        }
        Ok((m, n))
    }
}

impl CustomOp2 for PowerIteration {
    fn name(&self) -> &'static str {
        "gentrain-spectral-norm-power-iteration"
    }

    fn cpu_fwd(
        &self,
        sw: &CpuStorage,
        lw: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n) = self.dims(lw, lu)?;
        let w = slice(sw, lw, self.name())?;
        let mut ur = slice(su, lu, self.name())?.to_vec();
        let mut vr = vec![0f32; n];
        for t in 0..self.iterations {
            matvec_t(w, &ur, &mut vr, n, t > 0);
            ur = matvec(w, &vr, n, true);
        }
        let (iu, iv) = (inverse_norm(&ur, true), inverse_norm(&vr, true));
        let mut out = Vec::with_capacity(m + n + 1);
        out.extend(ur.iter().map(|&x| (x as f64 * iu) as f32));
        out.extend(vr.iter().map(|&x| (x as f64 * iv) as f32));
        let squared: f64 = ur.iter().map(|&x| x as f64 * x as f64).sum();
        out.push((squared * iu) as f32);
        Ok((CpuStorage::F32(out), Shape::from(m + n + 1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (m, n) = self.dims(lw, lu)?;
        let dev = device(sw);
        let (w, u) = (view(sw, lw, self.name())?, view(su, lu, self.name())?);
        let (m32, n32) = (u32_len(m, self.name())?, u32_len(n, self.name())?);
        let mut ur = alloc_out(&dev, m)?;
        let mut vr = alloc_out(&dev, n)?;
        let mut out = alloc_out(&dev, m + n + 1)?;
        let grid = |units: usize, per_block: usize| LaunchConfig {
            grid_dim: (units.div_ceil(per_block).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let transposed = func(&dev, "gt_sn_matvec_t", "spectral_norm", ptx::SPECTRAL_NORM)?;
        let straight = func(&dev, "gt_sn_matvec", "spectral_norm", ptx::SPECTRAL_NORM)?;
        for t in 0..self.iterations {
            let normalize = u32::from(t > 0);
            let mut b = transposed.builder();
            if t == 0 {
                b.arg(&w).arg(&u);
            } else {
                b.arg(&w).arg(&ur);
            }
            b.arg(&mut vr).arg(&m32).arg(&n32).arg(&normalize);
            // SAFETY: (w, x, y, m, n, normalize) as in cuda/spectral_norm.cu; y has n floats.
            launched(unsafe { b.launch(grid(n, 32)) })?;
            let one = 1u32;
            let mut b = straight.builder();
            b.arg(&w)
                .arg(&vr)
                .arg(&mut ur)
                .arg(&m32)
                .arg(&n32)
                .arg(&one);
            // SAFETY: as above; y has m floats.
            launched(unsafe { b.launch(grid(m, 8)) })?;
        }
        let finish = func(&dev, "gt_sn_finish", "spectral_norm", ptx::SPECTRAL_NORM)?;
        let mut b = finish.builder();
        b.arg(&ur).arg(&vr).arg(&mut out).arg(&m32).arg(&n32);
        // SAFETY: (ur, vr, out, m, n); out has m + n + 1 floats; one block.
        launched(unsafe { b.launch(grid(1, 1)) })?;
        Ok((storage(out, &dev), Shape::from(m + n + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Largest singular value by many power iterations in f64.
    fn sigma_max(w: &[Vec<f64>]) -> f64 {
        let (m, n) = (w.len(), w[0].len());
        let mut v = vec![1.0; n];
        let mut s = 0.0;
        for _ in 0..5000 {
            let u: Vec<f64> = (0..m)
                .map(|i| (0..n).map(|j| w[i][j] * v[j]).sum())
                .collect();
            let nv: Vec<f64> = (0..n)
                .map(|j| (0..m).map(|i| w[i][j] * u[i]).sum())
                .collect();
            let norm = nv.iter().map(|x| x * x).sum::<f64>().sqrt();
            s = norm.sqrt();
            v = nv.iter().map(|x| x / norm).collect();
        }
        s
    }

    #[test]
    fn fused_op_matches_the_candle_composition() {
        for (seed, (m, n), iters) in [
            (1u64, (1, 1), 1),
            (2, (3, 257), 1),
            (3, (129, 784), 2),
            (4, (513, 3), 1),
            (5, (64, 1025), 3),
        ] {
            let w = crate::ops::testing::uniform(seed, &[m, n], -1.0, 1.0);
            let u0 = normalize(&crate::ops::testing::uniform(seed + 10, &[m], -1.0, 1.0)).unwrap();
            let fused = power_iteration_with_sigma(&w, &u0, iters).unwrap();
            let (u, v) = power_iteration_slow(&w, &u0, iters).unwrap();
            let s = sigma(&w, &u, &v).unwrap();
            // The composition sums in f32 (the fused CPU op in f64): 1e-4 covers its rounding.
            let rel = crate::ops::testing::rel_err;
            assert!(rel(&fused.u, &u) < 1e-4, "{m}x{n} u {}", rel(&fused.u, &u));
            assert!(rel(&fused.v, &v) < 1e-4, "{m}x{n} v {}", rel(&fused.v, &v));
            assert!(rel(&fused.sigma, &s) < 1e-4, "{m}x{n} sigma");
        }
        // A convolution kernel is flattened to (out, in * kh * kw).
        let w = crate::ops::testing::uniform(6, &[8, 3, 4, 4], -1.0, 1.0);
        let u0 = normalize(&crate::ops::testing::uniform(7, &[8], -1.0, 1.0)).unwrap();
        let (u, v) = power_iteration(&w, &u0, 1).unwrap();
        assert_eq!((u.dims(), v.dims()), (&[8][..], &[48][..]));
        // A zero weight (and huge entries) stays finite in the iteration itself.
        let zero = Tensor::zeros((5, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let r = power_iteration_with_sigma(&zero, &u0.narrow(0, 0, 5).unwrap(), 2).unwrap();
        assert_eq!(r.sigma.to_scalar::<f32>().unwrap(), 0.0);
        assert!(r.u.to_vec1::<f32>().unwrap().iter().all(|x| *x == 0.0));
        let huge = (crate::ops::testing::uniform(11, &[5, 7], -1.0, 1.0) * 1e18).unwrap();
        let r = power_iteration_with_sigma(&huge, &u0.narrow(0, 0, 5).unwrap(), 3).unwrap();
        let s = r.sigma.to_scalar::<f32>().unwrap();
        assert!(s.is_finite() && s > 1e17, "{s}");
        // Mismatched u is an error, not a panic.
        assert!(power_iteration(&w, &u0.narrow(0, 0, 5).unwrap(), 1).is_err());
    }

    #[test]
    fn power_iteration_finds_the_largest_singular_value() {
        for (seed, (m, n)) in [(1u64, (5, 3)), (2, (17, 31)), (3, (64, 2)), (4, (1, 9))] {
            let w = crate::ops::testing::uniform(seed, &[m, n], -1.0, 1.0);
            let rows: Vec<Vec<f64>> = w
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as f64).collect())
                .collect();
            let exact = sigma_max(&rows);
            let u0 = normalize(&crate::ops::testing::uniform(seed + 10, &[m], -1.0, 1.0)).unwrap();
            let (u, v) = power_iteration(&w, &u0, 200).unwrap();
            let s = sigma(&w, &u, &v).unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((s - exact).abs() / exact < 1e-4, "{m}x{n}: {s} vs {exact}");
            // The normalized matrix has spectral norm 1.
            let wn = normalized(&w, &u, &v).unwrap();
            let rows: Vec<Vec<f64>> = wn
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as f64).collect())
                .collect();
            assert!((sigma_max(&rows) - 1.0).abs() < 1e-4);
        }
        let _ = Device::Cpu;
    }

    #[test]
    fn gradient_through_the_normalization_matches_finite_differences() {
        let w = crate::ops::testing::uniform(7, &[4, 3], -1.0, 1.0);
        let u0 = normalize(&crate::ops::testing::uniform(8, &[4], -1.0, 1.0)).unwrap();
        let (u, v) = power_iteration(&w, &u0, 50).unwrap();
        let c = crate::ops::testing::uniform(9, &[4, 3], -1.0, 1.0);
        // L(W) = sum(C * W / sigma(W)), u and v fixed.
        let loss = |w: &Tensor| -> Tensor {
            (normalized(w, &u, &v).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let var = candle_core::Var::from_tensor(&w).unwrap();
        let g = loss(var.as_tensor()).backward().unwrap();
        let g: Vec<f32> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..flat.len() {
            let at = |d: f32| {
                let mut x = flat.clone();
                x[i] += d;
                let t = Tensor::from_vec(x, (4, 3), &Device::Cpu).unwrap();
                loss(&t).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(1e-3) - at(-1e-3)) / 2e-3;
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "entry {i}: {} vs {fd}",
                g[i]
            );
        }
    }
}
