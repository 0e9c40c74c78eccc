//! Convolutions of small planes with many channels: channels-last columns, several images per
//! GEMM.
//!
//! The columns of [`super::Geometry::im2col`] have one row per `(c, i, j)` and one column per
//! output position; on a 7x7 plane every row is a gather of 49 scattered pixels, and a GEMM
//! per image has 49 columns (or, for the weight gradient, a depth of 49), too few for the
//! `gemm` crate's kernels to run at speed. Here each image is first transposed to channels-last
//! `xt (H W, C)`, so the receptive field of output `(y, z)` at kernel row `i` is one contiguous
//! run of `kw C` values of `xt` (fewer at the borders, where the rest is padding):
//!
//! - columns `cols (P, K)` of one image, row `q = y Wo + z`, column `(i kw + j) C + c` holding
//!   `x[c, y s + i - p, z s + j - p]` (0 outside the image): `kh` copies per output position;
//! - forward: `Y^T (n P, O) = cols (n P, K) . Wk^T (K, O)` over `n` images at once
//!   ([`Geometry::images_per_gemm`]), with `Wk (O, K)` the kernel with its columns in the same
//!   `(i, j, c)` order ([`Geometry::kernel_cl`]); then each image's `(P, O)` block is transposed
//!   into `y_b (O, P)` with the bias and the activation;
//! - input gradient: `dcols (n P, K) = dY^T (n P, O) . Wk (O, K)`, each image's columns added
//!   back onto its channels-last gradient ([`Geometry::col2im_cl`], the adjoint of
//!   [`Geometry::im2col_cl`]) and transposed to `(C, H, W)`;
//! - weight gradient: `dWk^T (K, O) += cols^T (K, n P) . dY^T (n P, O)`, rows `(i, j, c)` as
//!   the shifted GEMMs' accumulator (`Geometry::unshift_weight_grad` puts it in `(O, C, kh, kw)`).
//!
//! The number of images per GEMM depends on the shape only (never on the threads), so every
//! output is the same sum in the same order whatever the pool. This is the channels-last
//! ("NHWC") im2col of oneDNN's and cuDNN's GEMM convolutions (Chetlur et al. 2014, section
//! 3.1); the copies it makes are runs of `kw C` floats instead of single pixels.

use super::{gemm_f32_on, transpose_into, Activation, Conv, Geometry, Scratch, Threads};

/// The fewest input channels that take channels-last columns: each copy is a run of at least
/// `kw C` floats (with fewer channels the per-pixel gather of the plain columns is as cheap).
const CL_MIN_C: usize = 16;

/// The GEMM rows (`n P`, images times output positions) that one GEMM aims at: enough for the
/// `gemm` crate's kernels to run near their peak (about 265 GFLOP/s per Zen 5 core at 392 rows
/// against about 195 at 49) while the columns of the images stay in the L2 cache.
const CL_ROWS: usize = 512;

/// The widest output rows that a stride-1 convolution takes channels-last columns for; wider ones
/// run as shifted GEMMs (`super::shifted`). On the MNIST U-Net the 14- and 7-column layers ran
/// faster this way, the 28-column ones about as fast (and their one-output-channel layer slower).
const CL_MAX_WO: usize = 15;

impl Geometry {
    /// Whether this convolution runs on channels-last columns: a kernel other than 1x1 without
    /// padding (which needs no columns at all), at least `CL_MIN_C` input channels, and a
    /// stride above 1 or output rows of at most `CL_MAX_WO`.
    pub(super) fn channels_last(&self) -> bool {
        !self.identity() && self.c >= CL_MIN_C && (self.stride > 1 || self.wo <= CL_MAX_WO)
    }

    /// Images per GEMM: the largest power of two `n` with `n P <= CL_ROWS` (1 at least) whose
    /// columns fit in a scratch tile (`n P K <= TILE_FLOATS`). A power of two divides the usual
    /// batch sizes evenly among the threads.
    pub(super) fn images_per_gemm(&self) -> usize {
        let (p, k) = (self.plane().max(1), self.rows().max(1));
        let mut n = 1;
        while 2 * n * p <= CL_ROWS && 2 * n * p * k <= super::TILE_FLOATS {
            n *= 2;
        }
        n
    }

    /// `h w`, the pixels of one input plane.
    fn pixels(&self) -> usize {
        self.h * self.w
    }

    /// The kernel `w (O, C, kh, kw)` as `Wk (O, K)` with column `(i kw + j) C + c` holding
    /// `w[o, c, i, j]`. Made once per op.
    pub(super) fn kernel_cl(&self, w: &[f32], o: usize) -> Vec<f32> {
        let (c, kk, k) = (self.c, self.kh * self.kw, self.rows());
        let mut out = vec![0f32; o * k];
        for (w_o, dst) in w.chunks_exact(c * kk).zip(out.chunks_exact_mut(k.max(1))) {
            for (ci, w_oc) in w_o.chunks_exact(kk).enumerate() {
                for (r, v) in w_oc.iter().enumerate() {
                    dst[r * c + ci] = *v;
                }
            }
        }
        out
    }

    /// The kernel offsets `j_lo..j_hi` of output column `z` whose input column
    /// `z s + j - p` lies inside the image, and the input column of `j_lo`.
    #[inline]
    fn valid_cols(&self, z: usize) -> (usize, usize, usize) {
        let at = z * self.stride;
        let lo = self.pad.saturating_sub(at).min(self.kw);
        let hi = (self.w + self.pad).saturating_sub(at).min(self.kw).max(lo);
        (lo, hi, (at + lo).saturating_sub(self.pad))
    }

    /// The input row of output row `y` at kernel row `i`, if inside the image.
    #[inline]
    fn input_row(&self, y: usize, i: usize) -> Option<usize> {
        (y * self.stride + i)
            .checked_sub(self.pad)
            .filter(|r| *r < self.h)
    }

    /// The columns `cols (P, K)` of one image from its channels-last `xt (H W, C)` (see the
    /// module doc). Writes every entry.
    pub(super) fn im2col_cl(&self, xt: &[f32], cols: &mut [f32]) {
        let (c, span) = (self.c, self.kw * self.c);
        for (q, row) in cols.chunks_exact_mut(self.rows()).enumerate() {
            let (y, z) = (q / self.wo, q % self.wo);
            let (lo, hi, x0) = self.valid_cols(z);
            for (i, dst) in row.chunks_exact_mut(span).enumerate() {
                let Some(r) = self.input_row(y, i) else {
                    dst.fill(0.0);
                    continue;
                };
                dst[..lo * c].fill(0.0);
                let src = &xt[(r * self.w + x0) * c..][..(hi - lo) * c];
                dst[lo * c..hi * c].copy_from_slice(src);
                dst[hi * c..].fill(0.0);
            }
        }
    }

    /// The adjoint of [`Geometry::im2col_cl`]: `dcols (P, K)` added onto the channels-last
    /// gradient `dxt (H W, C)`, position by position in order (entries on the padding dropped).
    pub(super) fn col2im_cl(&self, dcols: &[f32], dxt: &mut [f32]) {
        let (c, span) = (self.c, self.kw * self.c);
        for (q, row) in dcols.chunks_exact(self.rows()).enumerate() {
            let (y, z) = (q / self.wo, q % self.wo);
            let (lo, hi, x0) = self.valid_cols(z);
            for (i, src) in row.chunks_exact(span).enumerate() {
                let Some(r) = self.input_row(y, i) else {
                    continue;
                };
                let dst = &mut dxt[(r * self.w + x0) * c..][..(hi - lo) * c];
                dst.iter_mut()
                    .zip(&src[lo * c..hi * c])
                    .for_each(|(d, v)| *d += *v);
            }
        }
    }
}

impl Conv {
    /// `y_n = act(bias + conv(x_n, w))` for the `n` images `x_n (n, C, H, W)` with one GEMM;
    /// `wk` is [`Geometry::kernel_cl`] of `w`. Writes every entry of `y_n (n, O, Ho, Wo)`.
    pub(super) fn forward_cl(
        &self,
        x_n: &[f32],
        wk: &[f32],
        bias: &[f32],
        act: Activation,
        y_n: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let (k, p, img) = (g.rows(), g.plane(), g.image());
        let m = x_n.len() / img * p;
        let mut scratch = Scratch::take();
        let (cols, out) = self.columns_cl(x_n, &mut scratch, m * o);
        gemm_f32_on(threads, m, o, k, out, o, false, cols, k, 1, wk, 1, k);
        for (out_b, y_b) in out.chunks_exact(p * o).zip(y_n.chunks_exact_mut(o * p)) {
            transpose_into(out_b, p, o, y_b);
            for (row, b) in y_b.chunks_exact_mut(p).zip(bias) {
                row.iter_mut().for_each(|v| *v += *b);
            }
            act.apply_slice(y_b);
        }
    }

    /// `dx_n`, the input gradient of the `n` images whose output gradient is
    /// `dy_n (n, O, Ho, Wo)`, with one GEMM (`wk` as in [`Conv::forward_cl`]). Writes every
    /// entry of `dx_n (n, C, H, W)`.
    pub(super) fn input_grad_cl(
        &self,
        dy_n: &[f32],
        wk: &[f32],
        dx_n: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let (k, p, img, hw) = (g.rows(), g.plane(), g.image(), g.pixels());
        let m = dx_n.len() / img * p;
        let mut scratch = Scratch::take();
        let buf = scratch.get(o * m + m * k + hw * g.c);
        let (dyc, rest) = buf.split_at_mut(o * m);
        let (dcols, dxt) = rest.split_at_mut(m * k);
        self.gather_dy(dy_n, dyc);
        gemm_f32_on(threads, m, k, o, dcols, k, false, dyc, 1, m, wk, k, 1);
        for (dcols_b, dx_b) in dcols.chunks_exact(p * k).zip(dx_n.chunks_exact_mut(img)) {
            dxt.fill(0.0);
            g.col2im_cl(dcols_b, dxt);
            transpose_into(dxt, hw, g.c, dx_b);
        }
    }

    /// Adds the weight gradient of the `n` images `x_n (n, C, H, W)` with output gradient
    /// `dy_n (n, O, Ho, Wo)` onto `acc (K, O)` (rows `(i, j, c)`), with one GEMM.
    pub(super) fn weight_grad_cl(
        &self,
        x_n: &[f32],
        dy_n: &[f32],
        acc: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let k = g.rows();
        let m = x_n.len() / g.image() * g.plane();
        let mut scratch = Scratch::take();
        let (cols, dyc) = self.columns_cl(x_n, &mut scratch, o * m);
        self.gather_dy(dy_n, dyc);
        gemm_f32_on(threads, k, o, m, acc, o, true, cols, 1, k, dyc, 1, m);
    }

    /// The columns `(n P, K)` of the images `x_n` in the scratch, and `extra` more floats of it.
    fn columns_cl<'a>(
        &self,
        x_n: &[f32],
        scratch: &'a mut Scratch,
        extra: usize,
    ) -> (&'a mut [f32], &'a mut [f32]) {
        let g = self.g;
        let (k, p, img, hw) = (g.rows(), g.plane(), g.image(), g.pixels());
        let m = x_n.len() / img * p;
        let buf = scratch.get(hw * g.c + m * k + extra);
        let (xt, rest) = buf.split_at_mut(hw * g.c);
        let (cols, more) = rest.split_at_mut(m * k);
        for (x_b, cols_b) in x_n.chunks_exact(img).zip(cols.chunks_exact_mut(p * k)) {
            transpose_into(x_b, g.c, hw, xt);
            g.im2col_cl(xt, cols_b);
        }
        (cols, more)
    }

    /// The output gradients `dy_n (n, O, P)` as one matrix `dyc (O, n P)`.
    fn gather_dy(&self, dy_n: &[f32], dyc: &mut [f32]) {
        let p = self.g.plane();
        let m = dyc.len() / self.o.max(1);
        for (bi, dy_b) in dy_n.chunks_exact(self.o * p).enumerate() {
            for (row, dst) in dy_b.chunks_exact(p).zip(dyc.chunks_exact_mut(m)) {
                dst[bi * p..][..p].copy_from_slice(row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_columns_are_the_plain_columns_reordered() {
        for (c, h, w, k, s, p) in [
            (16, 7, 7, 3, 1, 1),
            (17, 9, 6, 4, 2, 1),
            (16, 5, 5, 3, 2, 2),
        ] {
            let g = Geometry::new("test", &[1, c, h, w], k, k, s, p).unwrap();
            let x: Vec<f32> = (0..c * h * w).map(|v| v as f32 + 1.0).collect();
            let plain = g.im2col(&x);
            let mut xt = vec![0.0; h * w * c];
            transpose_into(&x, c, h * w, &mut xt);
            let mut cols = vec![f32::NAN; g.plane() * g.rows()];
            g.im2col_cl(&xt, &mut cols);
            for (q, row) in cols.chunks_exact(g.rows()).enumerate() {
                for ci in 0..c {
                    for r in 0..k * k {
                        let want = plain[(ci * k * k + r) * g.plane() + q];
                        assert_eq!(
                            row[r * c + ci],
                            want,
                            "{c} {h} {w} {k} {s} {p}: {q} {ci} {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn images_per_gemm_is_a_power_of_two_within_the_row_target() {
        let g = Geometry::new("test", &[128, 64, 7, 7], 3, 3, 1, 1).unwrap();
        assert_eq!(g.images_per_gemm(), 8);
        let g = Geometry::new("test", &[128, 32, 28, 28], 3, 3, 2, 1).unwrap();
        assert_eq!(g.images_per_gemm(), 2);
        let g = Geometry::new("test", &[4, 16, 64, 64], 3, 3, 1, 1).unwrap();
        assert_eq!(g.images_per_gemm(), 1);
    }
}
