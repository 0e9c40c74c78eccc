//! `ops::conv`: the im2col + GEMM convolution against candle's `conv2d` and against a direct f64
//! definition (forward, the three gradients, central differences), the adjoint relation of
//! im2col and col2im, NaN reaching exactly the outputs that see it, and shape errors.

mod common;
use common::{central_differences, flat_f32};

use candle_core::{Device, Tensor, Var};
use gentrain::config::Activation;
use gentrain::ops::conv::{
    channel_bias_act, col2im, conv2d, conv2d_act, conv2d_slow, conv_transpose2d,
    conv_transpose2d_act, conv_transpose2d_slow, im2col,
};

/// One convolution: input (b, c, h, w), `o` output channels, a `k x k` kernel, stride, padding.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
) -> Case {
    Case {
        b,
        c,
        h,
        w,
        o,
        k,
        s,
        p,
    }
}

/// Kernels 1 and 3 (and 2), strides 1 to 3, padding 0 to 2, odd and rectangular images,
/// B = 1 and 3, channel counts that are not multiples of 8, outputs down to 1 x 1, and two
/// cases large enough for the threaded im2col / col2im.
const CASES: &[Case] = &[
    case(1, 3, 7, 7, 5, 3, 1, 1),
    case(3, 5, 5, 9, 7, 3, 2, 1),
    case(3, 6, 7, 7, 4, 3, 1, 0),
    case(1, 3, 5, 9, 10, 3, 2, 0),
    case(3, 5, 7, 7, 6, 1, 1, 0),
    case(3, 5, 7, 7, 6, 1, 2, 0),
    case(1, 4, 5, 9, 3, 1, 1, 1),
    case(3, 9, 8, 6, 11, 3, 2, 1),
    case(1, 3, 3, 3, 2, 3, 1, 0),
    case(3, 2, 4, 5, 3, 2, 3, 2),
    case(1, 1, 2, 2, 3, 3, 1, 1),
    case(4, 13, 28, 28, 10, 3, 1, 1),
    case(5, 17, 14, 14, 9, 3, 2, 1),
    // Stride 1 with output rows of 12 or more and `kw C >= 16`: the shifted GEMMs
    // (`ops::conv::shifted`), with kernels of 3 to 5, padding 0 to 3 (more than the kernel
    // reaches: whole output rows and columns of padding), even kernels and non-square images.
    case(2, 6, 5, 14, 3, 3, 1, 0),
    case(3, 4, 6, 13, 5, 5, 1, 2),
    case(2, 5, 7, 13, 4, 4, 1, 1),
    case(2, 6, 4, 9, 3, 3, 1, 3),
    // 16 or more input channels without shifted GEMMs: channels-last columns, several images per
    // GEMM (`ops::conv::channels_last`; 8 per GEMM on 7x7 outputs, so 11 images make a run of 8
    // and one of 3), a 4x4 / stride-2 kernel on a rectangular image, padding past the kernel's
    // reach, a strided 1x1 kernel and a 1x1 output.
    case(11, 16, 7, 7, 5, 3, 1, 1),
    case(3, 20, 9, 6, 7, 4, 2, 1),
    case(2, 18, 4, 5, 3, 3, 1, 3),
    case(3, 16, 6, 6, 4, 1, 2, 0),
    case(2, 17, 3, 3, 2, 3, 1, 0),
];

fn uniform(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    common::seeded_uniform(seed, shape, lo, hi)
}

/// `max_i |a_i - b_i| / (1e-2 max |b| + |b_i|)`: relative error, with a floor at 1% of the
/// largest reference value for entries that cancel to about zero.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    common::rel_err_floored(a, b, 1e-30)
}

impl Case {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.p - self.k) / self.s + 1,
            (self.w + 2 * self.p - self.k) / self.s + 1,
        )
    }

    fn inputs(&self, seed: u64) -> (Tensor, Tensor, Tensor) {
        (
            uniform(seed, &[self.b, self.c, self.h, self.w], -1.0, 1.0),
            uniform(seed + 1, &[self.o, self.c, self.k, self.k], -0.5, 0.5),
            uniform(seed + 2, &[self.o], -0.5, 0.5),
        )
    }

    /// The definition of the convolution, in f64, on flat row-major data.
    fn direct(&self, x: &[f64], w: &[f64], bias: &[f64]) -> Vec<f64> {
        let (ho, wo) = self.out();
        let Case {
            b,
            c,
            h,
            w: wd,
            o,
            k,
            s,
            p,
        } = *self;
        let mut y = vec![0f64; b * o * ho * wo];
        for bi in 0..b {
            for oi in 0..o {
                for yi in 0..ho {
                    for zi in 0..wo {
                        let mut acc = bias[oi];
                        for ci in 0..c {
                            for i in 0..k {
                                for j in 0..k {
                                    let (r, q) = (
                                        (yi * s + i) as isize - p as isize,
                                        (zi * s + j) as isize - p as isize,
                                    );
                                    if r < 0 || q < 0 || r >= h as isize || q >= wd as isize {
                                        continue;
                                    }
                                    acc += x[((bi * c + ci) * h + r as usize) * wd + q as usize]
                                        * w[((oi * c + ci) * k + i) * k + j];
                                }
                            }
                        }
                        y[((bi * o + oi) * ho + yi) * wo + zi] = acc;
                    }
                }
            }
        }
        y
    }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    flat_f32(t).into_iter().map(f64::from).collect()
}

#[test]
fn forward_matches_candle_and_the_definition() {
    for (n, cs) in CASES.iter().enumerate() {
        let (x, w, b) = cs.inputs(100 + 10 * n as u64);
        let (ho, wo) = cs.out();
        for bias in [Some(&b), None] {
            let y = conv2d(&x, &w, bias, cs.s, cs.p).unwrap();
            assert_eq!(y.dims(), [cs.b, cs.o, ho, wo], "{cs:?}");
            assert!(y.is_contiguous(), "{cs:?}");
            let reference = conv2d_slow(&x, &w, bias, cs.s, cs.p).unwrap();
            let e = rel_err(&flat_f32(&y), &flat_f32(&reference));
            assert!(
                e < 1e-4,
                "{cs:?} bias {}: {e} against candle",
                bias.is_some()
            );
            let bias64 = bias.map_or(vec![0f64; cs.o], f64s);
            let direct = cs.direct(&f64s(&x), &f64s(&w), &bias64);
            let direct: Vec<f32> = direct.iter().map(|v| *v as f32).collect();
            let e = rel_err(&flat_f32(&y), &direct);
            assert!(e < 1e-4, "{cs:?}: {e} against the definition");
        }
    }
}

#[test]
fn columns_of_32_mib_and_more_give_the_same_result() {
    // 288 x 36 x 28 x 28 columns: 32.5 MB, allocated with huge-page advice.
    let cs = case(36, 32, 28, 28, 8, 3, 1, 1);
    let (x, w, b) = cs.inputs(900);
    let y = conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap();
    let reference = conv2d_slow(&x, &w, Some(&b), cs.s, cs.p).unwrap();
    let e = rel_err(&flat_f32(&y), &flat_f32(&reference));
    assert!(e < 1e-4, "{e}");
}

#[test]
fn a_strided_input_view_gives_the_same_result() {
    let cs = case(3, 5, 7, 9, 4, 3, 2, 1);
    let (x, w, b) = cs.inputs(7);
    // The same values, stored (B, C, W, H) and viewed transposed.
    let xt = x
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!xt.is_contiguous());
    let a = conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap();
    let v = conv2d(&xt, &w, Some(&b), cs.s, cs.p).unwrap();
    assert_eq!(flat_f32(&a), flat_f32(&v));
}

/// The gradients of `sum(ours * r)` and `sum(theirs * r)` with respect to each of `vars` agree
/// to a relative error of 1e-4.
fn assert_same_gradients(
    ours: &Tensor,
    theirs: &Tensor,
    r: &Tensor,
    vars: [(&str, &Var); 3],
    what: &str,
) {
    let grads = |t: &Tensor| (t * r).unwrap().sum_all().unwrap().backward().unwrap();
    let (g_ours, g_theirs) = (grads(ours), grads(theirs));
    for (name, v) in vars {
        let a = g_ours.get(v.as_tensor()).unwrap();
        let t = g_theirs.get(v.as_tensor()).unwrap();
        assert_eq!(a.dims(), v.dims());
        let e = rel_err(&flat_f32(a), &flat_f32(t));
        assert!(e < 1e-4, "{what} d{name}: {e}");
    }
}

#[test]
fn gradients_match_candles_conv2d_backward() {
    // Including the shapes whose height and width leave different remainders of the stride, on
    // which the released candle's backward took the output padding of its transposed convolution
    // from the height alone (the vendored copy crops or pads the width: GENTRAIN.md).
    for (n, cs) in CASES.iter().enumerate() {
        let (x, w, b) = cs.inputs(300 + 10 * n as u64);
        let (x, w, b) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let (ho, wo) = cs.out();
        let r = uniform(301 + 10 * n as u64, &[cs.b, cs.o, ho, wo], -1.0, 1.0);
        let ours = conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap();
        let theirs = conv2d_slow(&x, &w, Some(&b), cs.s, cs.p).unwrap();
        let what = format!("{cs:?}");
        assert_same_gradients(&ours, &theirs, &r, [("x", &x), ("w", &w), ("b", &b)], &what);
    }
}

#[test]
fn gradients_match_central_differences_of_the_f64_definition() {
    // sum(conv2d(x, w, b) * r) is linear in each of x, w and b, so central differences of its
    // f64 definition are exact up to f64 rounding: they check the f32 gradients to ~1e-6.
    for (seed, cs) in [
        (1u64, case(2, 2, 5, 4, 3, 3, 2, 1)),
        (2, case(1, 3, 4, 6, 2, 3, 1, 1)),
        (3, case(2, 3, 3, 5, 2, 1, 1, 0)),
        (4, case(1, 2, 4, 5, 2, 2, 3, 2)),
    ] {
        let (x, w, b) = cs.inputs(seed);
        let (ho, wo) = cs.out();
        let r = uniform(seed + 3, &[cs.b, cs.o, ho, wo], -1.0, 1.0);
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let y = conv2d(&xv, &wv, Some(&bv), cs.s, cs.p).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (x0, w0, b0, r0) = (f64s(&x), f64s(&w), f64s(&b), f64s(&r));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            cs.direct(x, w, b).iter().zip(&r0).map(|(y, r)| y * r).sum()
        };
        let checks: [(&str, &Var, Vec<f64>); 3] = [
            ("x", &xv, {
                let idx: Vec<usize> = (0..x0.len()).collect();
                central_differences(|v: &[f64]| loss(v, &w0, &b0), &x0, &idx, 1e-3)
            }),
            ("w", &wv, {
                let idx: Vec<usize> = (0..w0.len()).collect();
                central_differences(|v: &[f64]| loss(&x0, v, &b0), &w0, &idx, 1e-3)
            }),
            ("b", &bv, {
                let idx: Vec<usize> = (0..b0.len()).collect();
                central_differences(|v: &[f64]| loss(&x0, &w0, v), &b0, &idx, 1e-3)
            }),
        ];
        for (name, var, fd) in checks {
            let analytic = flat_f32(g.get(var.as_tensor()).unwrap());
            for (i, (a, d)) in analytic.iter().zip(&fd).enumerate() {
                assert!(
                    (*a as f64 - d).abs() <= 1e-5 * (1.0 + d.abs()),
                    "{cs:?} d{name}[{i}]: {a} vs central difference {d}"
                );
            }
        }
    }
}

/// `<a, b>` in f64, and `sum |a_i b_i|` (the scale of its rounding).
fn dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (x, y)| {
        let p = *x as f64 * *y as f64;
        (s + p, m + p.abs())
    })
}

#[test]
fn im2col_and_col2im_are_adjoint() {
    for (n, cs) in CASES
        .iter()
        .chain(&[case(2, 3, 9, 7, 1, 1, 3, 0), case(2, 3, 9, 7, 1, 2, 3, 1)])
        .enumerate()
    {
        let dims = (cs.b, cs.c, cs.h, cs.w);
        let x = uniform(500 + n as u64, &[cs.b, cs.c, cs.h, cs.w], -1.0, 1.0);
        let cols = im2col(&x, cs.k, cs.k, cs.s, cs.p).unwrap();
        let (ho, wo) = cs.out();
        assert_eq!(cols.dims(), [cs.c * cs.k * cs.k, cs.b * ho * wo], "{cs:?}");
        let c = uniform(600 + n as u64, cols.dims(), -1.0, 1.0);
        let back = col2im(&c, dims, cs.k, cs.k, cs.s, cs.p).unwrap();
        assert_eq!(back.dims(), x.dims());
        let (lhs, scale) = dot(&flat_f32(&cols), &flat_f32(&c));
        let (rhs, _) = dot(&flat_f32(&x), &flat_f32(&back));
        assert!((lhs - rhs).abs() <= 1e-6 * scale, "{cs:?}: {lhs} vs {rhs}");
    }
}

#[test]
fn im2col_and_col2im_are_each_others_backward() {
    for cs in [case(2, 3, 7, 5, 1, 3, 2, 1), case(1, 2, 6, 6, 1, 3, 1, 1)] {
        let dims = (cs.b, cs.c, cs.h, cs.w);
        let x = Var::from_tensor(&uniform(1, &[cs.b, cs.c, cs.h, cs.w], -1.0, 1.0)).unwrap();
        let cols = im2col(&x, cs.k, cs.k, cs.s, cs.p).unwrap();
        let c = Var::from_tensor(&uniform(2, cols.dims(), -1.0, 1.0)).unwrap();
        // d/dx <im2col(x), c> = col2im(c)
        let g = (cols * c.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = col2im(&c, dims, cs.k, cs.k, cs.s, cs.p).unwrap();
        assert_eq!(flat_f32(g.get(x.as_tensor()).unwrap()), flat_f32(&want));
        // d/dc <col2im(c), x> = im2col(x)
        let back = col2im(&c, dims, cs.k, cs.k, cs.s, cs.p).unwrap();
        let g = (back * x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = im2col(&x, cs.k, cs.k, cs.s, cs.p).unwrap();
        assert_eq!(flat_f32(g.get(c.as_tensor()).unwrap()), flat_f32(&want));
    }
}

/// A NaN or infinity in the input or in the kernel makes non-finite exactly the gradients that
/// candle's convolution (`conv2d_slow`) makes non-finite. The shifted GEMMs (stride 1, rows of 12
/// or more) once multiplied the zeros of their wide grid's extra columns by pixels and weights, so
/// a bad pixel in an edge column reached weight gradients of kernel columns that never read it.
#[test]
fn non_finite_inputs_and_weights_reach_exactly_the_gradients_that_read_them() {
    let cases = [
        case(2, 8, 28, 28, 4, 3, 1, 1),
        case(2, 16, 16, 16, 3, 3, 1, 1),
        case(2, 6, 5, 14, 3, 3, 1, 0),
        case(2, 4, 6, 13, 3, 5, 1, 2),
        case(3, 16, 7, 7, 3, 3, 1, 1),
        case(2, 5, 9, 9, 3, 3, 2, 1),
    ];
    let non_finite =
        |t: &Tensor| -> Vec<bool> { flat_f32(t).iter().map(|v| !v.is_finite()).collect() };
    for (n, cs) in cases.iter().enumerate() {
        let (x, w, b) = cs.inputs(1200 + n as u64);
        let spots = [
            (0, 0, cs.h / 2, 0),
            (cs.b - 1, cs.c - 1, cs.h - 1, cs.w - 1),
            (1, 1, 0, cs.w / 2),
        ];
        for (s, &(b0, c0, h0, w0)) in spots.iter().enumerate() {
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][s];
            // A bad pixel of the input; then a bad weight (with a clean input).
            for in_kernel in [false, true] {
                let (mut xv, mut wv) = (flat_f32(&x), flat_f32(&w));
                if in_kernel {
                    wv[((b0.min(cs.o - 1) * cs.c + c0) * cs.k + cs.k - 1) * cs.k + cs.k - 1] = bad;
                } else {
                    xv[((b0 * cs.c + c0) * cs.h + h0) * cs.w + w0] = bad;
                }
                let xv = Var::from_vec(xv, x.shape(), &Device::Cpu).unwrap();
                let wv = Var::from_vec(wv, w.shape(), &Device::Cpu).unwrap();
                let r = uniform(
                    1300 + n as u64,
                    &[cs.b, cs.o, cs.out().0, cs.out().1],
                    0.5,
                    1.0,
                );
                let grads = |y: Tensor| {
                    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let dx = non_finite(g.get(xv.as_tensor()).unwrap());
                    (dx, non_finite(g.get(wv.as_tensor()).unwrap()))
                };
                let ours = grads(conv2d(&xv, &wv, Some(&b), cs.s, cs.p).unwrap());
                let theirs = grads(conv2d_slow(&xv, &wv, Some(&b), cs.s, cs.p).unwrap());
                let what = format!("{cs:?}, {bad} at {:?} (kernel: {in_kernel})", spots[s]);
                for (name, a, b) in [("dx", &ours.0, &theirs.0), ("dw", &ours.1, &theirs.1)] {
                    let differ = a.iter().zip(b).filter(|(u, v)| u != v).count();
                    assert_eq!(
                        differ,
                        0,
                        "{what}: {name} differs at {differ} of {}",
                        a.len()
                    );
                }
            }
        }
    }
}

#[test]
fn nan_reaches_exactly_the_outputs_whose_receptive_field_holds_it() {
    let cases = [
        case(3, 4, 7, 7, 5, 3, 1, 1),
        case(3, 4, 7, 9, 5, 3, 2, 1),
        case(2, 3, 6, 5, 4, 3, 2, 0),
        case(2, 3, 5, 5, 4, 1, 1, 0),
        case(2, 3, 5, 5, 4, 1, 2, 0),
        case(2, 5, 28, 28, 6, 3, 1, 1),
        case(11, 16, 7, 7, 5, 3, 1, 1),
        case(3, 16, 9, 7, 5, 4, 2, 1),
    ];
    for (n, cs) in cases.iter().enumerate() {
        let (x, w, b) = cs.inputs(700 + n as u64);
        let (ho, wo) = cs.out();
        for (b0, c0, h0, w0) in [
            (0, 0, 0, 0),
            (cs.b - 1, cs.c - 1, cs.h - 1, cs.w - 1),
            (1, 1, cs.h / 2, 1),
        ] {
            let mut xv = flat_f32(&x);
            xv[((b0 * cs.c + c0) * cs.h + h0) * cs.w + w0] = f32::NAN;
            let xn = Tensor::from_vec(xv, x.shape(), &Device::Cpu).unwrap();
            let y = flat_f32(&conv2d(&xn, &w, Some(&b), cs.s, cs.p).unwrap());
            let sees = |o: usize, at: usize| (o * cs.s..o * cs.s + cs.k).contains(&(at + cs.p));
            for bi in 0..cs.b {
                for oi in 0..cs.o {
                    for yi in 0..ho {
                        for zi in 0..wo {
                            let want = bi == b0 && sees(yi, h0) && sees(zi, w0);
                            let v = y[((bi * cs.o + oi) * ho + yi) * wo + zi];
                            assert_eq!(
                                v.is_nan(),
                                want,
                                "{cs:?} NaN at {:?}: output {:?} = {v}",
                                (b0, c0, h0, w0),
                                (bi, oi, yi, zi)
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
    let w_channels = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let small = Tensor::zeros((2, 3, 2, 5), candle_core::DType::F32, &dev).unwrap();
    let b_len = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
    let x3 = Tensor::zeros((3, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let w3 = Tensor::zeros((4, 3, 3), candle_core::DType::F32, &dev).unwrap();
    for f in [conv2d, conv2d_slow] {
        assert!(f(&x, &w, Some(&b), 1, 1).is_ok());
        let bad = [
            ("kernel channels", f(&x, &w_channels, Some(&b), 1, 1)),
            ("input smaller than the kernel", f(&small, &w, None, 1, 0)),
            ("bias length", f(&x, &w, Some(&b_len), 1, 1)),
            ("stride 0", f(&x, &w, None, 0, 1)),
            ("input rank", f(&x3, &w, None, 1, 1)),
            ("kernel rank", f(&x, &w3, None, 1, 1)),
        ];
        for (what, r) in bad {
            assert!(r.is_err(), "{what} accepted");
        }
        let msg = f(&x, &w_channels, None, 1, 1).unwrap_err().to_string();
        assert!(msg.contains("input channels"), "{msg}");
    }
    // Padding makes up for the small input: (2 + 2 - 3) / 1 + 1 = 2 rows.
    assert_eq!(conv2d(&small, &w, None, 1, 1).unwrap().dims(), [2, 4, 2, 5]);
    assert!(im2col(&small, 3, 3, 1, 0).is_err());
    let cols = im2col(&x, 3, 3, 1, 1).unwrap();
    assert!(col2im(&cols, (2, 3, 5, 4), 3, 3, 1, 1).is_err());
    assert!(col2im(&cols.t().unwrap(), (2, 3, 5, 5), 3, 3, 1, 1).is_err());
}

/// The previous CPU path of `conv2d`, composed of public ops: `W (O, K) . im2col(x)` through
/// candle's matmul, `(O, B, Ho, Wo)` moved to `(B, O, Ho, Wo)`, plus the bias.
fn im2col_matmul(x: &Tensor, w: &Tensor, b: &Tensor, s: usize, p: usize) -> Tensor {
    let (o, c, kh, kw) = w.dims4().unwrap();
    let cols = im2col(x, kh, kw, s, p).unwrap();
    let (bn, ho, wo) = (
        x.dim(0).unwrap(),
        (x.dim(2).unwrap() + 2 * p - kh) / s + 1,
        (x.dim(3).unwrap() + 2 * p - kw) / s + 1,
    );
    w.reshape((o, c * kh * kw))
        .unwrap()
        .matmul(&cols)
        .unwrap()
        .reshape((o, bn, ho, wo))
        .unwrap()
        .permute((1, 0, 2, 3))
        .unwrap()
        .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
        .unwrap()
}

#[test]
fn fused_gradients_equal_the_im2col_matmul_composition() {
    // Small shapes, a 1x1 kernel (its columns are the image itself), and two large enough for
    // the images to run in parallel, for the weight gradient to sum partial sums over runs of
    // images, and (for the first: 864 x 784 values) for the columns of one image to take two
    // tiles of the scratch.
    for (n, cs) in [
        case(3, 5, 7, 7, 6, 3, 1, 1),
        case(3, 9, 8, 6, 11, 3, 2, 1),
        case(3, 5, 7, 7, 6, 1, 1, 0),
        case(2, 3, 4, 5, 3, 2, 3, 2),
        case(9, 96, 28, 28, 5, 3, 1, 1),
        case(17, 16, 14, 15, 8, 3, 2, 1),
        case(19, 32, 7, 7, 16, 3, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let (x, w, b) = cs.inputs(800 + 10 * n as u64);
        let (x, w, b) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let (ho, wo) = cs.out();
        let r = uniform(801 + 10 * n as u64, &[cs.b, cs.o, ho, wo], -1.0, 1.0);
        let fused = conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap();
        let composed = im2col_matmul(&x, &w, &b, cs.s, cs.p);
        // Both sum the same products in different orders (stride-1 layers of 12 or more output
        // columns sum one kernel row at a time, `ops::conv::shifted`): the output of the largest
        // case sums 864 of them, its weight gradient 7056, each a few 1e-5 (relative) off the
        // f64 sum.
        let e = rel_err(&flat_f32(&fused), &flat_f32(&composed));
        assert!(e < 1e-4, "{cs:?} y: {e}");
        let g_fused = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_composed = (composed * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let a = g_fused.get(v.as_tensor()).unwrap();
            let t = g_composed.get(v.as_tensor()).unwrap();
            assert_eq!(a.dims(), v.dims());
            let e = rel_err(&flat_f32(a), &flat_f32(t));
            assert!(e < 1e-4, "{cs:?} d{name}: {e}");
        }
    }
}

#[test]
fn only_the_inputs_that_need_a_gradient_get_one() {
    let cs = case(2, 3, 6, 6, 4, 3, 1, 1);
    let (x, w, b) = cs.inputs(950);
    let w = Var::from_tensor(&w).unwrap();
    for bias in [Some(&b), None] {
        let g = conv2d(&x, &w, bias, cs.s, cs.p)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&b).is_none());
        assert!(g.get(w.as_tensor()).is_some());
    }
}

#[test]
fn convolutions_running_at_once_on_the_rayon_pool_match_one_at_a_time() {
    // Each call takes its own scratch tile: run side by side on the pool's threads, with their
    // images in parallel inside, or (two images) one after another with threaded GEMMs, during
    // which rayon may start another of the convolutions on the same thread, they give what they
    // give alone.
    use rayon::prelude::*;
    let shapes = [
        case(2, 64, 28, 28, 32, 3, 1, 1),
        case(8, 16, 14, 14, 8, 3, 1, 1),
        case(8, 8, 28, 28, 16, 3, 2, 1),
        case(4, 32, 7, 7, 4, 1, 1, 0),
        case(24, 16, 7, 7, 8, 3, 1, 1),
    ];
    let run = |i: usize| {
        let cs = shapes[i % shapes.len()];
        let (x, w, b) = cs.inputs(960 + i as u64);
        let (x, w) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        [
            flat_f32(&y),
            flat_f32(g.get(&x).unwrap()),
            flat_f32(g.get(&w).unwrap()),
        ]
    };
    let alone: Vec<_> = (0..16).map(run).collect();
    let together: Vec<_> = (0..16).into_par_iter().map(run).collect();
    assert_eq!(alone, together);
}

/// The transposed convolution (the DCGAN generator's up-sampling, the input gradient of its
/// discriminator's convolutions) against candle's `conv_transpose2d`: forward, and the gradients
/// of all three arguments, on the shapes whose forward convolution maps back exactly.
#[test]
fn transposed_convolution_matches_candles_forward_and_backward() {
    // (batch, C_in, H_in, W_in, C_out, kernel, stride, padding)
    let cases = [
        (2, 3, 7, 7, 5, 4, 2, 1),
        (3, 8, 7, 5, 1, 4, 2, 1),
        (1, 2, 4, 6, 3, 3, 1, 1),
        (4, 6, 14, 14, 3, 4, 2, 1),
        (2, 5, 3, 3, 4, 3, 2, 0),
        // The DCGAN generator's 4x4 / stride-2 up-sampling with 16 or more output channels:
        // the input gradient of a channels-last convolution.
        (5, 12, 4, 5, 16, 4, 2, 1),
    ];
    for (n, &(bs, ci, hi, wi, co, k, s, p)) in cases.iter().enumerate() {
        let seed = 900 + 10 * n as u64;
        let y = Var::from_tensor(&uniform(seed, &[bs, ci, hi, wi], -1.0, 1.0)).unwrap();
        let w = Var::from_tensor(&uniform(seed + 1, &[ci, co, k, k], -0.5, 0.5)).unwrap();
        let b = Var::from_tensor(&uniform(seed + 2, &[co], -0.5, 0.5)).unwrap();
        let ours = conv_transpose2d(&y, &w, Some(&b), s, p).unwrap();
        let theirs = conv_transpose2d_slow(&y, &w, Some(&b), s, p).unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "case {n}");
        assert_eq!(ours.dim(2).unwrap(), (hi - 1) * s + k - 2 * p, "case {n}");
        let e = rel_err(&flat_f32(&ours), &flat_f32(&theirs));
        assert!(e < 1e-5, "case {n} forward: {e}");
        let r = uniform(seed + 3, ours.dims(), -1.0, 1.0);
        let what = format!("case {n}");
        assert_same_gradients(&ours, &theirs, &r, [("y", &y), ("w", &w), ("b", &b)], &what);
    }
    // Mismatched channels and a bias of the wrong length are errors.
    let y = uniform(1, &[1, 3, 5, 5], -1.0, 1.0);
    let w = uniform(2, &[4, 2, 4, 4], -1.0, 1.0);
    assert!(conv_transpose2d(&y, &w, None, 2, 1).is_err());
    let w = uniform(2, &[3, 2, 4, 4], -1.0, 1.0);
    let b = uniform(3, &[3], -1.0, 1.0);
    assert!(conv_transpose2d(&y, &w, Some(&b), 2, 1).is_err());
    assert!(conv_transpose2d(&y, &w, Some(&b.narrow(0, 0, 2).unwrap()), 2, 1).is_ok());
}

/// The activation fused into the convolution, into the transposed convolution and into a channel
/// bias against the separate ops (forward, and the gradients of every argument), on the shapes of
/// the DCGAN players (4x4, stride 2) and on others, with inputs that put values on both sides of
/// zero; NaN propagates through every activation as through the separate ops.
#[test]
fn fused_activations_match_the_separate_ops() {
    let acts = [
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Tanh,
        Activation::Softplus,
        Activation::Identity,
    ];
    for (n, cs) in [
        case(3, 1, 28, 28, 8, 4, 2, 1),
        case(4, 8, 14, 14, 16, 4, 2, 1),
        case(3, 5, 5, 9, 7, 3, 2, 1),
        case(2, 3, 7, 7, 5, 3, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        for (a, &act) in acts.iter().enumerate() {
            let seed = 2000 + 100 * n as u64 + 10 * a as u64;
            let (x, w, b) = cs.inputs(seed);
            let (x, w, b) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let what = format!("{cs:?} {act:?}");
            let ours = conv2d_act(&x, &w, Some(&b), cs.s, cs.p, act).unwrap();
            let theirs = act
                .apply_slow(&conv2d(&x, &w, Some(&b), cs.s, cs.p).unwrap())
                .unwrap();
            let e = rel_err(&flat_f32(&ours), &flat_f32(&theirs));
            assert!(e < 1e-4, "{what} conv2d_act forward: {e}");
            let r = uniform(seed + 7, ours.dims(), -1.0, 1.0);
            let vars = [("x", &x), ("w", &w), ("b", &b)];
            assert_same_gradients(&ours, &theirs, &r, vars, &format!("conv2d_act {what}"));

            // The transposed convolution from the output's shape, with a bias per input channel.
            let y = Var::from_tensor(&uniform(seed + 3, ours.dims(), -1.0, 1.0)).unwrap();
            let bt = Var::from_tensor(&uniform(seed + 4, &[cs.c], -0.5, 0.5)).unwrap();
            let ours = conv_transpose2d_act(&y, &w, Some(&bt), cs.s, cs.p, act).unwrap();
            let theirs = act
                .apply_slow(&conv_transpose2d_slow(&y, &w, Some(&bt), cs.s, cs.p).unwrap())
                .unwrap();
            let e = rel_err(&flat_f32(&ours), &flat_f32(&theirs));
            assert!(e < 1e-4, "{what} conv_transpose2d_act forward: {e}");
            let r = uniform(seed + 8, ours.dims(), -1.0, 1.0);
            let vars = [("y", &y), ("w", &w), ("b", &bt)];
            let label = format!("conv_transpose2d_act {what}");
            assert_same_gradients(&ours, &theirs, &r, vars, &label);

            // The channel bias alone, and NaN through it.
            let ours = channel_bias_act(&x, &bt, act).unwrap();
            let bias = bt.reshape((1, cs.c, 1, 1)).unwrap();
            let theirs = act.apply_slow(&x.broadcast_add(&bias).unwrap()).unwrap();
            let e = rel_err(&flat_f32(&ours), &flat_f32(&theirs));
            assert!(e < 1e-4, "{what} channel_bias_act forward: {e}");
            let r = uniform(seed + 9, ours.dims(), -1.0, 1.0);
            let vars = [("x", &x), ("b", &bt), ("x", &x)];
            let label = format!("channel_bias_act {what}");
            assert_same_gradients(&ours, &theirs, &r, vars, &label);
        }
    }
    // NaN in the input reaches exactly the outputs it feeds, for every activation.
    let x = Tensor::new(&[[[[f32::NAN, -1.0], [0.5, 2.0]]]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.25f32], &Device::Cpu).unwrap();
    for act in acts {
        let y = flat_f32(&channel_bias_act(&x, &b, act).unwrap());
        assert!(y[0].is_nan(), "{act:?}: {y:?}");
        assert!(y[1..].iter().all(|v| v.is_finite()), "{act:?}: {y:?}");
    }
    // A bias that is not one value per channel, and an input that is not (B, C, H, W).
    assert!(channel_bias_act(
        &x,
        &Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        Activation::Relu
    )
    .is_err());
    assert!(channel_bias_act(&x.flatten_all().unwrap(), &b, Activation::Relu).is_err());
}
