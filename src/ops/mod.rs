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

/// Element count above which CPU kernels split their rows across the rayon pool.
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

/// Mutable variant of [`slice`].
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
    if out.len() >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        let rows_per_task = (PAR_THRESHOLD / row).max(1);
        out.par_chunks_mut(rows_per_task * row)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, r) in chunk.chunks_mut(row).enumerate() {
                    f(c * rows_per_task + i, r)
                }
            });
    } else {
        for (i, r) in out.chunks_mut(row).enumerate() {
            f(i, r)
        }
    }
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
