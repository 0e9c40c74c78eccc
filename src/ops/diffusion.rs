//! The elementwise pieces of denoising diffusion (Ho, Jain & Abbeel 2020, "Denoising Diffusion
//! Probabilistic Models", DDPM; Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models",
//! DDIM), with `abar_t = prod_{s <= t} (1 - beta_s)`:
//!
//! - [`q_sample`]: the forward process in closed form, `q(x_t | x_0)` of Ho et al. eq. 4,
//!   `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, with the per-sample gather of the two
//!   coefficients from a `(T, 2)` table fused into the kernel. Backward
//!   `d/dx_0 = g sqrt(abar_t)`, `d/deps = g sqrt(1 - abar_t)` per sample; the time indices and the
//!   table get none. A time index outside the table gives a row of NaN on every device (the kernel
//!   never reads past the table, and cannot fail without a device sync); the public function
//!   refuses one on the host when the indices are on the CPU.
//! - [`simple_loss`]: `L_simple` of Ho et al. eq. 14 per sample before the batch mean,
//!   `mean_j (eps_pred_j - eps_j)^2`; backward `d/deps_pred = 2 g (eps_pred - eps) / D`,
//!   `d/deps = -d/deps_pred`. Each square is taken in f32 (so it overflows to `+inf` where the
//!   plain ops' does) and the row sum is accumulated in f64 on the CPU, in f32 terms already
//!   divided by `D` in a block reduction on the GPU (so the partial sums cannot overflow before
//!   the mean does).
//! - [`sampler_step`]: one reverse step from the predicted noise, elementwise:
//!   `x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_pred` (Ho et al. eq. 15), optionally
//!   clamped to the data range (NaN stays NaN), then
//!   `out = c_x0 x0 + c_xt x_t + c_eps eps2 + sigma noise` with
//!   `eps2 = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)` (the noise implied by the clamped `x0`,
//!   computed only when `c_eps != 0`). DDPM ancestral sampling (Ho et al. eq. 6-7, Algorithm 2)
//!   is `c_x0, c_xt` = the posterior-mean coefficients of eq. 7, `c_eps = 0`, `sigma` = the reverse
//!   standard deviation; DDIM (Song et al. eq. 12) is `c_x0 = sqrt(abar_prev)`, `c_xt = 0`,
//!   `c_eps = sqrt(1 - abar_prev - sigma^2)`. Sampling only: its backward is an error.
//!
//! The CPU forwards are the references of the kernels in `cuda/diffusion.cu`. The elementwise
//! kernels there round every product and sum separately (no fused multiply-add), in the order the
//! CPU loops use, so the two agree bit for bit; the loss differs from the CPU by the order of its
//! f32 sum.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Storage, Tensor, D};

use super::{map_rows, reduced_shape, rows_and_last, rows_filled, slice};

/// Elements per task of the elementwise [`sampler_step`] on the CPU (whatever the shape).
const CHUNK: usize = 4096;

/// The coefficients of one reverse step of [`sampler_step`] (all computed by the caller, in f64
/// and cast).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerCoefficients {
    /// `1 / sqrt(abar_t)`.
    pub sqrt_recip_abar: f32,
    /// `sqrt(1 / abar_t - 1)`.
    pub sqrt_recipm1_abar: f32,
    /// Clamp of the `x_0` prediction to `(lo, hi)` (the data range); `None`: no clipping.
    pub clip: Option<(f32, f32)>,
    /// `sqrt(abar_t)`.
    pub sqrt_abar: f32,
    /// `sqrt(1 - abar_t)` (read only when `c_eps != 0`).
    pub sqrt_one_minus_abar: f32,
    /// Weight of the `x_0` prediction.
    pub c_x0: f32,
    /// Weight of `x_t`.
    pub c_xt: f32,
    /// Weight of the noise `eps2` implied by the (clamped) `x_0` prediction.
    pub c_eps: f32,
    /// Weight of the fresh noise.
    pub sigma: f32,
}

/// `x_t = table[t_i, 0] x0 + table[t_i, 1] eps`: a sample of `q(x_t | x_0)` (Ho et al. 2020,
/// eq. 4) for each sample `i`.
///
/// - `x0`, `eps`: `(B, D)` f32, the data and the noise;
/// - `t`: `(B,)` u32, 0-based time indices (0 = one step of noise);
/// - `table`: `(T, 2)` f32, rows `[sqrt(abar_t), sqrt(1 - abar_t)]` (computed in f64 and cast);
///
/// returns `x_t`, `(B, D)` f32. Differentiable in `x0` and `eps`.
///
/// # Errors
/// Shapes or dtypes other than these; a time index `>= T` when `t` is on the CPU (on a GPU such
/// an index gives a row of NaN instead: checking it would wait for the device).
pub fn q_sample(x0: &Tensor, eps: &Tensor, t: &Tensor, table: &Tensor) -> Result<Tensor> {
    check_q_sample("q_sample", x0, eps, t, table)?;
    refuse_out_of_range("q_sample", t, table.dim(0)?)?;
    q_sample_unchecked(x0, eps, t, table)
}

/// [`q_sample`] without the host check of the time indices: an index `>= T` gives a row of NaN
/// on every device (for the device checks of that semantics).
pub(crate) fn q_sample_unchecked(
    x0: &Tensor,
    eps: &Tensor,
    t: &Tensor,
    table: &Tensor,
) -> Result<Tensor> {
    check_q_sample("q_sample", x0, eps, t, table)?;
    let dev = x0.device();
    if super::fused_available(dev) {
        let table = table.detach().to_device(dev)?.contiguous()?;
        let t = t.to_device(dev)?.contiguous()?;
        x0.contiguous()?
            .apply_op3(&eps.contiguous()?, &t, QSample { table })
    } else {
        q_sample_composed(x0, eps, t, table)
    }
}

/// Reference composition of plain candle ops (`index_select` of the table, broadcast products).
/// Refuses out-of-range time indices on the CPU as [`q_sample`] does.
pub fn q_sample_slow(x0: &Tensor, eps: &Tensor, t: &Tensor, table: &Tensor) -> Result<Tensor> {
    check_q_sample("q_sample_slow", x0, eps, t, table)?;
    refuse_out_of_range("q_sample_slow", t, table.dim(0)?)?;
    q_sample_composed(x0, eps, t, table)
}

fn q_sample_composed(x0: &Tensor, eps: &Tensor, t: &Tensor, table: &Tensor) -> Result<Tensor> {
    let dev = x0.device();
    let c = table
        .detach()
        .to_device(dev)?
        .index_select(&t.to_device(dev)?, 0)?;
    x0.broadcast_mul(&c.narrow(1, 0, 1)?)? + eps.broadcast_mul(&c.narrow(1, 1, 1)?)?
}

/// Per-sample `mean_j (eps_pred_j - eps_j)^2`: `L_simple` of Ho et al. 2020, eq. 14, before the
/// mean over the batch.
///
/// `eps_pred`, `eps`: `(B, D)` f32; returns `(B,)` f32. Differentiable in both inputs. NaN and
/// infinities propagate as in the plain ops (a NaN or an `inf - inf` gives NaN, an infinite
/// difference `+inf`).
pub fn simple_loss(eps_pred: &Tensor, eps: &Tensor) -> Result<Tensor> {
    check_pair("simple_loss", eps_pred, eps)?;
    if super::fused_available(eps_pred.device()) {
        eps_pred
            .contiguous()?
            .apply_op2(&eps.contiguous()?, SimpleLoss)
    } else {
        simple_loss_slow(eps_pred, eps)
    }
}

/// Reference composition of plain candle ops.
pub fn simple_loss_slow(eps_pred: &Tensor, eps: &Tensor) -> Result<Tensor> {
    check_pair("simple_loss_slow", eps_pred, eps)?;
    (eps_pred - eps)?.sqr()?.mean(D::Minus1)
}

/// One reverse (sampling) step of DDPM or DDIM from the predicted noise, elementwise (see the
/// module docs and [`SamplerCoefficients`]):
/// `x0 = sqrt_recip_abar x_t - sqrt_recipm1_abar eps_pred`, clamped when `c.clip` is set (NaN
/// stays NaN); `eps2 = (x_t - sqrt_abar x0) / sqrt_one_minus_abar` when `c_eps != 0`;
/// `out = c_x0 x0 + c_xt x_t + c_eps eps2 + sigma noise`.
///
/// `x_t`, `eps_pred`, `noise`: f32 of one shape (`(B, D)` or any other); returns `x_{t-1}` of that
/// shape. Not differentiable (sampling only): a backward pass through it is an error.
///
/// # Errors
/// Shapes or dtypes that differ; a clip range with `lo > hi` or a NaN bound.
pub fn sampler_step(
    x_t: &Tensor,
    eps_pred: &Tensor,
    noise: &Tensor,
    c: &SamplerCoefficients,
) -> Result<Tensor> {
    check_sampler("sampler_step", x_t, eps_pred, noise, c)?;
    if super::fused_available(x_t.device()) {
        x_t.contiguous()?.apply_op3(
            &eps_pred.contiguous()?,
            &noise.contiguous()?,
            SamplerStep { c: *c },
        )
    } else {
        sampler_step_composed(x_t, eps_pred, noise, c)
    }
}

/// Reference composition of plain candle ops (differentiable, unlike [`sampler_step`]).
pub fn sampler_step_slow(
    x_t: &Tensor,
    eps_pred: &Tensor,
    noise: &Tensor,
    c: &SamplerCoefficients,
) -> Result<Tensor> {
    check_sampler("sampler_step_slow", x_t, eps_pred, noise, c)?;
    sampler_step_composed(x_t, eps_pred, noise, c)
}

fn sampler_step_composed(
    x_t: &Tensor,
    eps_pred: &Tensor,
    noise: &Tensor,
    c: &SamplerCoefficients,
) -> Result<Tensor> {
    let mut x0 = ((x_t * c.sqrt_recip_abar as f64)? - (eps_pred * c.sqrt_recipm1_abar as f64)?)?;
    if let Some((lo, hi)) = c.clip {
        // NaN stays NaN whatever the backend's maximum / minimum do with it.
        let clamped = x0.clamp(lo, hi)?;
        x0 = x0.ne(&x0)?.where_cond(&x0, &clamped)?;
    }
    let mut out = ((&x0 * c.c_x0 as f64)? + (x_t * c.c_xt as f64)?)?;
    if c.c_eps != 0.0 {
        // A true division (candle's `tensor / scalar` multiplies by the reciprocal).
        let denom = Tensor::full(c.sqrt_one_minus_abar, x_t.shape(), x_t.device())?;
        let eps2 = ((x_t - (&x0 * c.sqrt_abar as f64)?)? / denom)?;
        out = (out + (eps2 * c.c_eps as f64)?)?;
    }
    out + (noise * c.sigma as f64)?
}

fn check_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("{op}: {what} must be f32, got {:?}", t.dtype())
    }
    Ok(())
}

/// Two `(B, D)` f32 tensors of one shape.
fn check_pair(op: &str, a: &Tensor, b: &Tensor) -> Result<(usize, usize)> {
    check_f32(op, "the first input", a)?;
    check_f32(op, "the second input", b)?;
    let (rows, d) = a.dims2().map_err(|_| {
        candle_core::Error::Msg(format!("{op}: expected (B, D) inputs, got {:?}", a.dims()))
    })?;
    if b.dims() != a.dims() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    Ok((rows, d))
}

fn check_q_sample(op: &str, x0: &Tensor, eps: &Tensor, t: &Tensor, table: &Tensor) -> Result<()> {
    let (b, _) = check_pair(op, x0, eps)?;
    if t.dtype() != DType::U32 || t.dims() != [b] {
        candle_core::bail!(
            "{op}: time indices must be ({b},) u32 (one per sample), got {:?} {:?}",
            t.dims(),
            t.dtype()
        )
    }
    check_f32(op, "the table", table)?;
    if table.rank() != 2 || table.dim(1)? != 2 {
        candle_core::bail!(
            "{op}: the table must be (T, 2) [sqrt(abar_t), sqrt(1 - abar_t)], got {:?}",
            table.dims()
        )
    }
    Ok(())
}

/// An error naming the first time index `>= steps`, when the indices are on the CPU (reading them
/// from a GPU would wait for it; there the kernel writes a NaN row instead).
fn refuse_out_of_range(op: &str, t: &Tensor, steps: usize) -> Result<()> {
    if !t.device().is_cpu() {
        return Ok(());
    }
    let v: Vec<u32> = t.to_vec1()?;
    if let Some((i, &bad)) = v.iter().enumerate().find(|(_, &x)| x as usize >= steps) {
        candle_core::bail!(
            "{op}: time index {bad} of sample {i} is out of range for a table of {steps} steps \
             (indices are 0-based, below {steps})"
        )
    }
    Ok(())
}

fn check_sampler(
    op: &str,
    x_t: &Tensor,
    eps_pred: &Tensor,
    noise: &Tensor,
    c: &SamplerCoefficients,
) -> Result<()> {
    for (what, t) in [("x_t", x_t), ("eps_pred", eps_pred), ("noise", noise)] {
        check_f32(op, what, t)?;
        if t.dims() != x_t.dims() {
            candle_core::bail!("{op}: {what} {:?} vs x_t {:?}", t.dims(), x_t.dims())
        }
    }
    if let Some((lo, hi)) = c.clip {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            candle_core::bail!("{op}: clip range ({lo}, {hi}) is empty or NaN")
        }
    }
    Ok(())
}

/// The table's contiguous f32 values on the CPU.
fn with_cpu_table<R>(table: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = table.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(slice(cpu, layout, op)?)),
        _ => candle_core::bail!("{op}: the table is not on the CPU"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{op}: time indices must be u32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: time indices must be contiguous"),
    }
}

/// The two coefficients of time index `t` (NaN for one outside the table).
#[inline]
fn coefficients(table: &[f32], t: u32) -> (f32, f32) {
    let t = t as usize;
    if t < table.len() / 2 {
        (table[2 * t], table[2 * t + 1])
    } else {
        (f32::NAN, f32::NAN)
    }
}

/// [`q_sample`] over `(x0, eps, t)`, the table held by the op.
struct QSample {
    table: Tensor,
}

impl CustomOp3 for QSample {
    fn name(&self) -> &'static str {
        "gentrain-q-sample"
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
        let (x0, eps) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let t = u32_slice(s3, l3, self.name())?;
        let (rows, d) = rows_and_last(l1.shape())?;
        super::check_row_input_sizes(self.name(), &[x0.len(), eps.len(), t.len()], 2, rows, d)?;
        let out = with_cpu_table(&self.table, self.name(), |table| {
            rows_filled(x0.len(), d, |i, r| {
                let (a, b) = coefficients(table, t[i]);
                let (x, e) = (&x0[i * d..(i + 1) * d], &eps[i * d..(i + 1) * d]);
                for ((o, xv), ev) in r.iter_mut().zip(x).zip(e) {
                    *o = a * xv + b * ev;
                }
            })
        })?;
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
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s1);
        let (x0, eps) = (view(s1, l1, self.name())?, view(s2, l2, self.name())?);
        let t = u32_view(s3, l3, self.name())?;
        let (rows, d) = rows_and_last(l1.shape())?;
        super::check_row_input_sizes(
            self.name(),
            &[
                l1.shape().elem_count(),
                l2.shape().elem_count(),
                l3.shape().elem_count(),
            ],
            2,
            rows,
            d,
        )?;
        let (storage_t, layout_t) = self.table.storage_and_layout();
        let Storage::Cuda(table_s) = &*storage_t else {
            candle_core::bail!("{}: the table is not on the GPU", self.name())
        };
        let table = view(table_s, layout_t, self.name())?;
        let steps = u32_len(self.table.dim(0)?, self.name())?;
        let (r32, d32) = (u32_len(rows, self.name())?, u32_len(d, self.name())?);
        let out = alloc_out(&dev, rows * d)?;
        let f = func(&dev, "gt_q_sample", "diffusion", ptx::DIFFUSION)?;
        let mut b = f.builder();
        b.arg(&x0)
            .arg(&eps)
            .arg(&t)
            .arg(&table)
            .arg(&out)
            .arg(&r32)
            .arg(&d32)
            .arg(&steps);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(rows * d)) })?;
        Ok((storage(out, &dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = t.apply_op1_no_bwd(&GatherCoefficients {
            table: self.table.clone(),
        })?;
        let dx0 = if x0.track_op() {
            Some(g.broadcast_mul(&c.narrow(1, 0, 1)?)?)
        } else {
            None
        };
        let deps = if eps.track_op() {
            Some(g.broadcast_mul(&c.narrow(1, 1, 1)?)?)
        } else {
            None
        };
        Ok((dx0, deps, None))
    }
}

/// `(B, 2)` rows `table[t_i]` of `(B,)` u32 time indices (NaN rows for indices outside the
/// table): the per-sample coefficients of [`q_sample`]'s backward.
struct GatherCoefficients {
    table: Tensor,
}

impl CustomOp1 for GatherCoefficients {
    fn name(&self) -> &'static str {
        "gentrain-q-sample-coefficients"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = u32_slice(s, l, self.name())?;
        let mut out = vec![0f32; 2 * t.len()];
        with_cpu_table(&self.table, self.name(), |table| {
            for (o, &ti) in out.chunks_exact_mut(2).zip(t) {
                (o[0], o[1]) = coefficients(table, ti);
            }
        })?;
        Ok((CpuStorage::F32(out), Shape::from((t.len(), 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s);
        let t = u32_view(s, l, self.name())?;
        let rows = l.shape().elem_count();
        let (storage_t, layout_t) = self.table.storage_and_layout();
        let Storage::Cuda(table_s) = &*storage_t else {
            candle_core::bail!("{}: the table is not on the GPU", self.name())
        };
        let table = view(table_s, layout_t, self.name())?;
        let steps = u32_len(self.table.dim(0)?, self.name())?;
        let r32 = u32_len(rows, self.name())?;
        let out = alloc_out(&dev, 2 * rows)?;
        let f = func(&dev, "gt_q_sample_coefs", "diffusion", ptx::DIFFUSION)?;
        let mut b = f.builder();
        b.arg(&t).arg(&table).arg(&out).arg(&r32).arg(&steps);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(2 * rows)) })?;
        Ok((storage(out, &dev), Shape::from((rows, 2))))
    }
}

/// Contiguous u32 view of a CUDA storage (the time indices).
#[cfg(feature = "cuda")]
fn u32_view<'a>(
    s: &'a candle_core::CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    let v = s.as_cuda_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(v.slice(a..b)),
        None => candle_core::bail!("{op}: time indices must be contiguous"),
    }
}

struct SimpleLoss;

impl CustomOp2 for SimpleLoss {
    fn name(&self) -> &'static str {
        "gentrain-simple-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, e) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (rows, d) = rows_and_last(l1.shape())?;
        super::check_row_input_sizes(self.name(), &[p.len(), e.len()], 2, rows, d)?;
        let out = map_rows(rows, d, |i| {
            let (p, e) = (&p[i * d..(i + 1) * d], &e[i * d..(i + 1) * d]);
            // The square in f32, as on the GPU and in the plain ops (it overflows alike); the sum
            // in f64.
            let s: f64 = p
                .iter()
                .zip(e)
                .map(|(a, b)| {
                    let diff = a - b;
                    (diff * diff) as f64
                })
                .sum();
            (s / d as f64) as f32
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
            "gt_simple_loss",
            "diffusion",
            ptx::DIFFUSION,
            &[(s1, l1), (s2, l2)],
            0,
            Output::PerRow,
        )
    }

    fn bwd(
        &self,
        eps_pred: &Tensor,
        eps: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = eps_pred.dim(D::Minus1)?;
        let scale = (g * (2.0 / d as f64))?.unsqueeze(D::Minus1)?;
        let dp = (eps_pred - eps)?.broadcast_mul(&scale)?;
        let de = if eps.track_op() {
            Some(dp.neg()?)
        } else {
            None
        };
        let dp = if eps_pred.track_op() { Some(dp) } else { None };
        Ok((dp, de))
    }
}

struct SamplerStep {
    c: SamplerCoefficients,
}

impl CustomOp3 for SamplerStep {
    fn name(&self) -> &'static str {
        "gentrain-sampler-step"
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
        let (xt, ep, nz) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        if ep.len() != xt.len() || nz.len() != xt.len() {
            candle_core::bail!(
                "{}: inputs of {}, {} and {} values",
                self.name(),
                xt.len(),
                ep.len(),
                nz.len()
            )
        }
        let c = self.c;
        let (clip, (lo, hi)) = (c.clip.is_some(), c.clip.unwrap_or((0.0, 0.0)));
        let out = rows_filled(xt.len(), CHUNK, |k, r| {
            let o = k * CHUNK;
            for (j, v) in r.iter_mut().enumerate() {
                let (x, e, n) = (xt[o + j], ep[o + j], nz[o + j]);
                let mut x0 = c.sqrt_recip_abar * x - c.sqrt_recipm1_abar * e;
                if clip {
                    // Comparisons, not f32::max / min: NaN stays NaN, as in the kernel.
                    x0 = if x0 < lo {
                        lo
                    } else if x0 > hi {
                        hi
                    } else {
                        x0
                    };
                }
                let mut y = c.c_x0 * x0 + c.c_xt * x;
                if c.c_eps != 0.0 {
                    let eps2 = (x - c.sqrt_abar * x0) / c.sqrt_one_minus_abar;
                    y += c.c_eps * eps2;
                }
                *v = y + c.sigma * n;
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
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s1);
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            candle_core::bail!(
                "{}: inputs {:?}, {:?} and {:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let (xt, ep, nz) = (
            view(s1, l1, self.name())?,
            view(s2, l2, self.name())?,
            view(s3, l3, self.name())?,
        );
        let n32 = u32_len(n, self.name())?;
        let c = self.c;
        let clip = c.clip.is_some() as i32;
        let (lo, hi) = c.clip.unwrap_or((0.0, 0.0));
        let out = alloc_out(&dev, n)?;
        let f = func(&dev, "gt_sampler_step", "diffusion", ptx::DIFFUSION)?;
        let mut b = f.builder();
        b.arg(&xt)
            .arg(&ep)
            .arg(&nz)
            .arg(&out)
            .arg(&n32)
            .arg(&c.sqrt_recip_abar)
            .arg(&c.sqrt_recipm1_abar)
            .arg(&clip)
            .arg(&lo)
            .arg(&hi)
            .arg(&c.sqrt_abar)
            .arg(&c.sqrt_one_minus_abar)
            .arg(&c.c_x0)
            .arg(&c.c_xt)
            .arg(&c.c_eps)
            .arg(&c.sigma);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { b.launch(elementwise(n)) })?;
        Ok((storage(out, &dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x_t: &Tensor,
        _eps_pred: &Tensor,
        _noise: &Tensor,
        _res: &Tensor,
        _g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        candle_core::bail!(
            "sampler_step is not differentiable (sampling only): detach its inputs, or use \
             sampler_step_slow for a differentiable step"
        )
    }
}

#[cfg(test)]
mod tests {
    //! The semantics only the crate can reach (the unchecked gather); the comparisons with the
    //! compositions, finite differences and hand-computed cases are in `tests/diffusion_ops.rs`.
    use super::*;
    use crate::ops::testing::uniform;
    use candle_core::{Device, Var};

    fn table() -> Tensor {
        Tensor::new(&[[0.9f32, 0.1], [0.5, 0.5], [0.1, 0.9]], &Device::Cpu).unwrap()
    }

    #[test]
    fn out_of_range_time_indices_give_nan_rows_and_nan_gradients_unchecked() {
        let x0 = Var::from_tensor(&uniform(1, &[4, 5], -1.0, 1.0)).unwrap();
        let eps = Var::from_tensor(&uniform(2, &[4, 5], -1.0, 1.0)).unwrap();
        let t = Tensor::new(&[0u32, 3, 2, u32::MAX], &Device::Cpu).unwrap();
        let y = q_sample_unchecked(&x0, &eps, &t, &table()).unwrap();
        let rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
        assert!(rows[0].iter().chain(&rows[2]).all(|v| v.is_finite()));
        assert!(
            rows[1].iter().chain(&rows[3]).all(|v| v.is_nan()),
            "{rows:?}"
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        for v in [&x0, &eps] {
            let gr: Vec<Vec<f32>> = g.get(v.as_tensor()).unwrap().to_vec2().unwrap();
            assert!(gr[0].iter().chain(&gr[2]).all(|v| v.is_finite()));
            assert!(gr[1].iter().chain(&gr[3]).all(|v| v.is_nan()), "{gr:?}");
        }
        // The public function refuses the same indices on the host.
        assert!(q_sample(&x0, &eps, &t, &table()).is_err());
    }

    #[test]
    fn the_backward_gathers_each_samples_coefficients() {
        let t = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let c: Vec<Vec<f32>> = t
            .apply_op1_no_bwd(&GatherCoefficients { table: table() })
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(c, vec![vec![0.1, 0.9], vec![0.9, 0.1], vec![0.5, 0.5]]);
    }

    #[test]
    fn sampler_step_has_no_backward() {
        let x = Var::from_tensor(&uniform(3, &[2, 3], -1.0, 1.0)).unwrap();
        let c = SamplerCoefficients {
            sqrt_recip_abar: 1.5,
            sqrt_recipm1_abar: 0.5,
            clip: None,
            sqrt_abar: 0.7,
            sqrt_one_minus_abar: 0.7,
            c_x0: 0.5,
            c_xt: 0.5,
            c_eps: 0.0,
            sigma: 0.1,
        };
        let y = sampler_step(&x, &x, &x, &c).unwrap();
        let e = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(e.contains("not differentiable"), "{e}");
    }
}
