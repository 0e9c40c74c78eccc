//! Fused, in-place Adam update (Kingma & Ba 2015, Algorithm 1, in PyTorch's formulation):
//!
//! ```text
//! g <- g + wd * p                         (L2 weight decay, off by default)
//! m <- b1 m + (1 - b1) g
//! v <- b2 v + (1 - b2) g^2
//! p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! The moments live in one flat state tensor of `2n + 1` floats: `m`, then `v`, then a guard
//! value. The update is two in-place passes, [`AdamMoments`] (state from grad and param) and
//! [`AdamApply`] (param from state); both do nothing when the guard is NaN or infinite. On a GPU
//! the trainer writes `loss + 0 * sum(grads)` into the guard on the device, so a step with a
//! non-finite loss or gradient is skipped without the host waiting for the device (the found-inf
//! pattern of mixed-precision training).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};
use rayon::prelude::*;

use super::{slice, slice_mut, PAR_THRESHOLD};

/// Updates the packed `(2, n)` moments `[m; v]` from the gradient (and the parameter, for weight
/// decay).
pub struct AdamMoments {
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
}

/// Applies the bias-corrected step to the parameter from the packed moments.
pub struct AdamApply {
    pub lr: f32,
    pub eps: f32,
    /// `1 - beta1^t`.
    pub bias_correction1: f32,
    /// `1 - beta2^t`.
    pub bias_correction2: f32,
}

const CHUNK: usize = PAR_THRESHOLD;

impl InplaceOp3 for AdamMoments {
    fn name(&self) -> &'static str {
        "gentrain-adam-moments"
    }

    fn cpu_fwd(
        &self,
        state: &mut CpuStorage,
        ls: &Layout,
        grad: &CpuStorage,
        lg: &Layout,
        param: &CpuStorage,
        lp: &Layout,
    ) -> Result<()> {
        let state = slice_mut(state, ls, self.name())?;
        let g = slice(grad, lg, self.name())?;
        let p = slice(param, lp, self.name())?;
        let n = g.len();
        if state.len() != 2 * n + 1 || p.len() != n {
            candle_core::bail!(
                "adam: state {} vs grad {} vs param {}",
                state.len(),
                n,
                p.len()
            )
        }
        if !state[2 * n].is_finite() {
            return Ok(());
        }
        let (m, rest) = state.split_at_mut(n);
        let v = &mut rest[..n];
        let (b1, b2, wd) = (self.beta1, self.beta2, self.weight_decay);
        let update = |m: &mut [f32], v: &mut [f32], g: &[f32], p: &[f32]| {
            for i in 0..g.len() {
                let gi = if wd != 0.0 { g[i] + wd * p[i] } else { g[i] };
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            }
        };
        if n >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
            m.par_chunks_mut(CHUNK)
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
                .for_each(|((m, v), (g, p))| update(m, v, g, p));
        } else {
            update(m, v, g, p);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        state: &mut candle_core::CudaStorage,
        ls: &Layout,
        grad: &candle_core::CudaStorage,
        lg: &Layout,
        param: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<()> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(grad);
        let n = lg.shape().elem_count();
        if ls.shape().elem_count() != 2 * n + 1 || lp.shape().elem_count() != n {
            candle_core::bail!(
                "adam: state {:?} vs grad {:?} vs param {:?}",
                ls.dims(),
                lg.dims(),
                lp.dims()
            )
        }
        let (g, p) = (view(grad, lg, self.name())?, view(param, lp, self.name())?);
        let mut st = view_mut(state, ls, self.name())?;
        let n32 = u32_len(n, self.name())?;
        let f = func(&dev, "gt_adam_moments", "adam", ptx::ADAM)?;
        let mut b = f.builder();
        b.arg(&mut st)
            .arg(&g)
            .arg(&p)
            .arg(&n32)
            .arg(&self.beta1)
            .arg(&self.beta2)
            .arg(&self.weight_decay);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(n)) })
    }
}

impl InplaceOp2 for AdamApply {
    fn name(&self) -> &'static str {
        "gentrain-adam-apply"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        lp: &Layout,
        state: &CpuStorage,
        ls: &Layout,
    ) -> Result<()> {
        let p = slice_mut(param, lp, self.name())?;
        let state = slice(state, ls, self.name())?;
        let n = p.len();
        if state.len() != 2 * n + 1 {
            candle_core::bail!("adam: state {} vs param {}", state.len(), n)
        }
        if !state[2 * n].is_finite() {
            return Ok(());
        }
        let (m, rest) = state.split_at(n);
        let v = &rest[..n];
        let step_size = self.lr / self.bias_correction1;
        let sqrt_bc2 = self.bias_correction2.sqrt();
        let eps = self.eps;
        let apply = |p: &mut [f32], m: &[f32], v: &[f32]| {
            for i in 0..p.len() {
                p[i] -= step_size * m[i] / (v[i].sqrt() / sqrt_bc2 + eps);
            }
        };
        if n >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
            p.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(p, (m, v))| apply(p, m, v));
        } else {
            apply(p, m, v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        lp: &Layout,
        state: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<()> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(state);
        let n = lp.shape().elem_count();
        if ls.shape().elem_count() != 2 * n + 1 {
            candle_core::bail!("adam: state {:?} vs param {:?}", ls.dims(), lp.dims())
        }
        let st = view(state, ls, self.name())?;
        let mut p = view_mut(param, lp, self.name())?;
        let n32 = u32_len(n, self.name())?;
        let (step_size, sqrt_bc2) = (
            self.lr / self.bias_correction1,
            self.bias_correction2.sqrt(),
        );
        let f = func(&dev, "gt_adam_apply", "adam", ptx::ADAM)?;
        let mut b = f.builder();
        b.arg(&mut p)
            .arg(&st)
            .arg(&n32)
            .arg(&step_size)
            .arg(&sqrt_bc2)
            .arg(&self.eps);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(n)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// One update of `p` with gradient `g` and zero moments, on the CPU.
    fn step(p: &[f32], g: &[f32], weight_decay: f32) -> (Vec<f32>, Vec<f32>) {
        let n = p.len();
        let pt = Tensor::from_slice(p, n, &Device::Cpu).unwrap();
        let gt = Tensor::from_slice(g, n, &Device::Cpu).unwrap();
        let st = Tensor::zeros(2 * n + 1, candle_core::DType::F32, &Device::Cpu).unwrap();
        st.inplace_op3(
            &gt,
            &pt,
            &AdamMoments {
                beta1: 0.9,
                beta2: 0.999,
                weight_decay,
            },
        )
        .unwrap();
        pt.inplace_op2(
            &st,
            &AdamApply {
                lr: 1e-3,
                eps: 1e-8,
                bias_correction1: 0.1,
                bias_correction2: 0.001,
            },
        )
        .unwrap();
        (pt.to_vec1().unwrap(), st.to_vec1().unwrap())
    }

    #[test]
    fn no_weight_decay_means_no_decay_term_even_for_infinite_parameters() {
        // The reference semantics the CUDA kernel now follows (it used to add 0 * p always,
        // turning an infinite parameter's moments into NaN).
        let (p, s) = step(&[f32::INFINITY, 1.0], &[0.5, 0.5], 0.0);
        assert!(s[..4].iter().all(|v| v.is_finite()), "{s:?}");
        assert_eq!(p[0], f32::INFINITY);
        assert!(p[1] < 1.0);
        let (_, s) = step(&[f32::INFINITY, 1.0], &[0.5, 0.5], 0.01);
        assert!(s[0].is_infinite() && s[1].is_finite(), "{s:?}");
    }

    #[test]
    fn a_non_finite_guard_skips_the_update() {
        let n = 3;
        let p = Tensor::from_slice(&[1f32, 2.0, 3.0], n, &Device::Cpu).unwrap();
        let g = Tensor::from_slice(&[1f32, 1.0, 1.0], n, &Device::Cpu).unwrap();
        let mut s0 = vec![0f32; 2 * n + 1];
        s0[2 * n] = f32::NAN;
        let st = Tensor::from_slice(&s0, 2 * n + 1, &Device::Cpu).unwrap();
        let moments = AdamMoments {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
        };
        st.inplace_op3(&g, &p, &moments).unwrap();
        assert_eq!(st.to_vec1::<f32>().unwrap()[..2 * n], vec![0f32; 2 * n]);
    }
}
