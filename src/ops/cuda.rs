//! Launch glue for the kernels in `cuda/` (compiled to PTX by `build.rs` with the `cuda`
//! feature): contiguous f32 views of candle's CUDA storages, module loading through
//! `CudaDevice::get_or_load_custom_func`, and the two launch shapes the kernels use
//! (grid-stride elementwise, one block per row). With `GENTRAIN_POISON_OUTPUTS=1` every output
//! buffer is filled with NaN before launch, so an element a kernel forgets to write shows up in
//! the GPU tests.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

/// The PTX of each `cuda/*.cu` file, one constant per file.
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Threads per block of every kernel (`GT_BLOCK` in `cuda/common.cuh`).
pub const BLOCK: u32 = 256;

/// The contiguous f32 view a layout describes.
pub fn view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Mutable variant of [`view`].
pub fn view_mut<'a>(s: &'a mut CudaStorage, l: &Layout, op: &str) -> Result<CudaViewMut<'a, f32>> {
    let slice = s.as_cuda_slice_mut::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice_mut(a..b)),
        None => candle_core::bail!("{op}: destination must be contiguous"),
    }
}

/// A loaded kernel and the device's stream (candle's `CudaFunc` is not nameable outside candle).
pub struct Func {
    f: CudaFunction,
    stream: std::sync::Arc<CudaStream>,
}

impl Func {
    /// A launch builder on the device's stream.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.f)
    }
}

/// Loads `name` from the module built from `ptx` (cached by candle per module name).
pub fn func(dev: &CudaDevice, name: &str, module: &str, ptx: &str) -> Result<Func> {
    let f = dev.get_or_load_custom_func(name, &format!("gentrain_{module}"), ptx)?;
    Ok(Func {
        f: f.into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

fn poison() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var("GENTRAIN_POISON_OUTPUTS").is_ok_and(|v| v == "1"))
}

/// An output buffer of `n` floats (NaN-filled when poisoning is on).
pub fn alloc_out(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every kernel writes all `n` outputs; the poison fill below makes that checkable.
    let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
    if poison() {
        dev.memcpy_htod(&vec![f32::NAN; n.max(1)][..], &mut out)?;
    }
    Ok(out)
}

/// Grid-stride elementwise launch over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(BLOCK as u64).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (grid-stride over rows beyond 2^20).
pub fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u64).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Wraps a result buffer as candle storage on `dev`.
pub fn storage(out: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// The device of a storage.
pub fn device(s: &CudaStorage) -> CudaDevice {
    s.device().clone()
}

/// Checks a launch result.
pub fn launched<T>(
    r: std::result::Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(|_| ()).w()
}

/// u32 length argument, with an error instead of truncation.
pub fn u32_len(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!("{what}: {n} does not fit the kernels' u32 sizes"))
    })
}

/// What a row kernel writes: one value per row, or one per element of the first input.
pub enum Output {
    PerRow,
    PerElement,
}

/// Launches `kernel(inputs.., out, rows, d)`, the signature shared by the row reductions and
/// their elementwise backwards, on contiguous f32 inputs; `rows` and `d` come from the first
/// input's shape `(.., d)`, as does the output shape. The last `row_inputs` inputs hold one value
/// per row (e.g. the upstream gradient of a reduction), the others `rows * d`; every input's size
/// is checked against that before launch, so a kernel never reads past a buffer.
pub fn launch_rows(
    op: &str,
    kernel: &str,
    module: &str,
    ptx: &str,
    inputs: &[(&CudaStorage, &Layout)],
    row_inputs: usize,
    output: Output,
) -> Result<(CudaStorage, candle_core::Shape)> {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    let (s0, l0) = inputs[0];
    let dev = device(s0);
    let (rows, d) = super::rows_and_last(l0.shape())?;
    check_input_sizes(op, inputs, row_inputs, rows, d)?;
    let views = inputs
        .iter()
        .map(|(s, l)| view(s, l, op))
        .collect::<Result<Vec<_>>>()?;
    let (r32, d32) = (u32_len(rows, op)?, u32_len(d, op)?);
    let (len, shape, cfg) = match output {
        Output::PerRow => (rows, super::reduced_shape(l0.shape()), per_row(rows)),
        Output::PerElement => (rows * d, l0.shape().clone(), elementwise(rows * d)),
    };
    let out = alloc_out(&dev, len)?;
    let f = func(&dev, kernel, module, ptx)?;
    let mut b = f.builder();
    for v in &views {
        b.arg(v);
    }
    b.arg(&out).arg(&r32).arg(&d32);
    // SAFETY: every caller names a kernel of signature (inputs.., out, u32 rows, u32 d).
    launched(unsafe { b.launch(cfg) })?;
    Ok((storage(out, &dev), shape))
}

/// Checks that the first `inputs.len() - row_inputs` inputs hold `rows * d` values and the rest
/// `rows` (see [`launch_rows`]).
fn check_input_sizes(
    op: &str,
    inputs: &[(&CudaStorage, &Layout)],
    row_inputs: usize,
    rows: usize,
    d: usize,
) -> Result<()> {
    let full = inputs.len().saturating_sub(row_inputs);
    let sizes: Vec<usize> = inputs.iter().map(|(_, l)| l.shape().elem_count()).collect();
    super::check_row_input_sizes(op, &sizes, full, rows, d)
}
