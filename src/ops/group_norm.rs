//! Group normalization (Wu & He 2018, "Group Normalization", eq. 1-3; PyTorch's
//! `nn.GroupNorm`), optionally preceded by a per-channel shift and followed by SiLU, as one op:
//!
//! `u = x + s[b, c]` (the shift, when given), `y = act(gamma_c (u - mu_bg) / sqrt(var_bg + eps) +
//! beta_c)`, with `mu_bg`, `var_bg` the mean and biased variance of `u` over the channels of group
//! `g` and all positions of sample `b`, and `act` the identity or SiLU `z sigmoid(z)` (Elfwing et
//! al. 2018; Hendrycks & Gimpel's SiLU).
//!
//! This is the `GroupNorm -> SiLU` of every residual block of the DDPM U-Net (Ho et al. 2020,
//! appendix B), and its second one follows the addition of the projected time embedding, which is
//! the shift: in the composition of candle ops the broadcast additions and products of the shift,
//! `gamma`, `beta`, the group mean and the standard deviation each cost a sum over the broadcast
//! dimensions in the backward (candle's serial `sum_keepdim`, a sixth of a training step of
//! `configs/ddpm-mnist.toml`) and an output buffer each.
//!
//! - Forward (CPU): one task per sample; per group, the mean and then the variance of `u` in two
//!   passes accumulated in f64 (as `var` of the centred values, so it is never negative), then the
//!   output in f32.
//! - Backward (CPU), with the forward's `mu` and `rstd` (kept with the op rather than computed
//!   again), `xhat = (u - mu) rstd`, `dz = dy act'(z)`,
//!   `act'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))` for SiLU:
//!   `dbeta_c = sum_{b,p} dz`, `dgamma_c = sum_{b,p} dz xhat`, and per group
//!   `du = rstd (gamma dz - mean(gamma dz) - xhat mean(gamma dz xhat))`; `dx = du`,
//!   `ds[b, c] = sum_p du`. The per-sample partial sums of `dgamma`, `dbeta` are added in sample
//!   order in f64, so the result does not depend on the threads. The gradient is one op over
//!   `(x, params, dy)` whose own backward is an error: a second derivative through this op is
//!   refused rather than silently zero.
//! - Non-finite inputs: a NaN or infinity in a group makes that group's outputs NaN (as in the
//!   composition, whose mean is then NaN or infinite).
//!
//! On devices other than the CPU, [`group_norm`] is [`group_norm_slow`], the composition of candle
//! ops (which there runs candle's kernels). Shapes are checked the same way everywhere.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::fastmath::sigmoid;
use super::slice;

/// The group normalization of `x`, optionally shifted first and followed by SiLU.
///
/// - `x`: `(B, C, H, W)` f32;
/// - `shift`: `None`, or `(B, C)` f32 added to every position of channel `c` of sample `b` before
///   the statistics are taken;
/// - `gamma`, `beta`: `(C,)` f32, the per-channel scale and offset;
/// - `groups` divides `C`; `eps` is added to the variance (PyTorch's default is `1e-5`);
/// - `silu`: apply `z sigmoid(z)` to the result;
///
/// returns `(B, C, H, W)` f32. Differentiable in `x`, `shift`, `gamma` and `beta` (once).
///
/// # Errors
/// Shapes other than these, `groups` of 0 or not dividing `C`, or a dtype other than f32.
pub fn group_norm(
    x: &Tensor,
    shift: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = check("group_norm", x, shift, gamma, beta, groups)?;
    if !x.device().is_cpu() {
        return group_norm_slow(x, shift, gamma, beta, groups, eps, silu);
    }
    let mut parts = Vec::with_capacity(3);
    if let Some(s) = shift {
        parts.push(s.flatten_all()?);
    }
    parts.push(gamma.flatten_all()?);
    parts.push(beta.flatten_all()?);
    let params = Tensor::cat(&parts, 0)?.contiguous()?;
    let op = GroupNorm {
        dims: Dims {
            b,
            c,
            hw: h * w,
            groups,
        },
        eps,
        silu,
        shifted: shift.is_some(),
        saved: Arc::default(),
    };
    x.contiguous()?.apply_op2(&params, op)
}

/// Reference composition of plain candle ops (the group statistics with `mean_keepdim`, broadcast
/// arithmetic, `silu`), the graph of which candle differentiates.
pub fn group_norm_slow(
    x: &Tensor,
    shift: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = check("group_norm_slow", x, shift, gamma, beta, groups)?;
    let u = match shift {
        Some(s) => x.broadcast_add(&s.reshape((b, c, 1, 1))?)?,
        None => x.clone(),
    };
    let g = u.reshape((b, groups, (c / groups) * h * w))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?;
    let z = normed
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
    if silu {
        z.silu()
    } else {
        Ok(z)
    }
}

fn check(
    op: &str,
    x: &Tensor,
    shift: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("{op}: {groups} groups do not divide {c} channels")
    }
    for (name, t, want) in [("gamma", gamma, vec![c]), ("beta", beta, vec![c])]
        .into_iter()
        .chain(shift.map(|s| ("shift", s, vec![b, c])))
    {
        if t.dims() != want.as_slice() {
            candle_core::bail!("{op}: {name} has shape {:?}, expected {want:?}", t.dims())
        }
        if t.dtype() != DType::F32 {
            candle_core::bail!("{op}: {name} must be f32, got {:?}", t.dtype())
        }
    }
    if x.dtype() != DType::F32 {
        candle_core::bail!("{op}: x must be f32, got {:?}", x.dtype())
    }
    Ok((b, c, h, w))
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    hw: usize,
    groups: usize,
}

impl Dims {
    /// Elements of one sample.
    fn sample(&self) -> usize {
        self.c * self.hw
    }
}

/// The forward op over `(x, params)`, `params = [shift (B C) if shifted, gamma (C), beta (C)]`.
#[derive(Debug, Clone)]
struct GroupNorm {
    dims: Dims,
    eps: f64,
    silu: bool,
    shifted: bool,
    /// The statistics `(mean, rstd)` of every `(b, g)` (in that order) that the CPU forward
    /// computed, for the backward of the same call (which gets the same `x` and `params`) to
    /// reuse instead of recomputing them: the same values, two passes over `x` fewer.
    saved: Arc<OnceLock<Vec<(f32, f32)>>>,
}

/// One sample's gradients: `dx` (C H W), `dshift` (C: `ds[b, :]`) and the sample's partial sums
/// of `dgamma` then `dbeta` (2 C, f64).
struct SampleGrads<'a> {
    dx: &'a mut [f32],
    dshift: &'a mut [f32],
    dgb: &'a mut [f64],
}

/// The parameters of one call, split out of the packed `params`.
struct Params<'a> {
    shift: Option<&'a [f32]>,
    gamma: &'a [f32],
    beta: &'a [f32],
}

impl GroupNorm {
    fn params_len(&self) -> usize {
        let d = self.dims;
        2 * d.c + if self.shifted { d.b * d.c } else { 0 }
    }

    fn split<'a>(&self, p: &'a [f32]) -> Result<Params<'a>> {
        if p.len() != self.params_len() {
            candle_core::bail!(
                "gentrain-group-norm: {} parameters, expected {}",
                p.len(),
                self.params_len()
            )
        }
        let c = self.dims.c;
        let (shift, rest) = p.split_at(p.len() - 2 * c);
        Ok(Params {
            shift: self.shifted.then_some(shift),
            gamma: &rest[..c],
            beta: &rest[c..],
        })
    }

    /// The shift of channel `ch` of sample `b` (0 without one).
    fn shift_of(p: &Params, c: usize, b: usize, ch: usize) -> f32 {
        p.shift.map_or(0.0, |s| s[b * c + ch])
    }

    /// Mean and `1 / sqrt(var + eps)` of group `g` of sample `b` (`xs` is the sample): the sum of
    /// `u`, then of `(u - mean)^2`, each in [`LANES`] f32 partial sums per channel that are added
    /// in f64.
    #[inline(always)]
    fn stats(&self, p: &Params, xs: &[f32], b: usize, g: usize) -> (f32, f32) {
        let d = self.dims;
        let cg = d.c / d.groups;
        let n = (cg * d.hw) as f64;
        // Plain loops (not iterator adapters), so that all of it is inlined into the caller's
        // AVX-512 body (`simd::wide`).
        let mut total = 0f64;
        for ch in g * cg..(g + 1) * cg {
            let s = Self::shift_of(p, d.c, b, ch);
            total += lane_sum(&xs[ch * d.hw..(ch + 1) * d.hw], |v| v + s);
        }
        let m = (total / n) as f32;
        let mut sq = 0f64;
        for ch in g * cg..(g + 1) * cg {
            let s = Self::shift_of(p, d.c, b, ch);
            sq += lane_sum(&xs[ch * d.hw..(ch + 1) * d.hw], |v| {
                let e = (v + s) - m;
                e * e
            });
        }
        (m, (1.0 / (sq / n + self.eps).sqrt()) as f32)
    }

    /// Writes sample `b`'s output into `out` (one sample) and its groups' `(mean, rstd)` into
    /// `stats` (one per group).
    #[inline(always)]
    fn forward_sample(
        &self,
        p: &Params,
        xs: &[f32],
        b: usize,
        out: &mut [f32],
        stats: &mut [(f32, f32)],
    ) {
        let d = self.dims;
        let cg = d.c / d.groups;
        for (g, saved) in stats.iter_mut().enumerate().take(d.groups) {
            let (mean, rstd) = self.stats(p, xs, b, g);
            *saved = (mean, rstd);
            for ch in g * cg..(g + 1) * cg {
                let s = Self::shift_of(p, d.c, b, ch);
                let (scale, offset) = (p.gamma[ch], p.beta[ch]);
                let range = ch * d.hw..(ch + 1) * d.hw;
                for (o, &v) in out[range.clone()].iter_mut().zip(&xs[range]) {
                    let z = ((v + s) - mean) * rstd * scale + offset;
                    *o = if self.silu { z * sigmoid(z) } else { z };
                }
            }
        }
    }

    /// Sample `b`'s gradients into `out` (see [`SampleGrads`]); `saved` holds the groups'
    /// `(mean, rstd)` from the forward, or is empty (then they are computed again).
    #[inline(always)]
    fn backward_sample(
        &self,
        p: &Params,
        xs: &[f32],
        dys: &[f32],
        b: usize,
        saved: &[(f32, f32)],
        out: SampleGrads,
    ) {
        let SampleGrads { dx, dshift, dgb } = out;
        let d = self.dims;
        let cg = d.c / d.groups;
        let n = (cg * d.hw) as f64;
        for g in 0..d.groups {
            let (mean, rstd) = match saved.get(g) {
                Some(s) => *s,
                None => self.stats(p, xs, b, g),
            };
            // Pass 1: dz into dx, the channel sums, and the group means of gamma dz (xhat).
            let (mut m1, mut m2) = (0.0f64, 0.0f64);
            for ch in g * cg..(g + 1) * cg {
                let s = Self::shift_of(p, d.c, b, ch);
                let (scale, offset) = (p.gamma[ch], p.beta[ch]);
                let range = ch * d.hw..(ch + 1) * d.hw;
                let (sum_dz, sum_dz_xhat) = dz_row(
                    &mut dx[range.clone()],
                    &xs[range.clone()],
                    &dys[range],
                    |v| ((v + s) - mean) * rstd,
                    |xhat| {
                        if self.silu {
                            let z = xhat * scale + offset;
                            let sig = sigmoid(z);
                            sig * (1.0 + z * (1.0 - sig))
                        } else {
                            1.0
                        }
                    },
                );
                dgb[ch] += sum_dz_xhat;
                dgb[d.c + ch] += sum_dz;
                m1 += scale as f64 * sum_dz;
                m2 += scale as f64 * sum_dz_xhat;
            }
            let (m1, m2) = ((m1 / n) as f32, (m2 / n) as f32);
            // Pass 2: du = rstd (gamma dz - m1 - xhat m2), and its channel sums.
            for (ch, ds) in dshift
                .iter_mut()
                .enumerate()
                .take((g + 1) * cg)
                .skip(g * cg)
            {
                let s = Self::shift_of(p, d.c, b, ch);
                let scale = p.gamma[ch];
                let range = ch * d.hw..(ch + 1) * d.hw;
                *ds = du_row(&mut dx[range.clone()], &xs[range], |dz, v| {
                    let xhat = ((v + s) - mean) * rstd;
                    rstd * (scale * dz - m1 - xhat * m2)
                }) as f32;
            }
        }
    }
}

/// Partial sums per reduction: wide enough for the compiler to keep them in vector registers
/// (one AVX-512 register, two AVX2 ones), so the sums vectorize without reassociating f64 adds.
const LANES: usize = 16;

/// `sum_i f(row_i)`: `LANES` f32 partial sums over the row (at most `ceil(len / LANES)` terms
/// each), added in f64. The order is fixed by the length alone.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail.iter().map(|&v| f(v) as f64).sum::<f64>()
}

/// Writes `dz = dy act'(z)` into `out` (with `xhat = xhat_of(x)`, `act' = dact(xhat)`) and
/// returns `(sum dz, sum dz xhat)`, each as in [`lane_sum`].
#[inline(always)]
fn dz_row(
    out: &mut [f32],
    xs: &[f32],
    dys: &[f32],
    xhat_of: impl Fn(f32) -> f32,
    dact: impl Fn(f32) -> f32,
) -> (f64, f64) {
    let (mut a1, mut a2) = ([0f32; LANES], [0f32; LANES]);
    let full = out.len() / LANES * LANES;
    let (head, tail) = out.split_at_mut(full);
    let chunks = xs.chunks_exact(LANES).zip(dys.chunks_exact(LANES));
    for (o, (xc, dc)) in head.chunks_exact_mut(LANES).zip(chunks) {
        for l in 0..LANES {
            let xhat = xhat_of(xc[l]);
            let dz = dc[l] * dact(xhat);
            o[l] = dz;
            a1[l] += dz;
            a2[l] += dz * xhat;
        }
    }
    let mut t = (0f64, 0f64);
    for ((o, &v), &dy) in tail.iter_mut().zip(&xs[full..]).zip(&dys[full..]) {
        let xhat = xhat_of(v);
        let dz = dy * dact(xhat);
        *o = dz;
        t.0 += dz as f64;
        t.1 += (dz * xhat) as f64;
    }
    let sum = |a: &[f32; LANES]| a.iter().map(|&v| v as f64).sum::<f64>();
    (sum(&a1) + t.0, sum(&a2) + t.1)
}

/// Replaces each `dz` in `dx` by `f(dz, x)` and returns the sum of the new values, as in
/// [`lane_sum`].
#[inline(always)]
fn du_row(dx: &mut [f32], xs: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let full = dx.len() / LANES * LANES;
    let (head, tail) = dx.split_at_mut(full);
    for (c, xc) in head.chunks_exact_mut(LANES).zip(xs.chunks_exact(LANES)) {
        for ((a, o), &v) in acc.iter_mut().zip(c.iter_mut()).zip(xc) {
            *o = f(*o, v);
            *a += *o;
        }
    }
    let mut t = 0f64;
    for (o, &v) in tail.iter_mut().zip(&xs[full..]) {
        *o = f(*o, v);
        t += *o as f64;
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + t
}

impl CustomOp2 for GroupNorm {
    fn name(&self) -> &'static str {
        "gentrain-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let p = self.split(slice(s2, l2, self.name())?)?;
        let d = self.dims;
        if x.len() != d.b * d.sample() {
            candle_core::bail!("{}: x has {} values", self.name(), x.len())
        }
        let (out, stats) = super::filled_map(x.len(), 0, d.sample(), true, |b, o| {
            let xs = &x[b * d.sample()..(b + 1) * d.sample()];
            let mut stats = vec![(0f32, 0f32); d.groups];
            super::simd::wide(
                #[inline(always)]
                || self.forward_sample(&p, xs, b, o, &mut stats),
            );
            stats
        });
        // A second forward of the same op (none in candle) would keep the first's statistics.
        let _ = self.saved.set(stats.concat());
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let fwd = self.clone();
        let all = x.apply_op3(params, &grad.contiguous()?, GroupNormGrad { fwd })?;
        let n = x.elem_count();
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dp = all.narrow(0, n, self.params_len())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// The gradient op over `(x, params, dy)`: returns `[dx (B C H W), dshift (B C) if shifted,
/// dgamma (C), dbeta (C)]` flat, the layout of `(x, params)`.
struct GroupNormGrad {
    fwd: GroupNorm,
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "gentrain-group-norm-grad"
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
        let f = &self.fwd;
        let x = slice(s1, l1, self.name())?;
        let p = f.split(slice(s2, l2, self.name())?)?;
        let dy = slice(s3, l3, self.name())?;
        let d = f.dims;
        let m = d.sample();
        if x.len() != d.b * m || dy.len() != x.len() {
            candle_core::bail!(
                "{}: {} values of x, {} of dy",
                self.name(),
                x.len(),
                dy.len()
            )
        }
        let saved = f.saved.get().map_or(&[][..], |s| s.as_slice());
        // Each sample's task writes its dx and returns its dshift (C) and its partial sums of
        // dgamma and dbeta (2 C, f64); the parameters' gradients are appended after dx.
        let (mut out, per_sample) =
            super::filled_map(x.len(), f.params_len(), m, true, |b, dxb| {
                let r = b * m..(b + 1) * m;
                let (mut dshift, mut dgb) = (vec![0f32; d.c], vec![0f64; 2 * d.c]);
                let saved = saved.get(b * d.groups..(b + 1) * d.groups).unwrap_or(&[]);
                let grads = SampleGrads {
                    dx: dxb,
                    dshift: &mut dshift,
                    dgb: &mut dgb,
                };
                super::simd::wide(
                    #[inline(always)]
                    || f.backward_sample(&p, &x[r.clone()], &dy[r], b, saved, grads),
                );
                (dshift, dgb)
            });
        if f.shifted {
            per_sample
                .iter()
                .for_each(|(ds, _)| out.extend_from_slice(ds));
        }
        for j in 0..2 * d.c {
            out.push(per_sample.iter().map(|(_, dgb)| dgb[j]).sum::<f64>() as f32);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _p: &Tensor,
        _dy: &Tensor,
        _res: &Tensor,
        _g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        candle_core::bail!(
            "{}: the second derivative of group_norm is not implemented",
            self.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::uniform;

    #[test]
    fn the_backward_with_the_forwards_statistics_equals_the_one_that_recomputes_them() {
        for (shifted, silu) in [(true, true), (false, false)] {
            let (b, c, h, w, groups) = (3, 8, 5, 7, 4);
            let x = uniform(1, &[b, c, h, w], -2.0, 3.0);
            let shift = uniform(2, &[b, c], -1.0, 1.0);
            let (gamma, beta) = (uniform(3, &[c], 0.5, 1.5), uniform(4, &[c], -0.5, 0.5));
            let dy = uniform(5, &[b, c, h, w], -1.0, 1.0);
            let mut parts = vec![gamma, beta];
            if shifted {
                parts.insert(0, shift.flatten_all().unwrap());
            }
            let params = Tensor::cat(&parts, 0).unwrap();
            let op = GroupNorm {
                dims: Dims {
                    b,
                    c,
                    hw: h * w,
                    groups,
                },
                eps: 1e-5,
                silu,
                shifted,
                saved: Arc::default(),
            };
            let fresh = op.clone();
            x.apply_op2(&params, op.clone()).unwrap();
            assert_eq!(op.saved.get().map(Vec::len), Some(b * groups));
            let grads = |fwd: GroupNorm| {
                let all = x.apply_op3(&params, &dy, GroupNormGrad { fwd }).unwrap();
                all.to_vec1::<f32>().unwrap()
            };
            let (reused, recomputed) = (grads(op), grads(fresh));
            assert!(reused
                .iter()
                .zip(&recomputed)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
