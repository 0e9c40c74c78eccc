//! Nearest-neighbour up-sampling by an integer factor (PyTorch's `F.interpolate(x,
//! scale_factor=s, mode="nearest")`, the DDPM U-Net's decoder, Ho et al. 2020, appendix B) as
//! a CPU op with its own backward.
//!
//! `y[b, c, i, j] = x[b, c, i / s, j / s]`, so the gradient is the sum of each `s x s` block of
//! `dy`: `dx[b, c, i, j] = sum_{u, v < s} dy[b, c, i s + u, j s + v]`, summed row by row in the
//! order `(u, v)`. candle's own backward of `upsample_nearest2d` is a grouped convolution with a
//! kernel of ones (one im2col and GEMM per channel on the CPU), which took about 2% of a
//! training step of `configs/ddpm-mnist.toml`; these are two passes over the tensor.
//!
//! Shapes: `x (B, C, H, W)` f32 -> `y (B, C, s H, s W)`. On other devices, and for other dtypes,
//! [`upsample_nearest`] is candle's `upsample_nearest2d` (and its backward).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{rows_filled, slice};

/// `x (B, C, H, W)` up-sampled by the integer factor `scale` (at least 1) to
/// `(B, C, scale H, scale W)`, each value repeated over a `scale x scale` block.
///
/// # Errors
/// A shape other than 4-D or a `scale` of 0.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if scale == 0 {
        candle_core::bail!("upsample_nearest: the scale must be at least 1")
    }
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.upsample_nearest2d(scale * h, scale * w);
    }
    let dims = Dims { b, c, h, w, scale };
    x.contiguous()?.apply_op1(Upsample(dims))
}

/// Sizes of one up-sampling: the input `(b, c, h, w)` and the factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    scale: usize,
}

impl Dims {
    fn input(&self) -> [usize; 4] {
        [self.b, self.c, self.h, self.w]
    }

    fn output(&self) -> [usize; 4] {
        [self.b, self.c, self.h * self.scale, self.w * self.scale]
    }
}

/// The forward op: `x` -> `y`.
struct Upsample(Dims);

/// The backward op: `dy` -> `dx`, the block sums.
struct BlockSum(Dims);

fn check(op: &str, l: &Layout, want: [usize; 4]) -> Result<()> {
    if l.dims() != want {
        candle_core::bail!("{op}: input {:?}, expected {want:?}", l.dims())
    }
    Ok(())
}

impl CustomOp1 for Upsample {
    fn name(&self) -> &'static str {
        "gentrain-upsample-nearest"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.0;
        check(self.name(), l, d.input())?;
        let x = slice(s, l, self.name())?;
        let (ow, s) = (d.w * d.scale, d.scale);
        // One output row per task row: output row `r` of plane `p` reads input row `r / s`.
        let y = rows_filled(x.len() * s * s, ow, |r, row| {
            let (plane, i) = (r / (d.h * s), (r % (d.h * s)) / s);
            let src = &x[(plane * d.h + i) * d.w..][..d.w];
            for (block, v) in row.chunks_exact_mut(s).zip(src) {
                block.fill(*v);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(&d.output())))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(BlockSum(self.0))?))
    }
}

impl CustomOp1 for BlockSum {
    fn name(&self) -> &'static str {
        "gentrain-upsample-nearest-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.0;
        check(self.name(), l, d.output())?;
        let dy = slice(s, l, self.name())?;
        let (ow, s) = (d.w * d.scale, d.scale);
        let dx = rows_filled(dy.len() / (s * s), d.w, |r, row| {
            // Input row `r` (of all planes) sums output rows `r s .. r s + s`.
            let block = &dy[r * s * ow..][..s * ow];
            for (u, out_row) in block.chunks_exact(ow).enumerate() {
                for (d, cells) in row.iter_mut().zip(out_row.chunks_exact(s)) {
                    let sum = cells.iter().fold(0f32, |a, v| a + v);
                    *d = if u == 0 { sum } else { *d + sum };
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from(&d.input())))
    }

    /// The block sum is linear; its adjoint is the up-sampling.
    fn bwd(&self, _dy: &Tensor, _dx: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Upsample(self.0))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::uniform;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_forward_and_backward() {
        for (dims, s) in [([2, 3, 4, 5], 2), ([1, 2, 3, 3], 3), ([3, 1, 1, 7], 1)] {
            let x = Var::from_tensor(&uniform(1, &dims, -1.0, 1.0)).unwrap();
            let ours = upsample_nearest(&x, s).unwrap();
            let theirs = x.upsample_nearest2d(dims[2] * s, dims[3] * s).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let (a, b) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{dims:?} x{s}");
            let r = uniform(2, ours.dims(), -1.0, 1.0);
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, b) = (
                g1.get(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                g2.get(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() <= 1e-6 * (1.0 + v.abs()),
                    "{dims:?}: {a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn block_sums_are_exact_and_nan_propagates() {
        let x = Var::from_tensor(
            &Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = upsample_nearest(&x, 2).unwrap();
        let mut r = vec![1f32; 16];
        r[0] = f32::NAN;
        let r = Tensor::from_vec(r, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g[0].is_nan());
        assert_eq!(&g[1..], &[4.0, 4.0, 4.0]);
        assert!(upsample_nearest(&x, 0).is_err());
    }
}
