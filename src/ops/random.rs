//! Random draws as ops, so they run where the data lives: dynamic binarization of gathered rows
//! and standard-normal noise, both from the counter-based streams of [`crate::rng::counter_u64`]
//! (the CPU forwards are the references of the CUDA kernels in `cuda/random.cu`).

use candle_core::{CpuStorage, CustomOp2, InplaceOp1, Layout, Result, Shape, Tensor};

use crate::rng::{counter_normal, counter_u64};

/// Bernoulli(pixel / 255) bits of the rows `idx` of a `(n, d)` u8 pixel tensor, as `(b, d)` f32.
/// A row index of `n` or more gives a row of NaN on every device (the kernel never reads past
/// the pixels, and cannot fail without a device sync): callers that take indices from users
/// check them on the host first, as `DataSource::batch` (in `data`) does.
pub fn binarize_rows(pixels: &Tensor, idx: &Tensor, key: u64) -> Result<Tensor> {
    pixels.apply_op2_no_bwd(idx, &BinarizeRows { key })
}

/// A `shape` tensor of standard normals from the counter stream `key` on `device`.
pub fn normal(shape: &[usize], key: u64, device: &candle_core::Device) -> Result<Tensor> {
    let t = Tensor::zeros(shape, candle_core::DType::F32, device)?;
    t.inplace_op1(&FillNormal { key })?;
    Ok(t)
}

pub(crate) struct BinarizeRows {
    pub(crate) key: u64,
}

impl CustomOp2 for BinarizeRows {
    fn name(&self) -> &'static str {
        "gentrain-binarize-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(px), CpuStorage::U32(idx)) = (s1, s2) else {
            candle_core::bail!("binarize_rows: expected u8 pixels and u32 indices")
        };
        let (Some((p0, p1)), Some((i0, i1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("binarize_rows: inputs must be contiguous")
        };
        let (px, idx) = (&px[p0..p1], &idx[i0..i1]);
        let &[n, d] = l1.dims() else {
            candle_core::bail!("binarize_rows: pixels must be (n, d)")
        };
        let mut out = Vec::with_capacity(idx.len() * d);
        for (b, &i) in idx.iter().enumerate() {
            if i as usize >= n {
                out.extend(std::iter::repeat_n(f32::NAN, d));
                continue;
            }
            for (j, &p) in px[i as usize * d..(i as usize + 1) * d].iter().enumerate() {
                let r = counter_u64(self.key, (b * d + j) as u64) >> 32;
                out.push((r * 255 < (p as u64) << 32) as u8 as f32);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((idx.len(), d))))
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
        let (Some((p0, p1)), Some((i0, i1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("binarize_rows: inputs must be contiguous")
        };
        let px = s1.as_cuda_slice::<u8>()?.slice(p0..p1);
        let idx = s2.as_cuda_slice::<u32>()?.slice(i0..i1);
        let &[n, d] = l1.dims() else {
            candle_core::bail!("binarize_rows: pixels must be (n, d)")
        };
        let b = i1 - i0;
        let (n32, b32, d32) = (
            u32_len(n, self.name())?,
            u32_len(b, self.name())?,
            u32_len(d, self.name())?,
        );
        let out = alloc_out(&dev, b * d)?;
        let f = func(&dev, "gt_binarize_rows", "random", ptx::RANDOM)?;
        let mut bld = f.builder();
        bld.arg(&px)
            .arg(&idx)
            .arg(&out)
            .arg(&n32)
            .arg(&b32)
            .arg(&d32)
            .arg(&self.key);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { bld.launch(elementwise(b * d)) })?;
        Ok((storage(out, &dev), Shape::from((b, d))))
    }
}

pub(crate) struct FillNormal {
    pub(crate) key: u64,
}

impl InplaceOp1 for FillNormal {
    fn name(&self) -> &'static str {
        "gentrain-fill-normal"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let out = super::slice_mut(s, l, self.name())?;
        for (i, v) in out.iter_mut().enumerate() {
            *v = counter_normal(self.key, i as u64);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use super::cuda::*;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = device(s);
        let n = l.shape().elem_count();
        let n32 = u32_len(n, self.name())?;
        let mut out = view_mut(s, l, self.name())?;
        let f = func(&dev, "gt_fill_normal", "random", ptx::RANDOM)?;
        let mut bld = f.builder();
        bld.arg(&mut out).arg(&n32).arg(&self.key);
        // SAFETY: argument types and count match the kernel signature.
        launched(unsafe { bld.launch(elementwise(n)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn out_of_range_rows_give_nan_rows_not_a_read_past_the_pixels() {
        // The CUDA kernel cannot fail without a sync, so both sides write NaN rows; the CPU used
        // to fail instead, and the GPU read past the buffer.
        let px = Tensor::from_slice(&[0u8, 255, 128, 7, 255, 0], (3, 2), &Device::Cpu).unwrap();
        let idx = Tensor::from_slice(&[2u32, 3, 0, u32::MAX], 4, &Device::Cpu).unwrap();
        let b: Vec<Vec<f32>> = binarize_rows(&px, &idx, 9).unwrap().to_vec2().unwrap();
        assert_eq!(b[0], vec![1.0, 0.0]);
        assert_eq!(b[2][0], 0.0);
        assert_eq!(b[2][1], 1.0);
        assert!(b[1].iter().chain(&b[3]).all(|v| v.is_nan()), "{b:?}");
    }
}
