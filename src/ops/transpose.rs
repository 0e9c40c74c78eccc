//! Out-of-place transposition of a row-major `f32` matrix, in 8 x 8 blocks held in AVX
//! registers (the classic unpack / shuffle / lane-permute network, e.g. Intel's optimization
//! manual, "8x8 matrix transpose") where the crate is compiled for AVX (x86-64-v3), with a
//! scalar loop for the edges and on other targets. The convolution uses it to go between
//! channels-first `(C, H W)` and channels-last `(H W, C)` images and to turn its accumulated
//! weight gradient around.
//!
//! A transposition only moves values: the result is exact on every input, non-finite ones
//! included.

/// `dst (cols, rows) = src (rows, cols)^T`, both row-major: `dst[c rows + r] = src[r cols + c]`.
///
/// Panics if `src` holds fewer than `rows cols` values or `dst` fewer than `cols rows`.
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    for r0 in (0..r8).step_by(8) {
        for c0 in (0..c8).step_by(8) {
            // SAFETY: rows r0..r0 + 8 and columns c0..c0 + 8 lie inside both matrices, whose
            // lengths were checked above; AVX is enabled at compile time.
            unsafe { block8(src, rows, cols, r0, c0, dst) };
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    scalar(src, rows, cols, 0..r8, 0..c8, dst);
    scalar(src, rows, cols, 0..r8, c8..cols, dst);
    scalar(src, rows, cols, r8..rows, 0..cols, dst);
}

/// The transposition of the block `rs x cs` of `src (rows, cols)` into `dst (cols, rows)`.
fn scalar(
    src: &[f32],
    rows: usize,
    cols: usize,
    rs: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    for r in rs {
        let row = &src[r * cols..][..cols];
        for c in cs.clone() {
            dst[c * rows + r] = row[c];
        }
    }
}

/// One 8 x 8 block from row `r0`, column `c0` of `src (rows, cols)` into `dst (cols, rows)`.
///
/// # Safety
/// `r0 + 8 <= rows`, `c0 + 8 <= cols`, `src.len() >= rows cols`, `dst.len() >= rows cols`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
#[inline(always)]
unsafe fn block8(src: &[f32], rows: usize, cols: usize, r0: usize, c0: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let s = src.as_ptr().add(r0 * cols + c0);
    let row = |i: usize| _mm256_loadu_ps(s.add(i * cols));
    let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
    let (a4, a5, a6, a7) = (row(4), row(5), row(6), row(7));
    let (t0, t1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
    let (t2, t3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
    let (t4, t5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
    let (t6, t7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let d = dst.as_mut_ptr().add(c0 * rows + r0);
    let out = |j: usize, v: __m256| _mm256_storeu_ps(d.add(j * rows), v);
    out(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
    out(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
    out(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
    out(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
    out(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
    out(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
    out(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
    out(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_transposes_exactly() {
        for (rows, cols) in [
            (1, 1),
            (8, 8),
            (16, 24),
            (7, 9),
            (49, 64),
            (64, 49),
            (13, 8),
            (8, 3),
        ] {
            let src: Vec<f32> = (0..rows * cols)
                .map(|v| match v % 11 {
                    3 => f32::NAN,
                    5 => f32::NEG_INFINITY,
                    7 => -0.0,
                    _ => v as f32 + 0.5,
                })
                .collect();
            let mut dst = vec![1e30f32; rows * cols + 3];
            transpose_into(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    let (a, b) = (src[r * cols + c], dst[c * rows + r]);
                    assert_eq!(a.to_bits(), b.to_bits(), "{rows}x{cols} at ({r}, {c})");
                }
            }
            assert!(
                dst[rows * cols..].iter().all(|v| *v == 1e30),
                "{rows}x{cols}: past the end"
            );
        }
    }
}
