//! 2-D convolution (`torch.nn.functional.conv2d` with dilation 1 and groups 1) as im2col + one
//! GEMM, so that its backward is two GEMMs and a col2im instead of candle's direct loops.
//!
//! Shapes: `x (B, C, H, W)`, `w (O, C, kh, kw)`, `b (O)`;
//! `Ho = (H + 2p - kh) / s + 1`, `Wo = (W + 2p - kw) / s + 1` (rounded down), `K = C kh kw`,
//! `N = B Ho Wo`.
//!
//! - [`im2col`] lays the receptive fields out as the columns of `cols (K, N)`:
//!   `cols[(c, i, j), (b, y, z)] = x[b, c, y s + i - p, z s + j - p]` (0 outside the image), row
//!   `(c, i, j)` stored as `c kh kw + i kw + j`, column `(b, y, z)` as `b Ho Wo + y Wo + z`.
//! - The convolution is then `w.reshape(O, K) . cols`, one `(O, K) x (K, N)` GEMM through
//!   candle's `matmul` (which calls the `gemm` crate), and one pass that adds the bias and moves
//!   `(O, B, Ho, Wo)` to `(B, O, Ho, Wo)`. The backward is matmul's: `dW = dY . cols^T` and
//!   `dcols = W^T . dY`, one GEMM each over all `N` columns, then `dx = col2im(dcols)`;
//!   `db` sums `dY` over its rows.
//! - [`col2im`] is the adjoint of `im2col` (each column entry is added back onto the pixel it was
//!   read from; entries that fell on the padding are dropped): `<im2col(x), c> = <x, col2im(c)>`
//!   for all `x`, `c`. It is `im2col`'s backward and `im2col` is its backward, so second
//!   derivatives work too. Both split their work across the rayon pool when large: im2col by
//!   rows of the columns, col2im by `(b, c)` image planes (each pixel sums its kernel offsets in
//!   a fixed order, so results do not depend on the threads).
//!
//! On devices other than the CPU, [`conv2d`] is [`conv2d_slow`] (candle's `conv2d` plus the
//! bias), which there runs candle's GPU convolution. Shapes are checked the same way everywhere.
//!
//! Measured with `RAYON_NUM_THREADS=2` on the 2-core development machine (shared with other
//! builds, so +-20%), batch 128, in ms: the forward pass, and the forward pass plus the backward
//! of `sum(conv2d(x, w, b) * r)` to all of `x`, `w` and `b` (the best of 8 interleaved runs):
//!
//! | x                 | w                | s, p | candle's conv2d | this op  |
//! |-------------------|------------------|------|-----------------|----------|
//! | (128, 32, 28, 28) | (32, 32, 3, 3)   | 1, 1 | 152 / 476       | 53 / 283 |
//! | (128, 32, 28, 28) | (64, 32, 3, 3)   | 2, 1 | 26 / 215        | 16 / 96  |
//! | (128, 64, 14, 14) | (64, 64, 3, 3)   | 1, 1 | 45 / 228        | 26 / 152 |
//! | (128, 128, 14, 14)| (64, 128, 3, 3)  | 1, 1 | 89 / 417        | 56 / 288 |
//! | (128, 1, 28, 28)  | (32, 1, 3, 3)    | 1, 1 | 7 / 86          | 2 / 43   |
//! | (128, 64, 7, 7)   | (64, 64, 3, 3)   | 1, 1 | 12 / 76         | 5 / 40   |
//! | (128, 64, 14, 14) | (32, 64, 1, 1)   | 1, 0 | 4 / 55          | 2 / 28   |
//!
//! Where the rest of the time goes, for the first row: the GEMMs take about 130 ms; the
//! remainder is memory traffic on buffers the size of `cols` (115 MB): the columns, `dcols`, and
//! candle's backward adding `dcols` onto a zeroed gradient, each in fresh pages that the kernel
//! faults in one by one. The columns are therefore advised onto transparent huge pages
//! (`HUGE_PAGE_MIN_BYTES`); that took the forward pass from 95 to 54 ms there. `dcols` and its
//! accumulation are allocated by candle's matmul and backprop, out of reach of this module.
//!
//! Layout choices, measured the same way: columns `(N, K)` with `cols . w^T` (NHWC-style) gave
//! GEMMs of about the same speed but a gathering im2col, a scattering col2im and a full transpose
//! of the output; forward + backward they were 7-36% slower than `(K, N)` on the shapes above. A
//! 1x1 convolution with stride 1 run as one GEMM per image on a view of `x` (no columns) was as
//! fast forward but about twice as slow forward + backward (its weight gradient is `B` small
//! GEMMs and a sum), so every kernel goes through the columns.
//!
//! The price is memory: the graph keeps `cols` (`K N` floats, 9x the input for a 3x3 stride-1
//! convolution) until the backward has run, where candle's own op keeps only `x`; the backward
//! makes `dcols` of the same size.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{for_rows, slice};

/// 2-D convolution as `torch.nn.functional.conv2d(x, w, b, stride, padding)` (dilation 1,
/// groups 1). `x: (B, C_in, H, W)` f32, `w: (C_out, C_in, k, k)`, `b: (C_out,)` or `None` ->
/// `(B, C_out, H_out, W_out)` with `H_out = (H + 2 padding - k) / stride + 1`.
///
/// On the CPU: [`im2col`] and one GEMM (see the module docs); elsewhere [`conv2d_slow`].
/// Rectangular kernels `(C_out, C_in, kh, kw)` are accepted too. Mismatched shapes (kernel
/// channels, bias length, an input smaller than the kernel, stride 0) are errors.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = Geometry::for_conv(x, w, b, stride, padding)?;
    if !x.device().is_cpu() {
        return conv2d_slow(x, w, b, stride, padding);
    }
    let (o, k) = (w.dim(0)?, g.rows());
    let wr = w.reshape((o, k))?;
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?;
    let y = wr.matmul(&cols)?;
    let bias = match b {
        Some(b) => b.clone(),
        None => Tensor::zeros(o, y.dtype(), y.device())?,
    };
    y.apply_op2(&bias.contiguous()?, ToNchw(g, o))
}

/// The reference composition: candle's `conv2d` plus the bias broadcast over `(B, ., H, W)`.
/// [`conv2d`] runs this on devices other than the CPU.
pub fn conv2d_slow(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    Geometry::for_conv(x, w, b, stride, padding)?;
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// The columns `(C kh kw, B Ho Wo)` of `x (B, C, H, W)` for a `kh x kw` kernel (see the module
/// docs for the layout). CPU only; differentiable (its backward is [`col2im`]).
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let g = Geometry::new("im2col", x.dims(), kh, kw, stride, padding)?;
    x.contiguous()?.apply_op1(Im2Col(g))
}

/// The adjoint of [`im2col`]: columns `(C kh kw, B Ho Wo)` summed back onto an image of shape
/// `image_dims = (B, C, H, W)`. CPU only; differentiable (its backward is [`im2col`]).
pub fn col2im(
    cols: &Tensor,
    image_dims: (usize, usize, usize, usize),
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = image_dims;
    let g = Geometry::new("col2im", &[b, c, h, w], kh, kw, stride, padding)?;
    if cols.dims() != [g.rows(), g.cols()] {
        candle_core::bail!(
            "col2im: columns {:?} for an image {:?} and a {kh}x{kw} kernel, expected {:?}",
            cols.dims(),
            [b, c, h, w],
            [g.rows(), g.cols()]
        )
    }
    cols.contiguous()?.apply_op1(Col2Im(g))
}

/// Sizes of one convolution: input `(b, c, h, w)`, kernel `kh x kw`, output `ho x wo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(op: &str, x: &[usize], kh: usize, kw: usize, stride: usize, pad: usize) -> Result<Self> {
        let &[b, c, h, w] = x else {
            candle_core::bail!("{op}: expected an input (B, C, H, W), got {x:?}")
        };
        if stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("{op}: stride {stride} and kernel {kh}x{kw} must be positive")
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "{op}: input {h}x{w} with padding {pad} is smaller than the kernel {kh}x{kw}"
            )
        }
        Ok(Geometry {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (w + 2 * pad - kw) / stride + 1,
        })
    }

    fn for_conv(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let &[o, c, kh, kw] = w.dims() else {
            candle_core::bail!(
                "conv2d: expected a kernel (C_out, C_in, kh, kw), got {:?}",
                w.dims()
            )
        };
        let g = Self::new("conv2d", x.dims(), kh, kw, stride, padding)?;
        if c != g.c {
            candle_core::bail!(
                "conv2d: kernel {:?} has {c} input channels, the input {:?} has {}",
                w.dims(),
                x.dims(),
                g.c
            )
        }
        if let Some(b) = b {
            if b.dims() != [o] {
                candle_core::bail!("conv2d: bias {:?} for {o} output channels", b.dims())
            }
        }
        Ok(g)
    }

    /// `K = c kh kw`, the rows of the columns.
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// `N = b ho wo`, the columns.
    fn cols(&self) -> usize {
        self.b * self.ho * self.wo
    }

    /// The output positions `lo..hi` (of `len_out`) whose input position `o s + k - p` lies in
    /// `0..len_in`, for kernel offset `k`.
    fn valid(&self, k: usize, len_in: usize, len_out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.pad);
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
        let hi = if len_in + p > k {
            (len_in + p - k).div_ceil(s).min(len_out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    fn check_input(&self, op: &str, dims: &[usize], want: &[usize]) -> Result<()> {
        if dims != want {
            candle_core::bail!("{op}: input {dims:?}, expected {want:?}")
        }
        Ok(())
    }
}

/// `x (B, C, H, W)` -> columns `(C kh kw, B Ho Wo)`.
struct Im2Col(Geometry);

/// Columns `(C kh kw, B Ho Wo)` -> `x (B, C, H, W)`, the adjoint of [`Im2Col`].
struct Col2Im(Geometry);

impl Geometry {
    /// The shape of the columns.
    fn cols_shape(&self) -> Shape {
        Shape::from((self.rows(), self.cols()))
    }

    /// im2col with columns (K, N): one row (c, i, j) at a time, copied from image rows.
    fn im2col(&self, x: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane) = (g.cols(), g.ho * g.wo);
        let mut cols = zeros(g.rows() * n);
        for_rows(&mut cols, n, |r, row| {
            let (c, i, j) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
            let (y_lo, y_hi) = g.valid(i, g.h, g.ho);
            let (z_lo, z_hi) = g.valid(j, g.w, g.wo);
            for (bi, dst) in row.chunks_mut(plane).enumerate() {
                let src = &x[(bi * g.c + c) * g.h * g.w..][..g.h * g.w];
                for y in y_lo..y_hi {
                    let src = &src[(y * g.stride + i - g.pad) * g.w..][..g.w];
                    let dst = &mut dst[y * g.wo..][z_lo..z_hi];
                    let first = z_lo * g.stride + j - g.pad;
                    if g.stride == 1 {
                        dst.copy_from_slice(&src[first..first + dst.len()]);
                    } else {
                        for (d, s) in dst.iter_mut().zip(src[first..].iter().step_by(g.stride)) {
                            *d = *s;
                        }
                    }
                }
            }
        });
        cols
    }

    /// col2im from columns (K, N): one (b, c) image plane at a time.
    fn col2im(&self, cols: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane) = (g.cols(), g.ho * g.wo);
        let mut x = vec![0f32; g.b * g.c * g.h * g.w];
        // The planes are disjoint, and each pixel sums its kernel offsets in the same order
        // whatever the threads.
        for_rows(&mut x, g.h * g.w, |bc, dst| {
            let (bi, c) = (bc / g.c, bc % g.c);
            for i in 0..g.kh {
                let (y_lo, y_hi) = g.valid(i, g.h, g.ho);
                for j in 0..g.kw {
                    let (z_lo, z_hi) = g.valid(j, g.w, g.wo);
                    let r = (c * g.kh + i) * g.kw + j;
                    let src = &cols[r * n + bi * plane..][..plane];
                    for y in y_lo..y_hi {
                        let dst = &mut dst[(y * g.stride + i - g.pad) * g.w..][..g.w];
                        let src = &src[y * g.wo..][z_lo..z_hi];
                        let first = z_lo * g.stride + j - g.pad;
                        if g.stride == 1 {
                            for (d, s) in dst[first..first + src.len()].iter_mut().zip(src) {
                                *d += *s;
                            }
                        } else {
                            for (d, s) in dst[first..].iter_mut().step_by(g.stride).zip(src) {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        });
        x
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "gentrain-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        g.check_input(self.name(), l.dims(), &[g.b, g.c, g.h, g.w])?;
        let x = slice(s, l, self.name())?;
        let cols = g.im2col(x);
        Ok((CpuStorage::F32(cols), g.cols_shape()))
    }

    fn bwd(&self, _x: &Tensor, _cols: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "gentrain-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        g.check_input(self.name(), l.dims(), g.cols_shape().dims())?;
        let cols = slice(s, l, self.name())?;
        let x = g.col2im(cols);
        Ok((CpuStorage::F32(x), Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _cols: &Tensor, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// The GEMM's `(O, B Ho Wo)` plus the bias -> `(B, O, Ho, Wo)`, in one pass; `usize` is `O`.
struct ToNchw(Geometry, usize);

impl CustomOp2 for ToNchw {
    fn name(&self) -> &'static str {
        "gentrain-to-nchw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, o) = (self.0, self.1);
        let plane = g.ho * g.wo;
        g.check_input(self.name(), l1.dims(), &[o, g.cols()])?;
        g.check_input(self.name(), l2.dims(), &[o])?;
        let (y, bias) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut out = vec![0f32; y.len()];
        for_rows(&mut out, plane, |row, r| {
            let (bi, oi) = (row / o, row % o);
            let b = bias[oi];
            for (d, v) in r.iter_mut().zip(&y[oi * g.cols() + bi * plane..]) {
                *d = v + b;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, o) = (self.0, self.1);
        let swap = Swap {
            outer: 1,
            a: g.b,
            b: o,
            inner: g.ho * g.wo,
        };
        let dy = grad.contiguous()?.apply_op1(swap)?.reshape((o, g.cols()))?;
        let db = if bias.track_op() {
            Some(dy.sum(1)?)
        } else {
            None
        };
        Ok((Some(dy), db))
    }
}

/// `(outer, a, b, inner)` -> `(outer, b, a, inner)`, its own inverse with `a` and `b` swapped.
struct Swap {
    outer: usize,
    a: usize,
    b: usize,
    inner: usize,
}

impl CustomOp1 for Swap {
    fn name(&self) -> &'static str {
        "gentrain-swap"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &Swap { outer, a, b, inner } = self;
        if l.shape().elem_count() != outer * a * b * inner {
            candle_core::bail!("swap: input {:?} is not {outer}x{a}x{b}x{inner}", l.dims())
        }
        let src = slice(s, l, self.name())?;
        let mut dst = vec![0f32; src.len()];
        // One output row (o, bi) of a * inner values at a time.
        for_rows(&mut dst, a * inner, |row, r| {
            let (o, bi) = (row / b, row % b);
            let base = o * a * b * inner + bi * inner;
            if inner == 1 {
                for (ai, d) in r.iter_mut().enumerate() {
                    *d = src[base + ai * b];
                }
            } else {
                for (ai, d) in r.chunks_mut(inner).enumerate() {
                    d.copy_from_slice(&src[base + ai * b * inner..][..inner]);
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((outer, b, a, inner))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let &Swap { outer, a, b, inner } = self;
        let swapped = Swap {
            outer,
            a: b,
            b: a,
            inner,
        };
        Ok(Some(
            grad.contiguous()?.apply_op1(swapped)?.reshape(x.shape())?,
        ))
    }
}

/// Buffers of this many bytes or more are mapped fresh from the kernel on every allocation (by
/// glibc's allocator, whose `mmap` threshold stops growing at 32 MiB) and first touched page by
/// page; [`zeros`] asks for transparent huge pages for them.
const HUGE_PAGE_MIN_BYTES: usize = 32 << 20;

/// `len` zeros. A large buffer is advised `MADV_HUGEPAGE` before it is written, so that the
/// kernel backs it with 2 MiB pages (where transparent huge pages are `madvise` or `always`):
/// 512 times fewer page faults. For the 115 MB of columns of a 3x3 convolution of
/// `(128, 32, 28, 28)` the faults took about 40 of the 95 ms of the forward pass.
fn zeros(len: usize) -> Vec<f32> {
    if len * std::mem::size_of::<f32>() < HUGE_PAGE_MIN_BYTES {
        return vec![0f32; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 1 << 21;
        let start = v.as_mut_ptr() as usize;
        let (lo, hi) = (
            start.div_ceil(HUGE) * HUGE,
            (start + len * std::mem::size_of::<f32>()) / HUGE * HUGE,
        );
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the allocation of `v`, none of which has been read or
            // written yet; the advice changes only how its pages are backed, never their contents
            // (and a refusal leaves ordinary pages).
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    v.resize(len, 0.0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_zeros_too() {
        for len in [
            0,
            5,
            HUGE_PAGE_MIN_BYTES / 4 - 1,
            HUGE_PAGE_MIN_BYTES / 4 + 12345,
        ] {
            let v = zeros(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| *x == 0.0));
        }
    }

    #[test]
    fn valid_ranges_cover_exactly_the_inside_positions() {
        for (len, k, s, p) in [
            (7, 3, 1, 1),
            (7, 3, 2, 1),
            (5, 3, 2, 0),
            (4, 1, 2, 0),
            (3, 3, 3, 2),
        ] {
            let g = Geometry::new("t", &[1, 1, len, len], k, k, s, p).unwrap();
            for kk in 0..k {
                let (lo, hi) = g.valid(kk, len, g.ho);
                for o in 0..g.ho {
                    let pos = (o * s + kk) as isize - p as isize;
                    let inside = pos >= 0 && pos < len as isize;
                    assert_eq!(inside, (lo..hi).contains(&o), "{len} {k} {s} {p}: {kk} {o}");
                }
            }
        }
    }
}
