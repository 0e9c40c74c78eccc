//! Fused operations, each a candle `CustomOp` with a CPU forward (the fallback and the reference),
//! a backward built from tensors, and a `_slow` twin composed of plain candle ops that the tests
//! compare against.
//!
//! The models call these ops on every device, so the CPU path runs the same graph as the GPU one.
//! CPU forwards are vectorizable loops over contiguous rows, split across the rayon pool when a
//! tensor is large enough for threads to pay.

pub mod adam;
pub mod bernoulli;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod diffusion;
pub mod fastmath;
pub mod gaussian;
pub mod group_norm;
pub mod linear;
pub mod logsumexp;
pub mod random;
pub mod simd;
pub mod spectral_norm;
pub mod transpose;
pub mod upsample;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// True when the fused ops have a kernel for `device` (the CPU always; CUDA in `cuda` builds).
/// Elsewhere the `_slow` compositions of candle ops run.
pub fn fused_available(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Element count from which CPU kernels split their rows across the rayon pool.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

/// `ln(2 pi)`.
pub const LN_2PI: f32 = 1.837_877_1;

/// The contiguous f32 slice a layout describes inside a CPU storage.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Mutable variant of [`slice()`].
pub(crate) fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_mut_slice(),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{op}: destination must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor; `None` if the tensor is not on the CPU.
pub(crate) fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(Some(f(slice(cpu, layout, "with_cpu")?))),
        _ => Ok(None),
    }
}

/// Splits `out` into rows of `row` elements and runs `f(row_index, row)` on each, in parallel when
/// the whole is large.
pub(crate) fn for_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if row == 0 {
        return;
    }
    let (par, per_task) = row_tasks(out.len(), row);
    let run = |c: usize, chunk: &mut [f32]| {
        for (i, r) in chunk.chunks_mut(row).enumerate() {
            f(c * per_task + i, r)
        }
    };
    if par {
        out.par_chunks_mut(per_task * row)
            .enumerate()
            .for_each(|(c, chunk)| run(c, chunk));
    } else {
        out.chunks_mut(per_task * row)
            .enumerate()
            .for_each(|(c, chunk)| run(c, chunk));
    }
}

/// Whether [`for_rows`] over `len` values in rows of `row` runs on the pool, and the rows of
/// each task.
fn row_tasks(len: usize, row: usize) -> (bool, usize) {
    let par = len >= PAR_THRESHOLD && rayon::current_num_threads() > 1;
    (
        par,
        if par {
            (PAR_THRESHOLD / row).max(1)
        } else {
            len.div_ceil(row).max(1)
        },
    )
}

/// A new buffer of `len` values made by [`for_rows`]: each task zeroes its rows and runs `f`
/// on them. Same as `for_rows(&mut vec![0.0; len], row, f)`, but the zeros are written by the
/// tasks, in parallel and in cache just before `f`, instead of in one pass over the whole buffer
/// on the calling thread while the others wait (see [`filled`]).
pub(crate) fn rows_filled(
    len: usize,
    row: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    if row == 0 {
        return vec![0.0; len];
    }
    let (par, per_task) = row_tasks(len, row);
    filled(len, per_task * row, par, |c, chunk| {
        for (i, r) in chunk.chunks_mut(row).enumerate() {
            f(c * per_task + i, r)
        }
    })
}

/// Buffers of this many bytes or more are advised onto transparent huge pages by [`reserve`].
/// Such buffers are mapped fresh from the kernel (glibc's `mmap` threshold stops growing at 32
/// MiB, unless `device::keep_freed_memory` raised it) and first touched page by page.
pub(crate) const HUGE_PAGE_MIN_BYTES: usize = 32 << 20;

/// An empty vector with room for `len` values. A large one is advised `MADV_HUGEPAGE` before it
/// is written, so that the kernel backs it with 2 MiB pages (where transparent huge pages are
/// `madvise` or `always`): 512 times fewer page faults. For the 115 MB of columns of a 3x3
/// convolution of `(128, 32, 28, 28)` the faults took about 40 of the 95 ms of the forward pass.
pub(crate) fn reserve(len: usize) -> Vec<f32> {
    let v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if len * std::mem::size_of::<f32>() >= HUGE_PAGE_MIN_BYTES {
        const HUGE: usize = 1 << 21;
        let start = v.as_ptr() as usize;
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
    v
}

/// `len` zeros (in a buffer from [`reserve`]).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    let mut v = reserve(len);
    v.resize(len, 0.0);
    v
}

/// A new buffer of `len` values split into chunks of `chunk` values (the last may be shorter):
/// each chunk is zeroed and then passed to `f(chunk_index, chunk)` by the task that fills it, on
/// the rayon pool when `par`, one after another otherwise.
///
/// `vec![0.0; len]` zeroes the whole buffer on the calling thread before any task starts (glibc's
/// `calloc` does a `memset` when it reuses freed memory, which the trainer's allocator settings
/// make the usual case, over memory that is usually out of cache); on the MNIST U-Net those serial passes
/// were about 16 ms of a 320 ms training step, with the other thread idle.
pub(crate) fn filled(
    len: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    filled_map(len, 0, chunk, par, f).0
}

/// [`filled`] that also returns each chunk's `f(..)`, in chunk order, and leaves room for
/// `extra` more values after the `len` it fills (to be pushed without a reallocation).
pub(crate) fn filled_map<R: Send>(
    len: usize,
    extra: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [f32]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    use std::mem::MaybeUninit;
    let mut v = reserve(len + extra);
    let run = |c: usize, part: &mut [MaybeUninit<f32>]| {
        part.fill(MaybeUninit::new(0.0));
        // SAFETY: every value of `part` was initialized just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        f(c, unsafe {
            &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32])
        })
    };
    let spare = &mut v.spare_capacity_mut()[..len];
    let results = match par {
        true => spare
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(c, part)| run(c, part))
            .collect(),
        false => spare
            .chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(c, part)| run(c, part))
            .collect(),
    };
    // SAFETY: the chunks cover `0..len`, and each was initialized by its task.
    unsafe { v.set_len(len) };
    (v, results)
}

/// Whether every value is finite (neither NaN nor infinite). An all-ones exponent marks both;
/// OR-ing the test over `u32` (no early exit) vectorizes.
pub(crate) fn all_finite(v: &[f32]) -> bool {
    v.iter().fold(0u32, |acc, x| {
        acc | ((x.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32
    }) == 0
}

/// Computes one value per row of length `row` with `f(row_index) -> value`, in parallel when the
/// input is large. Used by row reductions.
pub(crate) fn map_rows(
    n_rows: usize,
    row: usize,
    f: impl Fn(usize) -> f32 + Sync + Send,
) -> Vec<f32> {
    if n_rows * row >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        (0..n_rows).into_par_iter().map(f).collect()
    } else {
        (0..n_rows).map(f).collect()
    }
}

pub use fastmath::{sigmoid, softplus};

/// Checks the input sizes of a row kernel: the first `full` inputs must hold `rows * d` values,
/// the others one per row (the launch glue in `cuda.rs` calls this before every row launch).
pub(crate) fn check_row_input_sizes(
    op: &str,
    sizes: &[usize],
    full: usize,
    rows: usize,
    d: usize,
) -> Result<()> {
    for (i, &n) in sizes.iter().enumerate() {
        let want = if i < full { rows * d } else { rows };
        if n != want {
            candle_core::bail!(
                "{op}: input {i} has {n} values, expected {want} ({rows} rows of {d})"
            )
        }
    }
    Ok(())
}

/// Splits a shape `(.., d)` into (rows, d).
pub(crate) fn rows_and_last(shape: &candle_core::Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    let Some(&d) = dims.last() else {
        candle_core::bail!("expected at least one dimension")
    };
    Ok((shape.elem_count() / d.max(1), d))
}

/// Shape of a row reduction of `shape` (drops the last dimension).
pub(crate) fn reduced_shape(shape: &candle_core::Shape) -> candle_core::Shape {
    let dims = shape.dims();
    candle_core::Shape::from(dims[..dims.len().saturating_sub(1)].to_vec())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for op tests: seeded inputs, relative error, finite differences.
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// Seeded uniform tensor in [lo, hi).
    pub fn uniform(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| / (atol + |b|) over elements.
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1e-3 + y.abs()))
            .fold(0.0, f32::max)
    }
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
    fn filled_buffers_are_for_rows_over_zeros() {
        // Rows that `f` leaves alone stay zero; every row gets its own index; the chunks' results
        // come back in order; the spare room is there. Large enough for the pool's tasks.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for (len, row) in [(0, 4), (7, 3), (PAR_THRESHOLD * 3 + 5, 10), (100_003, 1)] {
                let f = |i: usize, r: &mut [f32]| {
                    if i % 3 != 1 {
                        r.iter_mut()
                            .enumerate()
                            .for_each(|(j, v)| *v = (i * 7 + j) as f32);
                    }
                };
                let mut want = vec![0f32; len];
                for_rows(&mut want, row, f);
                assert_eq!(rows_filled(len, row, f), want, "{len} {row}");
                for par in [false, true] {
                    let (v, firsts) = filled_map(len, 9, 5 * row, par, |c, chunk| {
                        f(c, chunk);
                        c
                    });
                    assert!(v.capacity() >= len + 9);
                    assert_eq!(firsts, (0..len.div_ceil(5 * row)).collect::<Vec<_>>());
                    let mut want = vec![0f32; len];
                    want.chunks_mut(5 * row)
                        .enumerate()
                        .for_each(|(c, chunk)| f(c, chunk));
                    assert_eq!(v, want, "{len} {row} {par}");
                }
            }
        });
    }
}
