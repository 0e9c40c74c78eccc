//! 2-D convolution (`torch.nn.functional.conv2d` with dilation 1 and groups 1) on the CPU as
//! one fused op: im2col of one image at a time into a per-thread scratch tile and GEMMs through
//! [`gemm_f32_on`](super::linear), with a backward of its own that recomputes the columns.
//!
//! Shapes: `x (B, C, H, W)`, `w (O, C, kh, kw)`, `b (O)`;
//! `Ho = (H + 2p - kh) / s + 1`, `Wo = (W + 2p - kw) / s + 1` (rounded down), `K = C kh kw`,
//! `P = Ho Wo`, `N = B P`.
//!
//! - [`im2col`] lays the receptive fields out as the columns of `cols (K, N)`:
//!   `cols[(c, i, j), (b, y, z)] = x[b, c, y s + i - p, z s + j - p]` (0 outside the image), row
//!   `(c, i, j)` stored as `c kh kw + i kw + j`, column `(b, y, z)` as `b Ho Wo + y Wo + z`.
//!   [`col2im`] is its adjoint (each column entry is added back onto the pixel it was read from;
//!   entries that fell on the padding are dropped): `<im2col(x), c> = <x, col2im(c)>`. Each is
//!   the other's backward. [`conv2d`] does not call them: it runs the same two maps on one
//!   image's columns `(K, P)` (or a tile of them) at a time.
//! - Forward ([`conv2d`] on the CPU, one `CustomOp3` over `x`, `w`, `b`): for each image, the
//!   output rows `y[b] (O, P)` are set to the bias and then, tile by tile (a tile is a run of
//!   output rows whose columns fit in `TILE_FLOATS`, 2 MiB: every image of the MNIST U-Net is one
//!   tile), im2col writes the tile's columns into the scratch and one GEMM
//!   `W (O, K) . cols (K, T)` adds onto `y[b]` in place, already in `(B, O, Ho, Wo)` order. A
//!   1x1 kernel with stride 1 and no padding takes the image itself as its columns (no copy).
//! - Backward: three more ops, over tensors, so candle's backprop sees only them:
//!   the input gradient (`dy`, `w`) -> `dx[b] = col2im(W^T . dy[b])`, tile by tile through the
//!   scratch; the weight gradient (`dy`, `x`) -> `dW = sum_b dy[b] . cols(x[b])^T`, with the
//!   columns recomputed by im2col; the bias gradient (`dy`) -> the sums over `(B, Ho, Wo)` (f32
//!   within a plane, f64 across). Each is computed only for the arguments that need a gradient.
//!   Each is linear in both its arguments and its own backward is made of the others (and of the
//!   forward op), so a gradient graph can be differentiated again.
//! - Threads: with at least two images per rayon thread (and enough work) the images are the
//!   rayon tasks, each image's GEMMs on its own thread; otherwise the images run one after
//!   another and each GEMM is split across the pool. Every output image and input-gradient image
//!   is computed by one task in a fixed order, and the weight gradient sums one partial sum per
//!   run of consecutive images (`WEIGHT_PARTS` runs at most, fixed by the shape) in order, so
//!   results do not depend on the threads or on rayon's scheduling.
//! - Scratch: each thread that runs a convolution keeps one buffer, at most
//!   `max(TILE_FLOATS, K Wo)` floats of the largest convolution it has run (at most 2 MiB for
//!   the MNIST U-Net; one per rayon worker and calling thread). The buffer is
//!   moved out of its thread-local slot while in use, so a convolution that rayon starts on the
//!   same thread meanwhile (while a threaded GEMM waits) allocates its own instead of sharing it;
//!   a buffer more than four times larger than both the request and a tile is dropped rather
//!   than kept for it.
//! - Memory: the graph keeps `x` and `w` (as candle's own convolution does), not the `9x` larger
//!   columns of the previous im2col + matmul composition; the backward makes no buffer of the
//!   size of the columns either. The output and `dx` buffers of 32 MiB and more are advised onto
//!   transparent huge pages (`HUGE_PAGE_MIN_BYTES`), as is [`im2col`]'s batch of columns.
//!
//! On devices other than the CPU, [`conv2d`] is [`conv2d_slow`] (candle's `conv2d` plus the
//! bias), which there runs candle's GPU convolution. Shapes are checked the same way everywhere.
//!
//! Measured with `RAYON_NUM_THREADS=2` on the 2-core development machine (AMD EPYC, Zen 5; quiet:
//! no other jobs running), batch 128, in ms: the forward pass, and the forward pass plus the
//! backward of `sum(conv2d(x, w, b) * r)` to all of `x`, `w` and `b` (the best of 16 interleaved
//! runs in two sessions). "im2col + matmul" is the previous CPU path (candle's matmul on the
//! batch's columns, which the graph kept):
//!
//! | x                 | w                | s, p | candle's conv2d | im2col + matmul | this op |
//! |-------------------|------------------|------|-----------------|-----------------|---------|
//! | (128, 32, 28, 28) | (32, 32, 3, 3)   | 1, 1 | 42 / 278        | 34 / 171        | 11 / 48 |
//! | (128, 32, 28, 28) | (64, 32, 3, 3)   | 2, 1 | 14 / 113        | 10 / 54         | 7 / 25  |
//! | (128, 64, 14, 14) | (64, 64, 3, 3)   | 1, 1 | 23 / 121        | 18 / 79         | 10 / 33 |
//! | (128, 128, 14, 14)| (64, 128, 3, 3)  | 1, 1 | 47 / 218        | 35 / 155        | 21 / 67 |
//! | (128, 1, 28, 28)  | (32, 1, 3, 3)    | 1, 1 | 4 / 59          | 2 / 15          | 1 / 9   |
//! | (128, 64, 7, 7)   | (64, 64, 3, 3)   | 1, 1 | 6 / 28          | 4 / 14          | 4 / 12  |
//! | (128, 64, 14, 14) | (32, 64, 1, 1)   | 1, 0 | 2 / 22          | 1 / 7           | 1 / 5   |
//!
//! The forward + backward column includes the loss around the convolution and candle's accumulation
//! of `dx` onto zeros (about 15-20 ms for the first row). A training step of the MNIST U-Net
//! (`configs/ddpm-mnist.toml`, `trainer bench --steps 3`) took 3.0-4.0 s with the composition and
//! 1.6-1.8 s with this op, of which the convolutions are now about a quarter (candle's sums over
//! broadcast dimensions in the backward, `sum_keepdim`, take about as much). The op's own three
//! passes (forward, input gradient, weight gradient) take about 10 ms each on the first row and
//! 19-21 ms each on the fourth: 175-197 GFLOP/s, 71-80% of a plain 1024 x 1024 x 1024 `gemm_f32` on
//! the same two threads (247 GFLOP/s, itself about 97% of two cores' AVX2 + FMA peak). The `gemm`
//! crate runs its AVX2 + FMA kernels here: its AVX-512 kernels are behind its `x86-v4` feature (off
//! by default; it builds on stable Rust 1.89 and later), with which the same 1024^3 GEMM ran at 449
//! GFLOP/s on this CPU, whose AVX-512 units are full width.
//!
//! Layout choices, measured the same way: columns `(N, K)` with `cols . w^T` (NHWC-style) gave
//! GEMMs of about the same speed but a gathering im2col, a scattering col2im and a full transpose
//! of the output. The weight gradient's partial sums are accumulated as `(K, O)`, `dW^T`: the
//! `gemm` crate writes a column-major `(O, K)` 20-40% faster than a row-major one on these
//! shapes.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::linear::{gemm_f32_on, Threads};
use super::{for_rows, map_rows, slice};

/// 2-D convolution as `torch.nn.functional.conv2d(x, w, b, stride, padding)` (dilation 1,
/// groups 1). `x: (B, C_in, H, W)` f32, `w: (C_out, C_in, k, k)`, `b: (C_out,)` or `None` ->
/// `(B, C_out, H_out, W_out)` with `H_out = (H + 2 padding - k) / stride + 1`.
///
/// On the CPU: one fused op, im2col into a per-thread scratch tile and GEMMs, with its own
/// backward (see the module docs); elsewhere [`conv2d_slow`]. Rectangular kernels
/// `(C_out, C_in, kh, kw)` are accepted too. Mismatched shapes (kernel channels, bias length, an
/// input smaller than the kernel, stride 0) are errors.
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
    let conv = Conv::new(g, w.dim(0)?);
    let bias = match b {
        Some(b) => b.contiguous()?,
        None => conv.no_bias(x)?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias, ConvForward(conv))
}

/// `torch.nn.functional.conv_transpose2d(y, w, b, stride, padding)` (output padding 0,
/// dilation 1, groups 1): `y (B, C_in, H_in, W_in)`, `w (C_in, C_out, kh, kw)` (PyTorch's
/// `ConvTranspose2d` layout), `b (C_out)`, output `(B, C_out, H, W)` with
/// `H = (H_in - 1) stride - 2 padding + kh` (and `W` alike).
///
/// A transposed convolution is the input gradient of the convolution `conv2d(x, w, stride,
/// padding)` from `(B, C_out, H, W)` to `(B, C_in, H_in, W_in)`, so on the CPU it is that op
/// ([`conv2d`]'s backward, `col2im(W^T . y)` image by image), differentiable in `y` and `w`,
/// twice too; the bias is added after. Elsewhere [`conv_transpose2d_slow`]. Mismatched
/// channels or bias length, stride 0, or a padding larger than the output allows are errors.
pub fn conv_transpose2d(
    y: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let conv = transposed_geometry(y, w, b, stride, padding)?;
    if !y.device().is_cpu() {
        return conv_transpose2d_slow(y, w, b, stride, padding);
    }
    let x = y
        .contiguous()?
        .apply_op2(&w.contiguous()?, ConvInputGrad(conv))?;
    add_channel_bias(x, b)
}

/// The reference composition of [`conv_transpose2d`]: candle's `conv_transpose2d` plus the bias
/// broadcast over `(B, ., H, W)`.
pub fn conv_transpose2d_slow(
    y: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    transposed_geometry(y, w, b, stride, padding)?;
    add_channel_bias(y.conv_transpose2d(w, padding, 0, stride, 1)?, b)
}

/// The forward convolution whose input gradient is the transposed convolution of `y` by `w`
/// (see [`conv_transpose2d`]), with its shapes checked.
fn transposed_geometry(
    y: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Conv> {
    let op = "conv_transpose2d";
    let (&[bs, ci, hi, wi], &[wci, co, kh, kw]) = (y.dims(), w.dims()) else {
        candle_core::bail!(
            "{op}: expected an input (B, C_in, H, W) and a kernel (C_in, C_out, kh, kw), got {:?} and {:?}",
            y.dims(),
            w.dims()
        )
    };
    if wci != ci || b.is_some_and(|b| b.dims() != [co]) || stride == 0 || hi == 0 || wi == 0 {
        candle_core::bail!(
            "{op}: input {:?}, kernel {:?}, bias {:?}, stride {stride} do not fit",
            y.dims(),
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )
    }
    let out = |n: usize, k: usize| ((n - 1) * stride + k).checked_sub(2 * padding);
    let (Some(h), Some(wd)) = (out(hi, kh), out(wi, kw)) else {
        candle_core::bail!(
            "{op}: padding {padding} exceeds the output of {:?}",
            y.dims()
        )
    };
    // With output padding 0 the forward convolution maps H back to H_in exactly.
    let g = Geometry::new(op, &[bs, co, h, wd], kh, kw, stride, padding)?;
    debug_assert_eq!((g.ho, g.wo), (hi, wi));
    Ok(Conv::new(g, ci))
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
    add_channel_bias(x.conv2d(w, padding, stride, 1, 1)?, b)
}

/// `y (B, C, H, W)` plus the bias `b (C)` of each channel, if any.
fn add_channel_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
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
        self.b * self.plane()
    }

    /// `ho wo`, the output positions of one image.
    fn plane(&self) -> usize {
        self.ho * self.wo
    }

    /// `c h w`, the values of one input image.
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1x1 kernel with stride 1 and no padding: the columns of an image are the image.
    fn identity(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
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

    /// The shape of the columns.
    fn cols_shape(&self) -> Shape {
        Shape::from((self.rows(), self.cols()))
    }

    /// Row `r = (c, i, j)` of the columns of one image `x_b (C, H, W)`, for the output rows
    /// `y0..y1`: `dst[(y - y0) Wo + z] = x_b[c, y s + i - p, z s + j - p]`, 0 on the padding.
    /// Every entry of `dst` (`(y1 - y0) Wo` of them) is written.
    fn fill_row(&self, x_b: &[f32], r: usize, y0: usize, y1: usize, dst: &mut [f32]) {
        let g = self;
        let (c, i, j) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
        let (y_lo, y_hi) = g.valid(i, g.h, g.ho);
        let (z_lo, z_hi) = g.valid(j, g.w, g.wo);
        let src = &x_b[c * g.h * g.w..][..g.h * g.w];
        for (y, dst) in (y0..y1).zip(dst.chunks_exact_mut(g.wo)) {
            if y < y_lo || y >= y_hi || z_lo == z_hi {
                dst.fill(0.0);
                continue;
            }
            dst[..z_lo].fill(0.0);
            dst[z_hi..].fill(0.0);
            let src = &src[(y * g.stride + i - g.pad) * g.w..][..g.w];
            let dst = &mut dst[z_lo..z_hi];
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

    /// The adjoint of [`Geometry::fill_row`]: adds `src` (row `r = (c, i, j)` of the columns
    /// for the output rows `y0..y1`) onto the input plane `dst = x_b[c] (H, W)`, dropping the
    /// entries that fell on the padding.
    fn add_row(&self, src: &[f32], r: usize, y0: usize, y1: usize, dst: &mut [f32]) {
        let g = self;
        let (i, j) = (r / g.kw % g.kh, r % g.kw);
        let (y_lo, y_hi) = g.valid(i, g.h, g.ho);
        let (z_lo, z_hi) = g.valid(j, g.w, g.wo);
        if z_lo == z_hi {
            return;
        }
        let first = z_lo * g.stride + j - g.pad;
        for y in y0.max(y_lo)..y1.min(y_hi) {
            let dst = &mut dst[(y * g.stride + i - g.pad) * g.w..][..g.w];
            let src = &src[(y - y0) * g.wo..][z_lo..z_hi];
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

    /// The columns `(K, (y1 - y0) Wo)` of output rows `y0..y1` of one image into `dst`.
    fn im2col_tile(&self, x_b: &[f32], y0: usize, y1: usize, dst: &mut [f32]) {
        let t = (y1 - y0) * self.wo;
        for (r, row) in dst.chunks_exact_mut(t).enumerate() {
            self.fill_row(x_b, r, y0, y1, row);
        }
    }

    /// The adjoint of [`Geometry::im2col_tile`]: the columns `(K, (y1 - y0) Wo)` of output rows
    /// `y0..y1` added onto one image `dx_b (C, H, W)`, row by row (so each pixel sums its kernel
    /// offsets in the order `(i, j)`).
    fn col2im_tile(&self, cols: &[f32], y0: usize, y1: usize, dx_b: &mut [f32]) {
        let (t, hw) = ((y1 - y0) * self.wo, self.h * self.w);
        for (r, src) in cols.chunks_exact(t).enumerate() {
            let c = r / (self.kh * self.kw);
            self.add_row(src, r, y0, y1, &mut dx_b[c * hw..][..hw]);
        }
    }

    /// im2col of the whole batch into columns `(K, N)`, in parallel over the rows `(c, i, j)`.
    fn im2col(&self, x: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane, img) = (g.cols(), g.plane(), g.image());
        let mut cols = zeros(g.rows() * n);
        for_rows(&mut cols, n, |r, row| {
            for (bi, dst) in row.chunks_mut(plane).enumerate() {
                g.fill_row(&x[bi * img..][..img], r, 0, g.ho, dst);
            }
        });
        cols
    }

    /// col2im of the columns `(K, N)` of the whole batch, in parallel over the `(b, c)` image
    /// planes (each pixel sums its kernel offsets in the same order whatever the threads).
    fn col2im(&self, cols: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane) = (g.cols(), g.plane());
        let mut x = zeros(g.b * g.image());
        for_rows(&mut x, g.h * g.w, |bc, dst| {
            let (bi, c) = (bc / g.c, bc % g.c);
            for r in c * g.kh * g.kw..(c + 1) * g.kh * g.kw {
                g.add_row(&cols[r * n + bi * plane..][..plane], r, 0, g.ho, dst);
            }
        });
        x
    }
}

/// `x (B, C, H, W)` -> columns `(C kh kw, B Ho Wo)`.
struct Im2Col(Geometry);

/// Columns `(C kh kw, B Ho Wo)` -> `x (B, C, H, W)`, the adjoint of [`Im2Col`].
struct Col2Im(Geometry);

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

/// The scratch tile holds at most this many floats (2 MiB), unless one output row of columns,
/// `K Wo`, is larger still. It holds one image's columns for every convolution of the MNIST
/// U-Net (the largest, 64 -> 32 channels at 28 x 28, has 451,584). Tiles of 2^16 to 2^20 floats
/// took within 10% of each other on those shapes, this size the least.
const TILE_FLOATS: usize = 1 << 19;

/// At most this many partial weight gradients (`O K` floats each) are summed at the end of the
/// weight gradient; the images are split into that many runs of consecutive images.
const WEIGHT_PARTS: usize = 8;

/// The partial weight gradients hold at most this many floats together (16 MiB).
const WEIGHT_PARTS_FLOATS: usize = 1 << 22;

/// One convolution on the CPU: its geometry, `o` output channels, and the columns of at most
/// `tile_floats` floats that its GEMMs take at a time (tests make tiles small).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conv {
    g: Geometry,
    o: usize,
    tile_floats: usize,
}

impl Conv {
    fn new(g: Geometry, o: usize) -> Self {
        Conv {
            g,
            o,
            tile_floats: TILE_FLOATS,
        }
    }

    fn x_dims(&self) -> [usize; 4] {
        [self.g.b, self.g.c, self.g.h, self.g.w]
    }

    fn w_dims(&self) -> [usize; 4] {
        [self.o, self.g.c, self.g.kh, self.g.kw]
    }

    fn y_dims(&self) -> [usize; 4] {
        [self.g.b, self.o, self.g.ho, self.g.wo]
    }

    /// The zero bias of a convolution without one.
    fn no_bias(&self, like: &Tensor) -> Result<Tensor> {
        Tensor::zeros(self.o, like.dtype(), like.device())
    }

    /// The output rows `y0..y1` of each tile, in order.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let g = self.g;
        let rows = (self.tile_floats / (g.rows() * g.wo).max(1)).clamp(1, g.ho);
        (0..g.ho)
            .step_by(rows)
            .map(move |y0| (y0, (y0 + rows).min(g.ho)))
    }

    /// Whether the images go to the rayon pool one task each (their GEMMs then run on the task's
    /// thread): with at least two images per thread and enough work to pay for the tasks.
    /// Otherwise the images run one after another, their GEMMs split across the pool.
    fn images_in_parallel(&self) -> bool {
        let pool = rayon::current_num_threads();
        let g = self.g;
        pool > 1 && g.b >= 2 * pool && g.b * self.o * g.rows() * g.plane() >= 1 << 20
    }

    /// `f(b, out_b, threads)` for each image `b`, where `out_b` is its `per` values of `out`.
    fn per_image(
        &self,
        out: &mut [f32],
        per: usize,
        f: impl Fn(usize, &mut [f32], Threads) + Sync,
    ) {
        if per == 0 {
            return;
        }
        if self.images_in_parallel() {
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(bi, out_b)| f(bi, out_b, Threads::One));
        } else {
            for (bi, out_b) in out.chunks_mut(per).enumerate() {
                f(bi, out_b, Threads::Pool)
            }
        }
    }

    /// The columns `(K, (y1 - y0) Wo)` of output rows `y0..y1` of one image `x_b`, and their row
    /// stride: for a 1x1 kernel with stride 1 and no padding a view of `x_b` itself, otherwise
    /// written into the scratch.
    fn columns<'a>(
        &self,
        x_b: &'a [f32],
        y0: usize,
        y1: usize,
        scratch: &'a mut Scratch,
    ) -> (&'a [f32], usize) {
        let g = self.g;
        if g.identity() {
            return (&x_b[y0 * g.wo..], g.plane());
        }
        let t = (y1 - y0) * g.wo;
        let cols = scratch.get(g.rows() * t);
        g.im2col_tile(x_b, y0, y1, cols);
        (cols, t)
    }

    /// `y[b] = bias + W . cols(x[b])`, written straight into `(B, O, Ho, Wo)`.
    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let (g, o) = (self.g, self.o);
        let (k, p, img) = (g.rows(), g.plane(), g.image());
        let mut y = zeros(g.b * o * p);
        self.per_image(&mut y, o * p, |bi, y_b, threads| {
            for (row, b) in y_b.chunks_exact_mut(p).zip(bias) {
                row.fill(*b);
            }
            let x_b = &x[bi * img..][..img];
            let mut scratch = Scratch::take();
            for (y0, y1) in self.tiles() {
                let t = (y1 - y0) * g.wo;
                let (cols, cols_rs) = self.columns(x_b, y0, y1, &mut scratch);
                let dst = &mut y_b[y0 * g.wo..];
                gemm_f32_on(threads, o, t, k, dst, p, true, w, k, 1, cols, cols_rs, 1);
            }
        });
        y
    }

    /// `dx[b] = col2im(W^T . dy[b])`.
    fn input_grad(&self, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (g, o) = (self.g, self.o);
        let (k, p, img) = (g.rows(), g.plane(), g.image());
        let mut dx = zeros(g.b * img);
        self.per_image(&mut dx, img, |bi, dx_b, threads| {
            let dy_b = &dy[bi * o * p..][..o * p];
            let mut scratch = Scratch::take();
            for (y0, y1) in self.tiles() {
                let t = (y1 - y0) * g.wo;
                let dy_t = &dy_b[y0 * g.wo..];
                if g.identity() {
                    let dst = &mut dx_b[y0 * g.wo..];
                    gemm_f32_on(threads, k, t, o, dst, p, false, w, 1, k, dy_t, p, 1);
                } else {
                    let dcols = scratch.get(k * t);
                    gemm_f32_on(threads, k, t, o, dcols, t, false, w, 1, k, dy_t, p, 1);
                    g.col2im_tile(dcols, y0, y1, dx_b);
                }
            }
        });
        dx
    }

    /// `dW = sum_b dy[b] . cols(x[b])^T`. Each run of consecutive images accumulates its own
    /// partial sum, transposed (`(K, O)`: the `gemm` crate writes a column-major `(O, K)`
    /// about 20-40% faster than a row-major one on these shapes), in parallel over the runs; the
    /// partial sums are then added in order, so the result does not depend on the threads.
    fn weight_grad(&self, dy: &[f32], x: &[f32]) -> Vec<f32> {
        let (g, o) = (self.g, self.o);
        let (k, p, img, ok) = (g.rows(), g.plane(), g.image(), self.o * g.rows());
        let mut dw = vec![0f32; ok];
        if ok == 0 {
            return dw;
        }
        let max_parts = WEIGHT_PARTS.min(WEIGHT_PARTS_FLOATS / ok).max(1);
        let per_part = g.b.div_ceil(max_parts).max(1);
        let parts = g.b.div_ceil(per_part).max(1);
        let mut partial = zeros(parts * ok);
        let run = |part: usize, acc: &mut [f32], threads: Threads| {
            let mut scratch = Scratch::take();
            for bi in part * per_part..((part + 1) * per_part).min(g.b) {
                let (x_b, dy_b) = (&x[bi * img..][..img], &dy[bi * o * p..][..o * p]);
                for (y0, y1) in self.tiles() {
                    let t = (y1 - y0) * g.wo;
                    let (cols, cols_rs) = self.columns(x_b, y0, y1, &mut scratch);
                    let dy_t = &dy_b[y0 * g.wo..];
                    gemm_f32_on(threads, k, o, t, acc, o, true, cols, cols_rs, 1, dy_t, 1, p);
                }
            }
        };
        if parts > 1 && self.images_in_parallel() {
            partial
                .par_chunks_mut(ok)
                .enumerate()
                .for_each(|(part, acc)| run(part, acc, Threads::One));
        } else {
            for (part, acc) in partial.chunks_mut(ok).enumerate() {
                run(part, acc, Threads::Pool);
            }
        }
        for part in partial.chunks_exact(ok) {
            for (ki, row) in part.chunks_exact(o).enumerate() {
                for (oi, v) in row.iter().enumerate() {
                    dw[oi * k + ki] += *v;
                }
            }
        }
        dw
    }

    /// `db[o] = sum_{b, y, z} dy[b, o, y, z]`: per `(b, o)` plane in f32 with eight
    /// accumulators, the planes summed in f64.
    fn bias_grad(&self, dy: &[f32]) -> Vec<f32> {
        let (g, o, p) = (self.g, self.o, self.g.plane());
        map_rows(o, g.b * p, |oi| {
            let total: f64 = (0..g.b)
                .map(|bi| sum_f32(&dy[(bi * o + oi) * p..][..p]) as f64)
                .sum();
            total as f32
        })
    }
}

/// A sum over eight interleaved accumulators (which the compiler vectorizes).
fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

thread_local! {
    /// This thread's scratch tile for the convolution's columns (or their gradient).
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// This thread's scratch buffer, moved out of its slot for as long as the guard lives and moved
/// back when it drops. A convolution that starts on the same thread meanwhile (rayon can run
/// another task on a thread that waits inside a threaded GEMM) finds the slot empty and
/// allocates its own buffer, so two users never share one; of the two, the larger is kept.
///
/// Bound: one buffer per thread that has run a convolution (the caller's and the rayon
/// workers'), of at most `max(TILE_FLOATS, K Wo)` floats of the largest convolution that
/// thread has run (at most 2 MiB for the MNIST U-Net). A buffer more than four times larger
/// than both the request and `TILE_FLOATS` is freed and a buffer of the request's size taken
/// instead, so one convolution with huge rows does not pin its tile forever.
struct Scratch(Vec<f32>);

impl Scratch {
    fn take() -> Self {
        Scratch(SCRATCH.take())
    }

    /// `len` floats of scratch, holding whatever they held before (every user writes all of
    /// them before reading).
    fn get(&mut self, len: usize) -> &mut [f32] {
        if self.0.capacity() > 4 * len.max(TILE_FLOATS) {
            self.0 = Vec::new();
        }
        if self.0.len() < len {
            self.0.resize(len, 0.0);
        }
        &mut self.0[..len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut self.0);
        let other = SCRATCH.take();
        SCRATCH.set(if mine.capacity() >= other.capacity() {
            mine
        } else {
            other
        });
    }
}

/// `conv2d(x, w, b)`: arguments `x (B, C, H, W)`, `w (O, C, kh, kw)`, `b (O)`.
struct ConvForward(Conv);

/// The input gradient `col2im(W^T . dy)`: arguments `dy (B, O, Ho, Wo)`, `w (O, C, kh, kw)`.
struct ConvInputGrad(Conv);

/// The weight gradient `dy . cols(x)^T`: arguments `dy (B, O, Ho, Wo)`, `x (B, C, H, W)`.
struct ConvWeightGrad(Conv);

/// The bias gradient, `dy (B, O, Ho, Wo)` summed over all but `O`.
struct BiasGrad(Conv);

impl CustomOp3 for ConvForward {
    fn name(&self) -> &'static str {
        "gentrain-conv2d"
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
        let c = self.0;
        c.g.check_input(self.name(), l1.dims(), &c.x_dims())?;
        c.g.check_input(self.name(), l2.dims(), &c.w_dims())?;
        c.g.check_input(self.name(), l3.dims(), &[c.o])?;
        let (x, w, b) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        Ok((
            CpuStorage::F32(c.forward(x, w, b)),
            Shape::from(&c.y_dims()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.0;
        let dy = grad.contiguous()?;
        let dx = match x.track_op() {
            true => Some(dy.apply_op2(w, ConvInputGrad(c))?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(dy.apply_op2(x, ConvWeightGrad(c))?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(dy.apply_op1(BiasGrad(c))?),
            false => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "gentrain-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        c.g.check_input(self.name(), l1.dims(), &c.y_dims())?;
        c.g.check_input(self.name(), l2.dims(), &c.w_dims())?;
        let (dy, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        Ok((
            CpuStorage::F32(c.input_grad(dy, w)),
            Shape::from(&c.x_dims()),
        ))
    }

    /// Linear in both arguments: for the cotangent `u` of `dx`,
    /// `d dy = conv2d(u, w)` and `d w = dy . cols(u)^T`.
    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _dx: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = self.0;
        let u = grad.contiguous()?;
        let d_dy = match dy.track_op() {
            true => Some(u.apply_op3(w, &c.no_bias(&u)?, ConvForward(c))?),
            false => None,
        };
        let d_w = match w.track_op() {
            true => Some(dy.apply_op2(&u, ConvWeightGrad(c))?),
            false => None,
        };
        Ok((d_dy, d_w))
    }
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "gentrain-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        c.g.check_input(self.name(), l1.dims(), &c.y_dims())?;
        c.g.check_input(self.name(), l2.dims(), &c.x_dims())?;
        let (dy, x) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        Ok((
            CpuStorage::F32(c.weight_grad(dy, x)),
            Shape::from(&c.w_dims()),
        ))
    }

    /// Linear in both arguments: for the cotangent `v` of `dW`,
    /// `d dy = conv2d(x, v)` and `d x = col2im(v^T . dy)`.
    fn bwd(
        &self,
        dy: &Tensor,
        x: &Tensor,
        _dw: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = self.0;
        let v = grad.contiguous()?;
        let d_dy = match dy.track_op() {
            true => Some(x.apply_op3(&v, &c.no_bias(&v)?, ConvForward(c))?),
            false => None,
        };
        let d_x = match x.track_op() {
            true => Some(dy.apply_op2(&v, ConvInputGrad(c))?),
            false => None,
        };
        Ok((d_dy, d_x))
    }
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "gentrain-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.0;
        c.g.check_input(self.name(), l.dims(), &c.y_dims())?;
        let dy = slice(s, l, self.name())?;
        Ok((CpuStorage::F32(c.bias_grad(dy)), Shape::from(c.o)))
    }

    fn bwd(&self, dy: &Tensor, _db: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let o = self.0.o;
        Ok(Some(grad.reshape((1, o, 1, 1))?.broadcast_as(dy.shape())?))
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
    use crate::ops::testing::{rel_err, uniform};
    use candle_core::Var;

    fn conv(x: &[usize], o: usize, k: usize, stride: usize, pad: usize) -> Conv {
        Conv::new(Geometry::new("t", x, k, k, stride, pad).unwrap(), o)
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `dy (B, O, Ho, Wo)` as the columns' gradient `(O, B Ho Wo)`.
    fn dy_cols(c: &Conv, dy: &Tensor) -> Tensor {
        dy.permute((1, 0, 2, 3))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((c.o, c.g.cols()))
            .unwrap()
    }

    #[test]
    fn the_gradient_ops_differentiate_like_their_compositions() {
        // Each gradient op is linear in both its arguments, and its backward is the other ops:
        // checked against im2col / col2im and candle's matmul on the same values.
        for (n, c) in [
            conv(&[2, 3, 7, 6], 4, 3, 2, 1),
            conv(&[1, 2, 6, 6], 3, 3, 1, 1),
            conv(&[2, 4, 5, 5], 3, 1, 1, 0),
            conv(&[2, 2, 5, 4], 2, 2, 3, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let g = c.g;
            let seed = 40 * n as u64;
            let dy = Var::from_tensor(&uniform(seed, &c.y_dims(), -1.0, 1.0)).unwrap();
            let w = Var::from_tensor(&uniform(seed + 1, &c.w_dims(), -1.0, 1.0)).unwrap();
            let x = Var::from_tensor(&uniform(seed + 2, &c.x_dims(), -1.0, 1.0)).unwrap();
            let u = uniform(seed + 3, &c.x_dims(), -1.0, 1.0);
            let v = uniform(seed + 4, &c.w_dims(), -1.0, 1.0);
            let vb = uniform(seed + 5, &[c.o], -1.0, 1.0);
            let wr = w.reshape((c.o, g.rows())).unwrap();
            let dims = (g.b, g.c, g.h, g.w);
            let (k, s, p) = (g.kh, g.stride, g.pad);

            let dx = dy.apply_op2(&w, ConvInputGrad(c)).unwrap();
            let dx_ref = col2im(
                &wr.t().unwrap().matmul(&dy_cols(&c, &dy)).unwrap(),
                dims,
                k,
                k,
                s,
                p,
            )
            .unwrap();
            let dw = dy.apply_op2(&x, ConvWeightGrad(c)).unwrap();
            let dw_ref = dy_cols(&c, &dy)
                .matmul(&im2col(&x, k, k, s, p).unwrap().t().unwrap())
                .unwrap()
                .reshape(v.shape())
                .unwrap();
            let db = dy.apply_op1(BiasGrad(c)).unwrap();
            let db_ref = dy.sum((0, 2, 3)).unwrap();
            for (name, ours, theirs, cot, vars) in [
                ("dx", &dx, &dx_ref, &u, [&dy, &w]),
                ("dw", &dw, &dw_ref, &v, [&dy, &x]),
                ("db", &db, &db_ref, &vb, [&dy, &dy]),
            ] {
                assert!(rel_err(ours, theirs) < 1e-5, "{c:?} {name}");
                let go = (ours * cot).unwrap().sum_all().unwrap().backward().unwrap();
                let gt = (theirs * cot)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for var in vars {
                    let (a, b) = (
                        go.get(var.as_tensor()).unwrap(),
                        gt.get(var.as_tensor()).unwrap(),
                    );
                    assert_eq!(a.dims(), var.dims());
                    assert!(rel_err(a, b) < 1e-5, "{c:?} d {name} / d {:?}", var.dims());
                }
            }
        }
    }

    #[test]
    fn tiles_of_one_output_row_give_the_same_results() {
        for c in [
            conv(&[3, 5, 9, 7], 4, 3, 1, 1),
            conv(&[2, 3, 11, 8], 5, 3, 2, 1),
            conv(&[2, 4, 6, 5], 3, 1, 1, 0),
            conv(&[2, 3, 7, 7], 2, 2, 3, 2),
        ] {
            let rows = Conv {
                tile_floats: 1,
                ..c
            };
            assert_eq!(rows.tiles().count(), c.g.ho);
            assert_eq!(c.tiles().collect::<Vec<_>>(), [(0, c.g.ho)]);
            let x = flat(&uniform(1, &c.x_dims(), -1.0, 1.0));
            let w = flat(&uniform(2, &c.w_dims(), -1.0, 1.0));
            let bias = flat(&uniform(3, &[c.o], -1.0, 1.0));
            let dy = flat(&uniform(4, &c.y_dims(), -1.0, 1.0));
            let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
                assert_eq!(a.len(), b.len());
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{c:?} {what}[{i}]");
                }
            };
            close(rows.forward(&x, &w, &bias), c.forward(&x, &w, &bias), "y");
            close(rows.input_grad(&dy, &w), c.input_grad(&dy, &w), "dx");
            close(rows.weight_grad(&dy, &x), c.weight_grad(&dy, &x), "dw");
        }
    }

    #[test]
    fn a_scratch_taken_while_another_is_held_is_a_buffer_of_its_own() {
        let mut outer = Scratch::take();
        outer.get(100).fill(1.0);
        {
            let mut inner = Scratch::take();
            let buf = inner.get(300);
            assert!(buf.iter().all(|v| *v == 0.0), "a fresh buffer");
            buf.fill(2.0);
        }
        assert!(outer.get(100).iter().all(|v| *v == 1.0));
        drop(outer);
        // The larger of the two stayed in the slot.
        let mut again = Scratch::take();
        assert!(again.0.capacity() >= 300);
        assert_eq!(again.get(300)[299], 2.0);
        // A buffer far larger than the request and than a tile is not kept for it.
        again.0 = vec![0.0; 5 * TILE_FLOATS];
        assert!(again.get(10).len() == 10 && again.0.capacity() < 5 * TILE_FLOATS);
    }

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
