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
//! - Columns of a tile are made one of two ways (`Geometry::gathers`): row by row (contiguous
//!   copies of whole output rows, for stride 1 and rows of 16 or more) or through a gather map
//!   made once per op (for each kernel offset and output position, the input pixel read, or a
//!   zero past the plane for the padding), one loop over `kh kw t` entries per channel with no
//!   per-row bookkeeping. Its adjoint gathers through the inverse map, slot by slot over the
//!   plane. Both give the same columns and the same sums in the same order (a test checks them
//!   equal). On the SN-DCGAN's 4x4 / stride-2 layers (rows of 7 and 14) the row copies and their
//!   bookkeeping were about a quarter of a training step; those layers now take channels-last
//!   columns (below) except the one-channel first and last ones, which still gather.
//! - Stride-1 convolutions with output rows of 12 or more (and `kw C >= 16`; neither a 1x1
//!   kernel without padding nor those taken by channels-last columns, below) make no columns at
//!   all: `shifted` runs them as `kh` GEMMs of depth `kw C` over `kw` shifted copies of the
//!   zero-padded image, whose right operands are strided views that the `gemm` crate reads in
//!   place (forward, input gradient and weight gradient alike). On the MNIST U-Net this took a
//!   training step from 520 to 466 ms (`trainer bench --config configs/ddpm-mnist.toml`); see
//!   `shifted`'s module doc for the layout and `examples/conv_layers.rs` for per-layer times.
//! - Convolutions with 16 or more input channels and a stride above 1 or output rows of at most
//!   15 (other than a 1x1 kernel with stride 1 and no padding) run on channels-last columns
//!   (`channels_last`), as do the gradients of shifted convolutions whose operand holds a NaN or
//!   an infinity (the shifted GEMMs' extra columns would multiply it by zeros): each image is transposed to `(H W, C)`,
//!   so a receptive field's kernel row is one run of `kw C` values, and one GEMM takes several
//!   images (`n P` rows, about 400 on the U-Net's 7x7 and 14x14 planes) instead of one image of
//!   49 columns. On the MNIST U-Net this took a training step from about 355 to 316 ms, and the
//!   SN-DCGAN step from 10.2 to 8.0 ms (`trainer bench`, alternating binaries).
//! - [`conv2d_act`] applies an activation in the forward op (image by image, in cache) and takes
//!   `g act'(y)` from the output in the backward; [`conv_transpose2d_act`] adds the bias and the
//!   activation in one op ([`channel_bias_act`]). candle's LeakyReLU composition and broadcast
//!   bias (with its reduction in the backward) were about a fifth of that step.
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
//!   `max(TILE_FLOATS, K Wo)` floats of the largest convolution it has run on columns, and
//!   `H W C + n P (K + O)` on channels-last columns, which are not split into tiles (`n`, the
//!   images per GEMM, is 1 on planes of more than 256 outputs, so this is one image's columns:
//!   about 2 MiB for the MNIST U-Net, but 57 MB for a 16-channel 512 x 512 image at stride 2; one
//!   buffer per rayon worker and calling thread). The buffer is
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

use super::linear::{gemm_f32_on, Activation, ActivationBackward, Threads};
use super::transpose::transpose_into;
use super::{all_finite, filled, for_rows, map_rows, rows_filled, slice, zeros};

mod channels_last;
mod shifted;

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
    conv2d_act(x, w, b, stride, padding, Activation::Identity)
}

/// `act(conv2d(x, w, b, stride, padding))`, shapes as [`conv2d`]. On the CPU the activation is
/// applied in the same op, image by image while its output is in cache, and the backward takes
/// `g act'(y)` from the output `y` (the activation's derivative is treated as constant, as for
/// [`super::linear::linear`]: a gradient of this gradient does not pass through it). Elsewhere
/// [`conv2d_slow`] then [`Activation::apply_slow`].
pub fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    act: Activation,
) -> Result<Tensor> {
    let g = Geometry::for_conv(x, w, b, stride, padding)?;
    if !x.device().is_cpu() {
        return act.apply_slow(&conv2d_slow(x, w, b, stride, padding)?);
    }
    let conv = Conv::new(g, w.dim(0)?);
    let bias = match b {
        Some(b) => b.contiguous()?,
        None => conv.no_bias(x)?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias, ConvForward(conv, act))
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
    conv_transpose2d_act(y, w, b, stride, padding, Activation::Identity)
}

/// `act(conv_transpose2d(y, w, b, stride, padding))`, shapes as [`conv_transpose2d`]. On the CPU
/// the bias and the activation are one op over the output ([`channel_bias_act`]); elsewhere
/// [`conv_transpose2d_slow`] then [`Activation::apply_slow`].
pub fn conv_transpose2d_act(
    y: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    act: Activation,
) -> Result<Tensor> {
    let conv = transposed_geometry(y, w, b, stride, padding)?;
    if !y.device().is_cpu() {
        return act.apply_slow(&conv_transpose2d_slow(y, w, b, stride, padding)?);
    }
    let x = y
        .contiguous()?
        .apply_op2(&w.contiguous()?, ConvInputGrad(conv))?;
    match (b, act) {
        (None, Activation::Identity) => Ok(x),
        (Some(b), act) => channel_bias_act(&x, b, act),
        (None, act) => channel_bias_act(&x, &Tensor::zeros(conv.g.c, x.dtype(), x.device())?, act),
    }
}

/// `act(x + b[c])` for `x (B, C, H, W)` and `b (C)`: a channel bias and an activation as one op
/// on the CPU, with the backward `g act'(out)` (the activation's derivative from the output,
/// treated as constant as in [`conv2d_act`]) and the bias gradient summed over `(B, H, W)` (f32
/// within a plane, f64 across). Elsewhere the broadcast add then [`Activation::apply_slow`]. A
/// bias whose length is not `C`, or an `x` that is not 4-D, is an error.
pub fn channel_bias_act(x: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    let &[bs, c, h, w] = x.dims() else {
        candle_core::bail!(
            "channel_bias_act: expected (B, C, H, W), got {:?}",
            x.dims()
        )
    };
    if b.dims() != [c] {
        candle_core::bail!("channel_bias_act: bias {:?} for {c} channels", b.dims())
    }
    if !x.device().is_cpu() {
        return act.apply_slow(&add_channel_bias(x.clone(), Some(b))?);
    }
    // The bias gradient is [`BiasGrad`] of a convolution with this output: a 1x1 one.
    let g = Geometry::new("channel_bias_act", &[bs, c, h, w], 1, 1, 1, 0)?;
    x.contiguous()?
        .apply_op2(&b.contiguous()?, ChannelBiasAct(Conv::new(g, c), act))
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

/// Where one kernel offset `(i, j)` of a [`Geometry`] reads from: the output rows
/// `y_lo..y_hi` and columns `z_lo..z_hi` whose input position lies inside the image (the rest
/// read padding), and `first = z_lo s + j - p`, the input column of output column `z_lo`.
#[derive(Clone, Copy, Debug)]
struct Offset {
    i: usize,
    y_lo: usize,
    y_hi: usize,
    z_lo: usize,
    z_hi: usize,
    first: usize,
}

/// No entry, in an inverse gather map ([`Geometry::inverse_map`]).
const NONE: u32 = u32::MAX;

/// `to[t] = from[S t]` for every `t` (`from` holds `(to.len() - 1) S + 1` values).
#[inline]
fn gather<const S: usize>(from: &[f32], to: &mut [f32]) {
    for (t, d) in to.iter_mut().enumerate() {
        *d = from[S * t];
    }
}

/// `to[S t] += from[t]` for every `t` (`to` holds `(from.len() - 1) S + 1` values).
#[inline]
fn scatter_add<const S: usize>(from: &[f32], to: &mut [f32]) {
    for (t, v) in from.iter().enumerate() {
        to[S * t] += *v;
    }
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
        if h.checked_mul(w).is_none_or(|hw| hw >= u32::MAX as usize) {
            candle_core::bail!("{op}: an input plane of {h}x{w} values is too large (2^32 at most)")
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

    /// Where kernel offset `(i, j)` reads: [`Offset`] of `(i, j)`.
    fn offset(&self, i: usize, j: usize) -> Offset {
        let (y_lo, y_hi) = self.valid(i, self.h, self.ho);
        let (z_lo, z_hi) = self.valid(j, self.w, self.wo);
        // `first` is only read when `z_lo < z_hi`, where `z_lo s + j >= p`.
        let first = (z_lo * self.stride + j).saturating_sub(self.pad);
        Offset {
            i,
            y_lo,
            y_hi,
            z_lo,
            z_hi,
            first,
        }
    }

    /// The [`Offset`] of every kernel offset, in row order `i kw + j`.
    fn offsets(&self) -> Vec<Offset> {
        (0..self.kh * self.kw)
            .map(|r| self.offset(r / self.kw, r % self.kw))
            .collect()
    }

    /// Row `(c, i, j)` of the columns of one input plane `src = x_b[c] (H, W)`, for the output
    /// rows `y0..y1` and the [`Offset`] `off` of `(i, j)`:
    /// `dst[(y - y0) Wo + z] = src[y s + i - p, z s + j - p]`, 0 on the padding. Every entry of
    /// `dst` (`(y1 - y0) Wo` of them) is written.
    #[inline]
    fn fill(&self, src: &[f32], off: &Offset, y0: usize, y1: usize, dst: &mut [f32]) {
        let (wo, s) = (self.wo, self.stride);
        let n = off.z_hi - off.z_lo;
        let (ya, yb) = (off.y_lo.clamp(y0, y1), off.y_hi.clamp(y0, y1));
        if n == 0 || ya >= yb {
            dst.fill(0.0);
            return;
        }
        dst[..(ya - y0) * wo].fill(0.0);
        dst[(yb - y0) * wo..].fill(0.0);
        let span = (n - 1) * s + 1;
        for y in ya..yb {
            let row = &mut dst[(y - y0) * wo..][..wo];
            row[..off.z_lo].fill(0.0);
            row[off.z_hi..].fill(0.0);
            let from = &src[(y * s + off.i - self.pad) * self.w + off.first..][..span];
            let to = &mut row[off.z_lo..off.z_hi];
            match s {
                1 => to.copy_from_slice(from),
                2 => gather::<2>(from, to),
                _ => to
                    .iter_mut()
                    .zip(from.iter().step_by(s))
                    .for_each(|(d, v)| *d = *v),
            }
        }
    }

    /// The adjoint of [`Geometry::fill`]: adds `src` (row `(c, i, j)` of the columns for the
    /// output rows `y0..y1`, `off` the [`Offset`] of `(i, j)`) onto the input plane
    /// `dst = x_b[c] (H, W)`, dropping the entries that fell on the padding.
    #[inline]
    fn add(&self, src: &[f32], off: &Offset, y0: usize, y1: usize, dst: &mut [f32]) {
        let (wo, s) = (self.wo, self.stride);
        let n = off.z_hi - off.z_lo;
        if n == 0 {
            return;
        }
        let span = (n - 1) * s + 1;
        for y in y0.max(off.y_lo)..y1.min(off.y_hi) {
            let to = &mut dst[(y * s + off.i - self.pad) * self.w + off.first..][..span];
            let from = &src[(y - y0) * wo..][off.z_lo..off.z_hi];
            match s {
                1 => to.iter_mut().zip(from).for_each(|(d, v)| *d += *v),
                2 => scatter_add::<2>(from, to),
                _ => to
                    .iter_mut()
                    .step_by(s)
                    .zip(from)
                    .for_each(|(d, v)| *d += *v),
            }
        }
    }

    /// Whether a convolution's tiles are gathered through a map ([`Geometry::tile_map`]) rather
    /// than copied row by row ([`Geometry::im2col_rows`]): with a stride above 1 or output rows
    /// shorter than 16, where the per-row bookkeeping outweighs the copies (the DCGAN's 4x4 /
    /// stride-2 layers: 2x faster whole im2col and col2im). The MNIST U-Net's 3x3 stride-1
    /// layers at 28 columns copy rows (a map there made its step 15% slower).
    fn gathers(&self) -> bool {
        self.stride != 1 || self.wo < 16
    }

    /// The columns `(K, (y1 - y0) Wo)` of output rows `y0..y1` of one image into `dst`, row by
    /// row, with the kernel offsets' ranges `offsets` ([`Geometry::offsets`]).
    fn im2col_rows(&self, x_b: &[f32], offsets: &[Offset], y0: usize, y1: usize, dst: &mut [f32]) {
        let (t, hw) = ((y1 - y0) * self.wo, self.h * self.w);
        let mut rows = dst.chunks_exact_mut(t);
        for plane in x_b.chunks_exact(hw) {
            for (off, row) in offsets.iter().zip(rows.by_ref()) {
                self.fill(plane, off, y0, y1, row);
            }
        }
    }

    /// The adjoint of [`Geometry::im2col_rows`]: the columns `(K, (y1 - y0) Wo)` of output rows
    /// `y0..y1` added onto one image `dx_b (C, H, W)`, row by row (so each pixel sums its kernel
    /// offsets in the order `(i, j)`).
    fn col2im_rows(
        &self,
        cols: &[f32],
        offsets: &[Offset],
        y0: usize,
        y1: usize,
        dx_b: &mut [f32],
    ) {
        let (t, hw) = ((y1 - y0) * self.wo, self.h * self.w);
        let mut rows = cols.chunks_exact(t);
        for plane in dx_b.chunks_exact_mut(hw) {
            for (off, row) in offsets.iter().zip(rows.by_ref()) {
                self.add(row, off, y0, y1, plane);
            }
        }
    }

    /// The gather map of output rows `y0..y1`: for each kernel offset `(i, j)` (in row order)
    /// and output position `(y, z)` of those rows, the index `iy W + iz` in an input plane of
    /// the value that column entry reads, or `H W` (the zero after the plane, see
    /// [`Geometry::im2col_tile`]) where it reads padding. `kh kw (y1 - y0) Wo` entries; the
    /// same for every channel.
    fn tile_map(&self, y0: usize, y1: usize) -> Vec<u32> {
        let hw = self.h * self.w;
        let mut map = Vec::with_capacity(self.kh * self.kw * (y1 - y0) * self.wo);
        for i in 0..self.kh {
            for j in 0..self.kw {
                for y in y0..y1 {
                    let iy = (y * self.stride + i)
                        .checked_sub(self.pad)
                        .filter(|v| *v < self.h);
                    for z in 0..self.wo {
                        let iz = (z * self.stride + j)
                            .checked_sub(self.pad)
                            .filter(|v| *v < self.w);
                        let at = match (iy, iz) {
                            (Some(iy), Some(iz)) => iy * self.w + iz,
                            _ => hw,
                        };
                        map.push(at as u32);
                    }
                }
            }
        }
        map
    }

    /// The columns `(K, t)` of the output rows of one tile of one image `x_b (C, H, W)` into
    /// `dst`, through the tile's [`Geometry::tile_map`]: each input plane is copied into `ext`
    /// (`H W + 1` floats, the last one 0, which the padding reads) and its `kh kw t` column
    /// entries are one gather loop, with no per-row bookkeeping (rows of 7 or 14 values made
    /// that most of the work on the DCGAN's 4x4 / stride-2 convolutions).
    fn im2col_tile(&self, x_b: &[f32], map: &[u32], dst: &mut [f32], ext: &mut [f32]) {
        let hw = self.h * self.w;
        ext[hw] = 0.0;
        for (plane, dst) in x_b.chunks_exact(hw).zip(dst.chunks_exact_mut(map.len())) {
            ext[..hw].copy_from_slice(plane);
            for (d, &at) in dst.iter_mut().zip(map) {
                *d = ext[at as usize];
            }
        }
    }

    /// The inverse of a tile's gather map: for each pixel of an input plane, the positions in
    /// the map (that is, in one channel's `kh kw t` column entries) that read it, in map order
    /// (kernel offsets `(i, j)` in row order), padded with `NONE` to `m` per pixel, where `m` is
    /// the most any pixel has. Returns the entries, slot-major (`(m, H W)`: entry `s` of every
    /// pixel, then entry `s + 1`), and `m`.
    fn inverse_map(&self, map: &[u32]) -> (Vec<u32>, usize) {
        let hw = self.h * self.w;
        let mut count = vec![0usize; hw + 1];
        map.iter().for_each(|&at| count[at as usize] += 1);
        let m = count[..hw].iter().copied().max().unwrap_or(0);
        let mut inv = vec![NONE; hw * m];
        count.fill(0);
        for (q, &at) in map.iter().enumerate() {
            let at = at as usize;
            if at < hw {
                inv[count[at] * hw + at] = q as u32;
                count[at] += 1;
            }
        }
        (inv, m)
    }

    /// The adjoint of [`Geometry::im2col_tile`]: the columns `(K, t)` of one tile added onto one
    /// image `dx_b (C, H, W)`, as a gather through the tile's [`Geometry::inverse_map`]: each
    /// pixel adds the entries that read it in the order `(i, j)`, one slot at a time over the
    /// whole plane so that the pixels' additions are independent (a scatter of the entries onto
    /// the plane, and a per-pixel sum, were each bound by one chain of dependent additions).
    fn col2im_tile(&self, cols: &[f32], inv: &[u32], m: usize, dx_b: &mut [f32]) {
        let hw = self.h * self.w;
        let per_channel = cols.len() / self.c.max(1);
        if m == 0 {
            return;
        }
        for (plane, src) in dx_b
            .chunks_exact_mut(hw)
            .zip(cols.chunks_exact(per_channel))
        {
            for slot in inv.chunks_exact(hw) {
                for (d, &q) in plane.iter_mut().zip(slot) {
                    if q != NONE {
                        *d += src[q as usize];
                    }
                }
            }
        }
    }

    /// im2col of the whole batch into columns `(K, N)`, in parallel over the rows `(c, i, j)`.
    fn im2col(&self, x: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane, img) = (g.cols(), g.plane(), g.image());
        let (offsets, kk, hw) = (g.offsets(), g.kh * g.kw, g.h * g.w);
        let mut cols = zeros(g.rows() * n);
        for_rows(&mut cols, n, |r, row| {
            let (c, off) = (r / kk, &offsets[r % kk]);
            for (bi, dst) in row.chunks_mut(plane).enumerate() {
                g.fill(&x[bi * img + c * hw..][..hw], off, 0, g.ho, dst);
            }
        });
        cols
    }

    /// col2im of the columns `(K, N)` of the whole batch, in parallel over the `(b, c)` image
    /// planes (each pixel sums its kernel offsets in the same order whatever the threads).
    fn col2im(&self, cols: &[f32]) -> Vec<f32> {
        let g = *self;
        let (n, plane) = (g.cols(), g.plane());
        let (offsets, kk) = (g.offsets(), g.kh * g.kw);
        let mut x = zeros(g.b * g.image());
        for_rows(&mut x, g.h * g.w, |bc, dst| {
            let (bi, c) = (bc / g.c, bc % g.c);
            for (r, off) in (c * kk..).zip(&offsets) {
                g.add(&cols[r * n + bi * plane..][..plane], off, 0, g.ho, dst);
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

/// One tile of a convolution: the output rows `y0..y1` and their gather map
/// ([`Geometry::tile_map`]).
struct Tile {
    y0: usize,
    y1: usize,
    map: Vec<u32>,
    /// The kernel offsets' ranges ([`Geometry::offsets`]) when the tile's columns are copied row
    /// by row (no map), made once per op rather than per image.
    offsets: Vec<Offset>,
    /// The inverse map and its entries per pixel ([`Geometry::inverse_map`]), made only for the
    /// input gradient.
    inv: (Vec<u32>, usize),
}

impl Tile {
    /// The output positions of the tile, `(y1 - y0) Wo`.
    fn len(&self, wo: usize) -> usize {
        (self.y1 - self.y0) * wo
    }
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

    /// The kernel as [`Geometry::kernel_rows`] when the convolution runs as shifted GEMMs
    /// ([`Geometry::shifts`]), otherwise empty.
    fn shifted_kernel(&self, w: &[f32]) -> Vec<f32> {
        match self.g.shifts() {
            true => self.g.kernel_rows(w, self.o),
            false => Vec::new(),
        }
    }

    /// The output rows `y0..y1` of each tile, in order.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let g = self.g;
        let rows = (self.tile_floats / (g.rows() * g.wo).max(1)).clamp(1, g.ho);
        (0..g.ho)
            .step_by(rows)
            .map(move |y0| (y0, (y0 + rows).min(g.ho)))
    }

    /// The tiles of [`Conv::tiles`] with their gather maps ([`Geometry::tile_map`]; empty for a
    /// 1x1 kernel with stride 1 and no padding, which needs no columns, and where
    /// [`Geometry::gathers`] says rows are copied) and, if `inverse`, their inverse maps, made
    /// once per op.
    fn tile_plans(&self, inverse: bool) -> Vec<Tile> {
        if self.g.shifts() || self.g.channels_last() {
            return Vec::new();
        }
        self.tiles()
            .map(|(y0, y1)| {
                let map = match !self.g.identity() && self.g.gathers() {
                    true => self.g.tile_map(y0, y1),
                    false => Vec::new(),
                };
                let inv = match inverse && !map.is_empty() {
                    true => self.g.inverse_map(&map),
                    false => (Vec::new(), 0),
                };
                let offsets = match map.is_empty() && !self.g.identity() {
                    true => self.g.offsets(),
                    false => Vec::new(),
                };
                Tile {
                    y0,
                    y1,
                    map,
                    inv,
                    offsets,
                }
            })
            .collect()
    }

    /// Whether the images go to the rayon pool one task each (their GEMMs then run on the task's
    /// thread): with at least two images per thread and enough work to pay for the tasks.
    /// Otherwise the images run one after another, their GEMMs split across the pool.
    fn images_in_parallel(&self) -> bool {
        let pool = rayon::current_num_threads();
        let g = self.g;
        pool > 1 && g.b >= 2 * pool && g.b * self.o * g.rows() * g.plane() >= 1 << 20
    }

    /// A new buffer of `per` values per image, made by `f(b0, out_n, threads)` for each run of
    /// `n` consecutive images from `b0` on (the last run may be shorter), where `out_n` is their
    /// values, zeroed ([`filled`]): the runs are the rayon tasks (each GEMM on its task's thread)
    /// when there are enough of them, otherwise they run one after another with their GEMMs
    /// split across the pool.
    fn per_chunk(
        &self,
        per: usize,
        n: usize,
        f: impl Fn(usize, &mut [f32], Threads) + Sync + Send,
    ) -> Vec<f32> {
        let par = self.images_in_parallel() && self.g.b.div_ceil(n) >= rayon::current_num_threads();
        let threads = if par { Threads::One } else { Threads::Pool };
        filled(self.g.b * per, n * per, par, |ci, out_n| {
            f(ci * n, out_n, threads)
        })
    }

    /// The columns `(K, t)` of one tile of one image `x_b`, and their row stride: for a 1x1
    /// kernel with stride 1 and no padding a view of `x_b` itself, otherwise written into the
    /// scratch.
    fn columns<'a>(
        &self,
        x_b: &'a [f32],
        tile: &Tile,
        scratch: &'a mut Scratch,
    ) -> (&'a [f32], usize) {
        let g = self.g;
        if g.identity() {
            return (&x_b[tile.y0 * g.wo..], g.plane());
        }
        let t = tile.len(g.wo);
        let (cols, ext) = scratch
            .get(g.rows() * t + g.h * g.w + 1)
            .split_at_mut(g.rows() * t);
        match tile.map.is_empty() {
            true => g.im2col_rows(x_b, &tile.offsets, tile.y0, tile.y1, cols),
            false => g.im2col_tile(x_b, &tile.map, cols, ext),
        }
        (cols, t)
    }

    /// `y[b] = act(bias + W . cols(x[b]))`, written straight into `(B, O, Ho, Wo)`.
    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], act: Activation) -> Vec<f32> {
        let (g, o) = (self.g, self.o);
        let (k, p, img) = (g.rows(), g.plane(), g.image());
        if g.channels_last() {
            let wk = g.kernel_cl(w, o);
            return self.per_chunk(o * p, g.images_per_gemm(), |b0, y_n, threads| {
                let x_n = &x[b0 * img..][..y_n.len() / (o * p) * img];
                self.forward_cl(x_n, &wk, bias, act, y_n, threads)
            });
        }
        let tiles = self.tile_plans(false);
        let rows = self.shifted_kernel(w);
        self.per_chunk(o * p, 1, |bi, y_b, threads| {
            let x_b = &x[bi * img..][..img];
            if g.shifts() {
                return self.forward_shifted(x_b, &rows, bias, act, y_b, threads);
            }
            for (row, b) in y_b.chunks_exact_mut(p).zip(bias) {
                row.fill(*b);
            }
            let mut scratch = Scratch::take();
            for tile in &tiles {
                let t = tile.len(g.wo);
                let (cols, cols_rs) = self.columns(x_b, tile, &mut scratch);
                let dst = &mut y_b[tile.y0 * g.wo..];
                gemm_f32_on(threads, o, t, k, dst, p, true, w, k, 1, cols, cols_rs, 1);
            }
            act.apply_slice(y_b);
        })
    }

    /// `dx[b] = col2im(W^T . dy[b])`.
    fn input_grad(&self, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (g, o) = (self.g, self.o);
        let (k, p, img) = (g.rows(), g.plane(), g.image());
        // The shifted GEMMs multiply the zeros of the wide grid's extra columns by the kernel:
        // a non-finite weight would make gradients that the convolution never reads non-finite,
        // so such a kernel takes channels-last columns, which make only the true products.
        if g.channels_last() || (g.shifts() && !all_finite(w)) {
            let wk = g.kernel_cl(w, o);
            return self.per_chunk(img, g.images_per_gemm(), |b0, dx_n, threads| {
                let dy_n = &dy[b0 * o * p..][..dx_n.len() / img * o * p];
                self.input_grad_cl(dy_n, &wk, dx_n, threads)
            });
        }
        let tiles = self.tile_plans(true);
        let rows = self.shifted_kernel(w);
        self.per_chunk(img, 1, |bi, dx_b, threads| {
            let dy_b = &dy[bi * o * p..][..o * p];
            if g.shifts() {
                return self.input_grad_shifted(dy_b, &rows, dx_b, threads);
            }
            let mut scratch = Scratch::take();
            for tile in &tiles {
                let t = tile.len(g.wo);
                let dy_t = &dy_b[tile.y0 * g.wo..];
                if g.identity() {
                    let dst = &mut dx_b[tile.y0 * g.wo..];
                    gemm_f32_on(threads, k, t, o, dst, p, false, w, 1, k, dy_t, p, 1);
                } else {
                    let dcols = scratch.get(k * t);
                    gemm_f32_on(threads, k, t, o, dcols, t, false, w, 1, k, dy_t, p, 1);
                    match tile.map.is_empty() {
                        true => g.col2im_rows(dcols, &tile.offsets, tile.y0, tile.y1, dx_b),
                        false => g.col2im_tile(dcols, &tile.inv.0, tile.inv.1, dx_b),
                    }
                }
            }
        })
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
        let tiles = self.tile_plans(false);
        let run = |part: usize, acc: &mut [f32], threads: Threads| {
            let images = part * per_part..((part + 1) * per_part).min(g.b);
            if g.channels_last() {
                let (per_gemm, end) = (g.images_per_gemm(), images.end);
                for b0 in images.step_by(per_gemm) {
                    let n = per_gemm.min(end - b0);
                    let (x_n, dy_n) = (&x[b0 * img..][..n * img], &dy[b0 * o * p..][..n * o * p]);
                    self.weight_grad_cl(x_n, dy_n, acc, threads);
                }
                return;
            }
            let mut scratch = Scratch::take();
            for bi in images {
                let (x_b, dy_b) = (&x[bi * img..][..img], &dy[bi * o * p..][..o * p]);
                // As in the input gradient: the wide grid's extra columns multiply zeros of `dy`
                // by pixels, so an image with a non-finite value takes channels-last columns
                // (same accumulator layout, rows `(i, j, c)`).
                if g.shifts() {
                    match all_finite(x_b) {
                        true => self.weight_grad_shifted(x_b, dy_b, acc, threads),
                        false => self.weight_grad_cl(x_b, dy_b, acc, threads),
                    }
                    continue;
                }
                for tile in &tiles {
                    let t = tile.len(g.wo);
                    let (cols, cols_rs) = self.columns(x_b, tile, &mut scratch);
                    let dy_t = &dy_b[tile.y0 * g.wo..];
                    gemm_f32_on(threads, k, o, t, acc, o, true, cols, cols_rs, 1, dy_t, 1, p);
                }
            }
        };
        let par = parts > 1 && self.images_in_parallel();
        let threads = if par { Threads::One } else { Threads::Pool };
        let mut partial = filled(parts * ok, ok, par, |part, acc| run(part, acc, threads));
        // The partial sums in order into the first (`p0 + p1 + ...`, as adding each onto zeros
        // would give), then one blocked transpose `(K, O) -> (O, K)`: adding each strided into
        // `dw` took a tenth of a DCGAN step.
        let (sum, rest) = partial.split_at_mut(ok);
        for part in rest.chunks_exact(ok) {
            sum.iter_mut().zip(part).for_each(|(a, v)| *a += *v);
        }
        match g.shifts() || g.channels_last() {
            true => g.unshift_weight_grad(sum, o, &mut dw),
            false => transpose_into(sum, k, o, &mut dw),
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
/// workers'), of at most `max(TILE_FLOATS, K Wo)` floats of the largest convolution on columns
/// that thread has run, or `H W C + n P (K + O)` of one on channels-last columns (about 2 MiB
/// for the MNIST U-Net either way; see the module doc). A buffer more than four times larger
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
struct ConvForward(Conv, Activation);

/// `act(x + b[c])`: arguments `x (B, C, H, W)`, `b (C)`; the convolution gives the shapes (its
/// output is `x`).
struct ChannelBiasAct(Conv, Activation);

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
            CpuStorage::F32(c.forward(x, w, b, self.1)),
            Shape::from(&c.y_dims()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.0;
        let dy = through_activation(grad, y, self.1)?;
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
            true => Some(u.apply_op3(w, &c.no_bias(&u)?, ConvForward(c, Activation::Identity))?),
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
            true => Some(x.apply_op3(&v, &c.no_bias(&v)?, ConvForward(c, Activation::Identity))?),
            false => None,
        };
        let d_x = match x.track_op() {
            true => Some(dy.apply_op2(&v, ConvInputGrad(c))?),
            false => None,
        };
        Ok((d_dy, d_x))
    }
}

/// `grad act'(y)` (the gradient before an activation whose output is `y`), `grad` itself for the
/// identity.
fn through_activation(grad: &Tensor, y: &Tensor, act: Activation) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    match act {
        Activation::Identity => Ok(grad),
        act => grad.apply_op2_no_bwd(y, &ActivationBackward { act }),
    }
}

impl CustomOp2 for ChannelBiasAct {
    fn name(&self) -> &'static str {
        "gentrain-channel-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, act) = (self.0, self.1);
        c.g.check_input(self.name(), l1.dims(), &c.x_dims())?;
        c.g.check_input(self.name(), l2.dims(), &[c.o])?;
        let (x, b) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let plane = c.g.plane();
        let y = rows_filled(x.len(), plane, |bc, row| {
            row.copy_from_slice(&x[bc * plane..][..plane]);
            let bias = b[bc % c.o];
            row.iter_mut().for_each(|v| *v += bias);
            act.apply_slice(row);
        });
        Ok((CpuStorage::F32(y), Shape::from(&c.x_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g_pre = through_activation(grad, y, self.1)?;
        let db = match b.track_op() {
            true => Some(g_pre.apply_op1(BiasGrad(self.0))?),
            false => None,
        };
        Ok((x.track_op().then_some(g_pre), db))
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
            conv(&[2, 3, 5, 18], 4, 3, 1, 1),
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
            close(
                rows.forward(&x, &w, &bias, Activation::Identity),
                c.forward(&x, &w, &bias, Activation::Identity),
                "y",
            );
            close(rows.input_grad(&dy, &w), c.input_grad(&dy, &w), "dx");
            close(rows.weight_grad(&dy, &x), c.weight_grad(&dy, &x), "dw");
        }
    }

    #[test]
    fn gathered_and_row_copied_columns_are_the_same() {
        // Both ways of making one tile's columns, and their adjoints, on geometries of both
        // kinds (each op picks one by `Geometry::gathers`), including tiles of a few rows.
        for c in [
            conv(&[2, 3, 9, 20], 4, 3, 1, 1),
            conv(&[2, 3, 14, 14], 4, 4, 2, 1),
            conv(&[1, 2, 7, 5], 3, 3, 3, 2),
            conv(&[2, 2, 6, 6], 3, 2, 1, 0),
        ] {
            let g = c.g;
            let x = flat(&uniform(5, &c.x_dims(), -1.0, 1.0));
            let x_b = &x[..g.image()];
            for (y0, y1) in [(0, g.ho), (0, 1), (1, g.ho.min(3))] {
                let t = (y1 - y0) * g.wo;
                let (mut rows, mut gathered) =
                    (vec![f32::NAN; g.rows() * t], vec![1.0; g.rows() * t]);
                let mut ext = vec![f32::NAN; g.h * g.w + 1];
                let map = g.tile_map(y0, y1);
                g.im2col_rows(x_b, &g.offsets(), y0, y1, &mut rows);
                g.im2col_tile(x_b, &map, &mut gathered, &mut ext);
                assert_eq!(rows, gathered, "{c:?} rows {y0}..{y1}");
                let (inv, m) = g.inverse_map(&map);
                let (mut a, mut b) = (x_b.to_vec(), x_b.to_vec());
                g.col2im_rows(&rows, &g.offsets(), y0, y1, &mut a);
                g.col2im_tile(&rows, &inv, m, &mut b);
                assert_eq!(a, b, "{c:?} adjoint, rows {y0}..{y1}");
            }
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
