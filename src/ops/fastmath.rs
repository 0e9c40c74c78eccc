//! Branch-free, vectorizable f32 transcendental functions for the fused CPU kernels. libm's
//! `expf`/`log1pf`/`tanhf` are scalar calls; these compile to SIMD loops.
//!
//! - `exp` on `x <= 0`: Cody-Waite range reduction `x = n ln 2 + r` and the degree-5 minimax
//!   polynomial of Cephes' `expf` (relative error about 2e-7 on [-87, 0]);
//! - `ln(1 + t)` on `t in [0, 1]`: `2 atanh(s)`, `s = t / (2 + t) <= 1/3`, by its odd series to s^15
//!   (relative error below 1e-7, exact for tiny t);
//! - softplus, sigmoid and tanh built from those, each stable at both tails.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for `x <= 0` (inputs above 0 are clamped to 0; below -87.3 give 0). NaN gives NaN, as
/// in libm: the clamp is written so that a NaN input is not mapped to 0 (`f32::min` would).
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    exp(if x > 0.0 { 0.0 } else { x })
}

/// `ln f32::MAX`: above it `e^x` overflows to `+inf`.
const EXP_OVERFLOW: f32 = 88.722_83;

/// `e^x` with IEEE semantics at the edges, like CUDA's `expf` and libm: exactly 0 below -87.3
/// (where f32 leaves normal numbers), so a log-weight of `-inf` gets a weight of exactly 0;
/// `+inf` above `ln f32::MAX` (88.72); NaN for NaN. In the last octave before overflow, where
/// `2^n` itself (n = 128) does not fit an f32, the result is scaled by `2^127` and doubled.
/// Branch-free (selects only), so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let underflow = x < -87.3;
    let overflow = x > EXP_OVERFLOW;
    let x = x.clamp(-87.3, EXP_OVERFLOW);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let n1 = n.min(127.0);
    let v = f32::from_bits(exponent_bits(n1)) * e;
    let v = if n > n1 { v * 2.0 } else { v };
    if underflow {
        0.0
    } else if overflow {
        f32::INFINITY
    } else {
        v
    }
}

/// `1.5 2^23`: adding it to an integer-valued `n` with `|n| < 2^22` leaves `n` in the low bits of
/// the sum's mantissa (two's complement for negative `n`).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The bits of `2^n` for an integer-valued `n` in `[-127, 127]` (`-127` gives 0), by the
/// round-to-integer trick rather than `n as i32`: Rust's saturating float-to-int conversion has
/// no AVX2 instruction and made every loop over [`exp`] scalar (one conversion, two compares and
/// an insert per lane: a tenth of a DDPM U-Net training step in the GroupNorm + SiLU op). For a
/// NaN `n` the bits are unspecified; [`exp`] then multiplies them by a NaN.
#[inline(always)]
fn exponent_bits(n: f32) -> u32 {
    let low = (n + ROUND_MAGIC)
        .to_bits()
        .wrapping_sub(ROUND_MAGIC.to_bits());
    low.wrapping_add(127) << 23
}

/// `ln(1 + t)` for `t` in `[0, 1]`.
#[inline(always)]
pub fn ln_1p_unit(t: f32) -> f32 {
    let s = t / (2.0 + t);
    let s2 = s * s;
    let series =
        ((((((s2 / 15.0 + 1.0 / 13.0) * s2 + 1.0 / 11.0) * s2 + 1.0 / 9.0) * s2 + 1.0 / 7.0) * s2
            + 0.2)
            * s2
            + 1.0 / 3.0)
            * s2
            + 1.0;
    2.0 * s * series
}

/// `ln(1 + e^l) = max(l, 0) + ln(1 + e^{-|l|})`.
#[inline(always)]
pub fn softplus(l: f32) -> f32 {
    l.max(0.0) + ln_1p_unit(exp_nonpos(-l.abs()))
}

/// `1 / (1 + e^{-l})`, via `e = e^{-|l|}`.
#[inline(always)]
pub fn sigmoid(l: f32) -> f32 {
    let e = exp_nonpos(-l.abs());
    let inv = 1.0 / (1.0 + e);
    if l >= 0.0 {
        inv
    } else {
        e * inv
    }
}

/// `tanh(a)`: a Taylor polynomial near 0, `sign(a) (1 - e) / (1 + e)` with `e = e^{-2|a|}` elsewhere.
#[inline(always)]
pub fn tanh(a: f32) -> f32 {
    let e = exp_nonpos(-2.0 * a.abs());
    let big = ((1.0 - e) / (1.0 + e)).copysign(a);
    let a2 = a * a;
    let small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))));
    if a.abs() < 0.1 {
        small
    } else {
        big
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 1e-3)
    }

    #[test]
    fn exponent_bits_are_those_of_the_integer_conversion() {
        // The same bits as `(n as i32 + 127) << 23` on every exponent `exp` can reach, so every
        // result of `exp` (and of what is built on it) is unchanged.
        for n in -127..=127 {
            let want = ((n + 127) as u32) << 23;
            assert_eq!(exponent_bits(n as f32), want, "2^{n}");
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_accurate_on_the_negative_axis() {
        for x in grid().filter(|x| *x <= 0.0 && *x > -87.0) {
            let (a, b) = (exp_nonpos(x) as f64, (x as f64).exp());
            assert!(((a - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-1000.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn exp_is_accurate_on_the_positive_axis() {
        for x in grid().filter(|x| *x >= 0.0 && *x < 88.0) {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            assert!(((a - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
        }
        // The last octave before overflow, where 2^n alone would not fit an f32.
        for i in 0..=1000 {
            let x = 88.0 + i as f32 * (EXP_OVERFLOW - 88.0) / 1000.0;
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            assert!(((a - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
        }
    }

    #[test]
    fn non_finite_and_overflowing_arguments_follow_ieee() {
        // The GPU's expf is the other side of every device check: the two must agree.
        for x in [88.73f32, 100.0, 1e30, f32::INFINITY] {
            assert_eq!(exp(x), f32::INFINITY, "exp({x})");
            assert_eq!(x.exp(), f32::INFINITY);
        }
        assert!(exp(f32::NAN).is_nan() && exp_nonpos(f32::NAN).is_nan());
        assert!(
            softplus(f32::NAN).is_nan(),
            "softplus(NaN) = {}",
            softplus(f32::NAN)
        );
        assert!(sigmoid(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softplus_sigmoid_tanh_match_f64_references() {
        for x in grid() {
            let xd = x as f64;
            let sp = xd.max(0.0) + (-xd.abs()).exp().ln_1p();
            assert!(
                (softplus(x) as f64 - sp).abs() <= 2e-7 * (1.0 + sp),
                "softplus({x}) {} vs {sp}",
                softplus(x)
            );
            let sg = 1.0 / (1.0 + (-xd).exp());
            assert!(
                (sigmoid(x) as f64 - sg).abs() <= 3e-7 * sg.max(1e-30) + 1e-37,
                "sigmoid({x}) {} vs {sg}",
                sigmoid(x)
            );
            let th = xd.tanh();
            assert!(
                (tanh(x) as f64 - th).abs() <= 3e-7 * th.abs().max(1e-30) + 1e-37,
                "tanh({x}) {} vs {th}",
                tanh(x)
            );
        }
        assert!(
            softplus(f32::INFINITY).is_infinite()
                && (0.0..1e-37).contains(&softplus(f32::NEG_INFINITY))
        );
    }
}
