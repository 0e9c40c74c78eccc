//! Stride-1 convolutions without columns: `kh` GEMMs of depth `kw C` over `kw` shifted copies
//! of a zero-padded image.
//!
//! With stride 1, the receptive field of output `(y, z)` at kernel offset `(i, j)` is input
//! `(y + i - p, z + j - p)`. Pad each input plane to `Hp = H + 2p` rows of `Wp = W + 2p`
//! columns and number the output positions on that wider grid, `q = y Wp + z` (`y < Ho`,
//! `z < Wp`, of which only `z < Wo` are outputs): then the input that offset `(i, j)` reads for
//! every `q` is the padded plane read from `s(i, j) = i Wp + j` on, one contiguous run. So
//!
//! - forward: `Y~[o, q] = b[o] + sum_(i, j) sum_c W[o, c, i, j] Xp[c, q + s(i, j)]`. The
//!   offsets `(i, 0..kw)` of one kernel row are taken together: with `kw` copies of the padded
//!   image, copy `j` read from `j` on (`Geometry::shifted_copies`), the right operands of kernel
//!   row `i` are the rows `(j, c)` of those copies read from `i Wp` on, one evenly strided
//!   `(kw C, Ho Wp)` matrix, so the forward is `kh` GEMMs `W_i (O, kw C) . Xs_i (kw C, Ho Wp)`,
//!   accumulated (the `gemm` crate reads the strided views in place: no columns are written);
//!   the outputs `z < Wo` of `Y~` are then copied out (with the activation);
//! - input gradient (the adjoint): `dXp[c, q + s] += sum_o W[o, c, i, j] dY~[o, q]`, one GEMM
//!   per kernel row onto the shifted copies' gradient, folded back onto the padded plane, with `dY~` the output gradient on
//!   the wide grid (zero at `z >= Wo`, so those positions add nothing), then cropped to `dX`;
//! - weight gradient: `dW[o, c, i, j] += sum_q Xp[c, q + s] dY~[o, q]`, one GEMM per kernel row
//!   with `k = Ho Wp`.
//!
//! The wide grid's extra positions (`z >= Wo`) take products with zeros: of `dY~` in the weight
//! gradient, of the kernel in the input gradient. A NaN or infinity there would turn them into
//! NaN, so `Conv` sends the weight gradient of an image holding one, and the input gradient of a
//! kernel holding one, to channels-last columns instead (`super::channels_last`).
//!
//! Every pixel's sum runs over the kernel rows `i` in order, each term a GEMM's own sum over
//! `(j, c)`; results do not depend on the threads. This is the "implicit GEMM" layout
//! of direct convolutions (e.g. Chetlur et al. 2014, cuDNN, section 3.1; Georganas et al. 2018 for
//! CPUs) on a plain row-major image. The wide grid costs `Wp / Wo - 1` more GEMM columns (7%
//! at 28 columns with a 3x3 kernel, 29% at 7) against the im2col copies it saves (`kh kw` times
//! the input, written and read back, and their per-row bookkeeping): see `Geometry::shifts`.
//!
//! Shapes: `x_b (C, H, W)` one image, `w (O, C, kh, kw)`, `y_b (O, Ho, Wo)`; a padded plane
//! holds `Hp Wp + kw - 1` floats (the last offset's run reads `kw - 1` past the plane's end:
//! zeros).

use super::{gemm_f32_on, Activation, Conv, Geometry, Scratch, Threads};

/// The narrowest output rows (`Wo`) that take the shifted GEMMs; narrower ones go through
/// columns, where the wide grid's extra GEMM columns (`2p / Wo`) cost more than the copies.
const SHIFT_MIN_WO: usize = 12;

/// The fewest channels times kernel columns (`kw C`, the inner dimension of each GEMM) that take
/// the shifted GEMMs: a one-channel input (the U-Net's first layer) makes GEMMs of depth 3.
const SHIFT_MIN_SPAN: usize = 16;

impl Geometry {
    /// Whether this convolution runs as shifted GEMMs: stride 1, a kernel other than 1x1 without
    /// padding (which needs no columns at all), output rows of at least `SHIFT_MIN_WO`, and not
    /// on channels-last columns ([`Geometry::channels_last`], which takes the narrower rows of
    /// inputs with many channels).
    pub(super) fn shifts(&self) -> bool {
        self.stride == 1
            && !self.identity()
            && self.wo >= SHIFT_MIN_WO
            && self.c * self.kw >= SHIFT_MIN_SPAN
            && !self.channels_last()
    }

    /// `Wp = W + 2p`, the columns of a padded plane and of the wide output grid.
    fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }

    /// Floats of one padded plane: `Hp Wp + kw - 1` (see the module doc).
    fn padded(&self) -> usize {
        (self.h + 2 * self.pad) * self.wp() + self.kw - 1
    }

    /// `Ho Wp`, the positions of the wide output grid.
    fn wide(&self) -> usize {
        self.ho * self.wp()
    }

    /// `x_b (C, H, W)` into `xp (C, padded)`, zero outside the image. Writes every entry.
    fn pad_image(&self, x_b: &[f32], xp: &mut [f32]) {
        let (w, wp, p) = (self.w, self.wp(), self.pad);
        for (plane, dst) in x_b
            .chunks_exact(self.h * w)
            .zip(xp.chunks_exact_mut(self.padded()))
        {
            dst[..p * wp + p].fill(0.0);
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let at = (y + p) * wp + p;
                dst[at..at + w].copy_from_slice(row);
                let end = (at + w + 2 * p).min(dst.len());
                dst[at + w..end].fill(0.0);
            }
            dst[(self.h + p) * wp + p..].fill(0.0);
        }
    }

    /// The crop of [`Geometry::pad_image`]: `xp (C, padded)` -> `x_b (C, H, W)`.
    fn unpad_image(&self, xp: &[f32], x_b: &mut [f32]) {
        let (w, wp, p) = (self.w, self.wp(), self.pad);
        for (plane, src) in x_b
            .chunks_exact_mut(self.h * w)
            .zip(xp.chunks_exact(self.padded()))
        {
            for (y, row) in plane.chunks_exact_mut(w).enumerate() {
                row.copy_from_slice(&src[(y + p) * wp + p..][..w]);
            }
        }
    }

    /// Output planes `y_b (n, Ho, Wo)` onto the wide grid `wide (n, Ho Wp)`, zero at `z >= Wo`.
    fn widen(&self, y_b: &[f32], wide: &mut [f32]) {
        let (wo, wp) = (self.wo, self.wp());
        for (src, dst) in y_b.chunks_exact(wo).zip(wide.chunks_exact_mut(wp)) {
            dst[..wo].copy_from_slice(src);
            dst[wo..].fill(0.0);
        }
    }

    /// The outputs of the wide grid: `wide (n, Ho Wp)` -> `y_b (n, Ho, Wo)`.
    fn narrow(&self, wide: &[f32], y_b: &mut [f32]) {
        let (wo, wp) = (self.wo, self.wp());
        for (src, dst) in wide.chunks_exact(wp).zip(y_b.chunks_exact_mut(wo)) {
            dst.copy_from_slice(&src[..wo]);
        }
    }
}

impl Geometry {
    /// `kw C`, the rows of one kernel row's operand (offsets `(i, 0..kw)` of every channel).
    fn span(&self) -> usize {
        self.kw * self.c
    }

    /// The kernel `w (O, C, kh, kw)` as `kh` matrices `(O, kw C)`, column `j C + c` of matrix
    /// `i` holding `w[o, c, i, j]`: the left operands of the forward (and, transposed, of the
    /// input gradient). Made once per op.
    pub(super) fn kernel_rows(&self, w: &[f32], o: usize) -> Vec<f32> {
        let (c, kh, kw, kk, span) = (self.c, self.kh, self.kw, self.kh * self.kw, self.span());
        let mut out = vec![0f32; kh * o * span];
        for (oi, w_o) in w.chunks_exact(c * kk).enumerate() {
            for (ci, w_oc) in w_o.chunks_exact(kk).enumerate() {
                for (r, v) in w_oc.iter().enumerate() {
                    let (i, j) = (r / kw, r % kw);
                    out[(i * o + oi) * span + j * c + ci] = *v;
                }
            }
        }
        out
    }

    /// A weight gradient accumulated by [`Conv::weight_grad_shifted`], `acc (kh kw C, O)` with
    /// rows `(i, j, c)`, into `dw (O, C, kh, kw)`.
    pub(super) fn unshift_weight_grad(&self, acc: &[f32], o: usize, dw: &mut [f32]) {
        let (c, kk) = (self.c, self.kh * self.kw);
        for (row, src) in acc.chunks_exact(o).enumerate() {
            let (r, ci) = (row / c, row % c);
            for (oi, v) in src.iter().enumerate() {
                dw[(oi * c + ci) * kk + r] = *v;
            }
        }
    }

    /// `x_b (C, H, W)` into `xs (kw, C, L)` (`L` = [`Geometry::padded`]): copy `j` of channel
    /// `c` is the padded plane read from `j` on, `xs[j, c, t] = Xp[c, t + j]` (zero past the
    /// plane), so rows `(j, c)` are evenly spaced and offset `(i, j)` of every channel is one
    /// strided matrix `(kw C, Ho Wp)` read from `i Wp` on. Writes every entry.
    fn shifted_copies(&self, x_b: &[f32], xs: &mut [f32]) {
        let l = self.padded();
        let (first, rest) = xs.split_at_mut(self.c * l);
        self.pad_image(x_b, first);
        for (j, copy) in (1..).zip(rest.chunks_exact_mut(self.c * l)) {
            for (dst, src) in copy.chunks_exact_mut(l).zip(first.chunks_exact(l)) {
                dst[..l - j].copy_from_slice(&src[j..]);
                dst[l - j..].fill(0.0);
            }
        }
    }

    /// The adjoint of [`Geometry::shifted_copies`]: `dxs (kw, C, L)` summed back onto the
    /// padded planes (`dxs[0]`, in place: `Xp[c, t] = sum_j xs[j, c, t - j]`, in the order
    /// `j = 0, 1, ...`), then cropped into `dx_b (C, H, W)`.
    fn fold_copies(&self, dxs: &mut [f32], dx_b: &mut [f32]) {
        let l = self.padded();
        let (first, rest) = dxs.split_at_mut(self.c * l);
        for (j, copy) in (1..).zip(rest.chunks_exact(self.c * l)) {
            for (dst, src) in first.chunks_exact_mut(l).zip(copy.chunks_exact(l)) {
                dst[j..].iter_mut().zip(src).for_each(|(d, v)| *d += *v);
            }
        }
        self.unpad_image(first, dx_b);
    }
}

impl Conv {
    /// The two scratch buffers of one image: the shifted copies `(kw, C, L)` and a wide grid
    /// `(O, Ho Wp)`.
    fn buffers<'a>(&self, scratch: &'a mut Scratch) -> (&'a mut [f32], &'a mut [f32]) {
        let g = self.g;
        let copies = g.span() * g.padded();
        scratch.get(copies + self.o * g.wide()).split_at_mut(copies)
    }

    /// `y_b = act(bias + conv(x_b, w))` for one image, as `kh` GEMMs over its shifted copies;
    /// `rows` is [`Geometry::kernel_rows`] of `w`.
    pub(super) fn forward_shifted(
        &self,
        x_b: &[f32],
        rows: &[f32],
        bias: &[f32],
        act: Activation,
        y_b: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let (span, l, q, wp) = (g.span(), g.padded(), g.wide(), g.wp());
        let mut scratch = Scratch::take();
        let (xs, wide) = self.buffers(&mut scratch);
        g.shifted_copies(x_b, xs);
        for (row, b) in wide.chunks_exact_mut(q).zip(bias) {
            row.fill(*b);
        }
        for (i, lhs) in rows.chunks_exact(o * span).enumerate() {
            let rhs = &xs[i * wp..];
            gemm_f32_on(threads, o, q, span, wide, q, true, lhs, span, 1, rhs, l, 1);
        }
        g.narrow(wide, y_b);
        act.apply_slice(y_b);
    }

    /// `dx_b`, the input gradient of one image from its output gradient `dy_b (O, Ho, Wo)`: the
    /// adjoint of [`Conv::forward_shifted`] without the bias (`rows` as there). Writes every
    /// entry of `dx_b`.
    pub(super) fn input_grad_shifted(
        &self,
        dy_b: &[f32],
        rows: &[f32],
        dx_b: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let (span, l, q, wp) = (g.span(), g.padded(), g.wide(), g.wp());
        let mut scratch = Scratch::take();
        let (dxs, dyw) = self.buffers(&mut scratch);
        g.widen(dy_b, dyw);
        for (i, lhs) in rows.chunks_exact(o * span).enumerate() {
            // The first kernel row writes `[0, Q)` of every copy, the others add from `i Wp` on;
            // the rest of each copy is zeroed after the first.
            let dst = &mut dxs[i * wp..];
            gemm_f32_on(threads, span, q, o, dst, l, i > 0, lhs, 1, span, dyw, q, 1);
            if i == 0 {
                dxs.chunks_exact_mut(l).for_each(|c| c[q..].fill(0.0));
            }
        }
        g.fold_copies(dxs, dx_b);
    }

    /// Adds one image's weight gradient onto `acc (kh kw C, O)` (rows `(i, j, c)`; see
    /// [`Geometry::unshift_weight_grad`]), from `x_b (C, H, W)` and `dy_b (O, Ho, Wo)`.
    pub(super) fn weight_grad_shifted(
        &self,
        x_b: &[f32],
        dy_b: &[f32],
        acc: &mut [f32],
        threads: Threads,
    ) {
        let (g, o) = (self.g, self.o);
        let (span, l, q, wp) = (g.span(), g.padded(), g.wide(), g.wp());
        let mut scratch = Scratch::take();
        let (xs, dyw) = self.buffers(&mut scratch);
        g.shifted_copies(x_b, xs);
        g.widen(dy_b, dyw);
        for (i, dst) in acc.chunks_exact_mut(span * o).enumerate() {
            let lhs = &xs[i * wp..];
            gemm_f32_on(threads, span, o, q, dst, o, true, lhs, l, 1, dyw, 1, q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(c: usize, h: usize, w: usize, k: usize, pad: usize) -> Geometry {
        Geometry::new("test", &[1, c, h, w], k, k, 1, pad).unwrap()
    }

    #[test]
    fn padding_and_cropping_are_inverse_and_zero_outside() {
        for (c, h, w, k, pad) in [(2, 5, 13, 3, 1), (1, 4, 12, 5, 2), (3, 6, 14, 3, 0)] {
            let g = geometry(c, h, w, k, pad);
            let x: Vec<f32> = (0..c * h * w).map(|v| v as f32 + 1.0).collect();
            let mut xp = vec![f32::NAN; c * g.padded()];
            g.pad_image(&x, &mut xp);
            let inside: f32 = xp.iter().sum();
            assert_eq!(inside, x.iter().sum::<f32>(), "{c} {h} {w} {k} {pad}");
            assert_eq!(xp.iter().filter(|v| **v == 0.0).count(), xp.len() - x.len());
            let mut back = vec![f32::NAN; x.len()];
            g.unpad_image(&xp, &mut back);
            assert_eq!(back, x);
        }
    }

    #[test]
    fn the_wide_grid_holds_the_outputs_and_zeros() {
        let g = geometry(1, 5, 13, 3, 1);
        let y: Vec<f32> = (0..2 * g.plane()).map(|v| v as f32 + 1.0).collect();
        let mut wide = vec![f32::NAN; 2 * g.wide()];
        g.widen(&y, &mut wide);
        assert_eq!(wide.iter().filter(|v| **v == 0.0).count(), 2 * g.ho * 2);
        let mut back = vec![0.0; y.len()];
        g.narrow(&wide, &mut back);
        assert_eq!(back, y);
    }
}
