//! Fused affine layer with activation: `y = act(x W^T + b)`, `W` stored `(out, in)` as in
//! PyTorch's `nn.Linear`.
//!
//! Forward: the bias is written into the output, one GEMM accumulates `x W^T` onto it, and the
//! activation is applied in place (one pass over the output instead of three).
//! Backward, from the output `y` alone (no stored pre-activation):
//! `g_pre = g * act'(y)` with `relu' = [y > 0]`, `tanh' = 1 - y^2`,
//! `softplus' = sigmoid(a) = 1 - e^{-y}`; then `dW = g_pre^T x`, `db = sum_rows g_pre`,
//! `dx = g_pre W` (only when `x` needs a gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use candle_core::Storage;

use super::{for_rows, slice, softplus};

pub use crate::config::Activation;

/// The negative slope of [`Activation::LeakyRelu`] (0.2, the DCGAN and SN-GAN discriminators').
pub const LEAKY_SLOPE: f32 = 0.2;

impl Activation {
    #[inline]
    fn apply(self, a: f32) -> f32 {
        match self {
            Activation::Identity => a,
            // Not `a.max(0.0)`, which maps NaN to 0: NaN propagates, as in CUDA's kernel.
            Activation::Relu => {
                if a < 0.0 {
                    0.0
                } else {
                    a
                }
            }
            Activation::Tanh => super::fastmath::tanh(a),
            Activation::Softplus => softplus(a),
            Activation::LeakyRelu => {
                if a < 0.0 {
                    LEAKY_SLOPE * a
                } else {
                    a
                }
            }
        }
    }

    /// Derivative expressed through the activation's output `y`.
    #[inline]
    fn derivative_from_output(self, y: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - y * y,
            Activation::Softplus => 1.0 - super::fastmath::exp_nonpos(-y),
            // The sign of y is that of a; at a = 0 the slope, as PyTorch's leaky_relu backward.
            Activation::LeakyRelu => {
                if y > 0.0 {
                    1.0
                } else {
                    LEAKY_SLOPE
                }
            }
        }
    }

    /// Applies the activation to every value of `r` in place: one loop per activation, the
    /// `match` outside it, so each loop is branch-free and vectorizes (a `match` per element
    /// kept ReLU scalar and mispredicted: a fifth of an MLP GAN step).
    #[inline]
    pub(crate) fn apply_slice(self, r: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Relu => r.iter_mut().for_each(|v| *v = Activation::Relu.apply(*v)),
            Activation::Tanh => r.iter_mut().for_each(|v| *v = Activation::Tanh.apply(*v)),
            Activation::Softplus => r
                .iter_mut()
                .for_each(|v| *v = Activation::Softplus.apply(*v)),
            Activation::LeakyRelu => r
                .iter_mut()
                .for_each(|v| *v = Activation::LeakyRelu.apply(*v)),
        }
    }

    /// `g[i] *= act'(y[i])` for every `i` (the derivative through the output), one loop per
    /// activation as [`Activation::apply_slice`].
    #[inline]
    fn scale_by_derivative(self, g: &mut [f32], y: &[f32]) {
        fn each(g: &mut [f32], y: &[f32], f: impl Fn(f32) -> f32) {
            g.iter_mut().zip(y).for_each(|(o, &yv)| *o *= f(yv));
        }
        match self {
            Activation::Identity => {}
            Activation::Relu => each(g, y, |v| Activation::Relu.derivative_from_output(v)),
            Activation::Tanh => each(g, y, |v| Activation::Tanh.derivative_from_output(v)),
            Activation::Softplus => each(g, y, |v| Activation::Softplus.derivative_from_output(v)),
            Activation::LeakyRelu => {
                each(g, y, |v| Activation::LeakyRelu.derivative_from_output(v))
            }
        }
    }

    /// The activation composed from plain candle ops (reference for tests, non-CPU fallback).
    pub fn apply_slow(self, a: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(a.clone()),
            Activation::Relu => a.relu(),
            Activation::Tanh => a.tanh(),
            Activation::Softplus => {
                // max(a,0) + ln(1 + exp(-|a|))
                a.relu()? + (a.abs()?.neg()?.exp()? + 1.0)?.log()?
            }
            Activation::LeakyRelu => a.maximum(&(a * LEAKY_SLOPE as f64)?),
        }
    }
}

/// `act(x W^T + b)` for `x: (n, in)`, `w: (out, in)`, `b: (out)`.
///
/// Fused on the CPU (one op: GEMM onto the bias, activation in place); on CUDA candle's cuBLAS
/// GEMM followed by the fused bias + activation epilogue [`bias_act`]; elsewhere plain candle ops.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.apply_op3(w, b, LinearOp { act })
    } else if super::fused_available(x.device()) {
        bias_act(&x.matmul(&w.t()?)?, b, act)
    } else {
        linear_slow(x, w, b, act)
    }
}

/// `act(a + b)` with `b` broadcast over the rows of `a: (n, d)`: the epilogue of a GEMM as one
/// op, with the backward `g * act'(y)` computed from the output.
pub fn bias_act(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, BiasAct { act })
}

struct BiasAct {
    act: Activation,
}

impl Activation {
    /// The code the CUDA kernels use for this activation.
    #[allow(dead_code)]
    fn code(self) -> i32 {
        match self {
            Activation::Identity => 0,
            Activation::Relu => 1,
            Activation::Tanh => 2,
            Activation::Softplus => 3,
            Activation::LeakyRelu => 4,
        }
    }
}

impl candle_core::CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "gentrain-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let (_, d) = super::rows_and_last(l1.shape())?;
        if b.len() != d {
            candle_core::bail!("bias-act: bias {:?} vs rows of {:?}", l2.dims(), l1.dims())
        }
        let act = self.act;
        let y = super::rows_filled(a.len(), d, |i, r| {
            r.copy_from_slice(&a[i * d..][..d]);
            for (v, bv) in r.iter_mut().zip(b) {
                *v += bv;
            }
            act.apply_slice(r);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s1);
        let (a, b) = (view(s1, l1, self.name())?, view(s2, l2, self.name())?);
        let (rows, d) = super::rows_and_last(l1.shape())?;
        if l2.shape().elem_count() != d {
            candle_core::bail!("bias-act: bias {:?} vs rows of {:?}", l2.dims(), l1.dims())
        }
        let (r32, d32, code) = (
            u32_len(rows, self.name())?,
            u32_len(d, self.name())?,
            self.act.code(),
        );
        let out = alloc_out(&dev, rows * d)?;
        let f = func(&dev, "gt_bias_act", "bias_act", ptx::BIAS_ACT)?;
        let mut bld = f.builder();
        bld.arg(&a).arg(&b).arg(&out).arg(&r32).arg(&d32).arg(&code);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { bld.launch(elementwise(rows * d)) })?;
        Ok((storage(out, &dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g_pre = grad
            .contiguous()?
            .apply_op2_no_bwd(y, &ActivationBackward { act: self.act })?;
        let db = g_pre.sum(0)?;
        Ok((Some(g_pre), Some(db)))
    }
}

/// Reference composition of plain candle ops.
pub fn linear_slow(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    act.apply_slow(&x.matmul(&w.t()?)?.broadcast_add(b)?)
}

struct LinearOp {
    act: Activation,
}

/// `dst (m x n) = alpha_dst * dst + lhs (m x k) * rhs (k x n)` with explicit row/column strides,
/// split across the rayon pool when large.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    gemm_f32_on(
        Threads::Pool,
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        lhs,
        lhs_rs,
        lhs_cs,
        rhs,
        rhs_rs,
        rhs_cs,
    )
}

/// Where a GEMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split across the rayon pool when `m n k >= 2^16` and the pool has more than one thread.
    Pool,
    /// On the calling thread only: for GEMMs that are themselves one task of a parallel loop.
    One,
}

/// [`gemm_f32`] with the choice of threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_on(
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= (m.max(1) - 1) * dst_rs + n || m == 0 || n == 0);
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    let pool = rayon::current_num_threads();
    let par = if threads == Threads::Pool && pool > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(pool)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "gentrain-linear"
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
        let (x, w, b) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let (&[n, d_in], &[d_out, w_in]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("linear: expected x (n, in) and w (out, in)")
        };
        if w_in != d_in || b.len() != d_out {
            candle_core::bail!(
                "linear: shape mismatch x {:?} w {:?} b {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let mut y = vec![0f32; n * d_out];
        for r in y.chunks_mut(d_out.max(1)) {
            r.copy_from_slice(b);
        }
        gemm_f32(n, d_out, d_in, &mut y, d_out, true, x, d_in, 1, w, 1, d_in);
        if self.act != Activation::Identity {
            let act = self.act;
            for_rows(&mut y, d_out, |_, r| act.apply_slice(r));
        }
        Ok((CpuStorage::F32(y), Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g_pre = grad.apply_op2_no_bwd(y, &ActivationBackward { act: self.act })?;
        let (n, d_out) = g_pre.dims2()?;
        let d_in = x.dim(1)?;
        let need_dx = x.track_op();
        if x.device().is_cpu() {
            let (gp_t, x_t, w_t) = (g_pre.contiguous()?, x.contiguous()?, w.contiguous()?);
            let (gs, gl) = gp_t.storage_and_layout();
            let (xs, xl) = x_t.storage_and_layout();
            let (ws, wl) = w_t.storage_and_layout();
            if let (Storage::Cpu(gs), Storage::Cpu(xs), Storage::Cpu(ws)) = (&*gs, &*xs, &*ws) {
                let (gp, xs, ws) = (
                    slice(gs, gl, "linear-bwd")?,
                    slice(xs, xl, "linear-bwd")?,
                    slice(ws, wl, "linear-bwd")?,
                );
                let mut dw = vec![0f32; d_out * d_in];
                gemm_f32(
                    d_out, d_in, n, &mut dw, d_in, false, gp, 1, d_out, xs, d_in, 1,
                );
                let mut db = vec![0f64; d_out];
                for r in gp.chunks(d_out.max(1)) {
                    for (acc, v) in db.iter_mut().zip(r) {
                        *acc += *v as f64;
                    }
                }
                let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
                let dev = x.device();
                let dx = if need_dx {
                    let mut dx = vec![0f32; n * d_in];
                    gemm_f32(
                        n, d_in, d_out, &mut dx, d_in, false, gp, d_out, 1, ws, d_in, 1,
                    );
                    Some(Tensor::from_vec(dx, (n, d_in), dev)?)
                } else {
                    None
                };
                return Ok((
                    dx,
                    Some(Tensor::from_vec(dw, (d_out, d_in), dev)?),
                    Some(Tensor::from_vec(db, d_out, dev)?),
                ));
            }
        }
        let dw = g_pre.t()?.matmul(x)?;
        let db = g_pre.sum(0)?;
        let dx = if need_dx {
            Some(g_pre.matmul(w)?)
        } else {
            None
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `g * act'(y)`, the gradient through the activation given its output.
pub(crate) struct ActivationBackward {
    pub(crate) act: Activation,
}

impl candle_core::CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "gentrain-activation-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, self.name())?;
        let y = slice(s2, l2, self.name())?;
        if g.len() != y.len() {
            candle_core::bail!("activation-bwd: length mismatch")
        }
        let act = self.act;
        let (_, row) = super::rows_and_last(l1.shape())?;
        let out = super::rows_filled(g.len(), row, |i, r| {
            r.copy_from_slice(&g[i * row..][..row]);
            act.scale_by_derivative(r, &y[i * row..(i + 1) * row])
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s1);
        let (g, y) = (view(s1, l1, self.name())?, view(s2, l2, self.name())?);
        let n = l1.shape().elem_count();
        let (n32, code) = (u32_len(n, self.name())?, self.act.code());
        let out = alloc_out(&dev, n)?;
        let f = func(&dev, "gt_act_bwd", "bias_act", ptx::BIAS_ACT)?;
        let mut b = f.builder();
        b.arg(&g).arg(&y).arg(&out).arg(&n32).arg(&code);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(n)) })?;
        Ok((storage(out, &dev), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{rel_err, uniform};
    use candle_core::Var;

    fn check(n: usize, d_in: usize, d_out: usize, act: Activation, seed: u64) {
        let x = Var::from_tensor(&uniform(seed, &[n, d_in], -2.0, 2.0)).unwrap();
        let w = Var::from_tensor(&uniform(seed + 1, &[d_out, d_in], -0.5, 0.5)).unwrap();
        let b = Var::from_tensor(&uniform(seed + 2, &[d_out], -0.5, 0.5)).unwrap();
        let up = uniform(seed + 3, &[n, d_out], -1.0, 1.0);
        let fast = linear(&x, &w, &b, act).unwrap();
        let slow = linear_slow(&x, &w, &b, act).unwrap();
        assert!(rel_err(&fast, &slow) < 1e-4, "forward {act:?}");
        let gf = (fast * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let a = gf.get(v.as_tensor()).unwrap();
            let s = gs.get(v.as_tensor()).unwrap();
            assert!(
                rel_err(a, s) < 1e-3,
                "grad {act:?} {:?}: {}",
                v.dims(),
                rel_err(a, s)
            );
        }
    }

    #[test]
    fn matches_plain_ops_forward_and_backward() {
        for act in [
            Activation::Identity,
            Activation::Relu,
            Activation::Tanh,
            Activation::Softplus,
            Activation::LeakyRelu,
        ] {
            check(1, 1, 1, act, 1);
            check(7, 13, 5, act, 2);
            check(130, 67, 33, act, 3);
            check(300, 129, 101, act, 4);
        }
    }

    #[test]
    fn finite_differences_on_a_small_layer() {
        let (n, d_in, d_out) = (3, 4, 2);
        let x = uniform(11, &[n, d_in], -1.0, 1.0);
        let w = Var::from_tensor(&uniform(12, &[d_out, d_in], -1.0, 1.0)).unwrap();
        let b = uniform(13, &[d_out], -1.0, 1.0);
        let up = uniform(14, &[n, d_out], -1.0, 1.0);
        for act in [Activation::Tanh, Activation::Softplus] {
            let y = linear(&x, &w, &b, act).unwrap();
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let analytic: Vec<f32> = g
                .get(w.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let w0: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let h = 1e-2f32;
            for i in 0..w0.len() {
                let eval = |delta: f32| {
                    let mut wv = w0.clone();
                    wv[i] += delta;
                    let wt =
                        Tensor::from_vec(wv, (d_out, d_in), &candle_core::Device::Cpu).unwrap();
                    let y = linear(&x, &wt, &b, act).unwrap();
                    (y * &up)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - analytic[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{act:?} {i}: fd {fd} vs {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn gemm_plus_bias_act_epilogue_matches_plain_ops() {
        // The CUDA route (GEMM, then the fused epilogue), exercised on the CPU.
        for act in [
            Activation::Identity,
            Activation::Relu,
            Activation::Tanh,
            Activation::Softplus,
            Activation::LeakyRelu,
        ] {
            let x = Var::from_tensor(&uniform(21, &[37, 19], -2.0, 2.0)).unwrap();
            let w = Var::from_tensor(&uniform(22, &[11, 19], -0.5, 0.5)).unwrap();
            let b = Var::from_tensor(&uniform(23, &[11], -0.5, 0.5)).unwrap();
            let up = uniform(24, &[37, 11], -1.0, 1.0);
            let fused = bias_act(&x.matmul(&w.t().unwrap()).unwrap(), &b, act).unwrap();
            let slow = linear_slow(&x, &w, &b, act).unwrap();
            assert!(rel_err(&fused, &slow) < 1e-4, "{act:?}");
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs = (slow * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                assert!(
                    rel_err(
                        gf.get(v.as_tensor()).unwrap(),
                        gs.get(v.as_tensor()).unwrap()
                    ) < 1e-3,
                    "{act:?}"
                );
            }
        }
    }

    #[test]
    fn no_input_gradient_for_data() {
        let x = uniform(1, &[4, 3], -1.0, 1.0);
        let w = Var::from_tensor(&uniform(2, &[2, 3], -1.0, 1.0)).unwrap();
        let b = Var::from_tensor(&uniform(3, &[2], -1.0, 1.0)).unwrap();
        let g = linear(&x, &w, &b, Activation::Relu)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(w.as_tensor()).is_some());
    }
}
