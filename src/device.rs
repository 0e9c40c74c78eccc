//! Device selection: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. A CUDA device in a build without
//! the `cuda` feature, or one that does not exist, is a clear error, not a panic.

use candle_core::Device;

use crate::error::{Error, Result};

pub use crate::config::{parse_device_spec, DeviceSpec};

/// Opens the requested device.
pub fn open_device(s: &str) -> Result<Device> {
    match parse_device_spec(s)? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => open_cuda(n, s),
    }
}

/// Keeps freed host memory in the process for reuse instead of returning it to the kernel.
///
/// Every candle op allocates a fresh output buffer; with glibc's defaults, buffers above the
/// (dynamic, at most 32 MiB) mmap threshold are mapped and unmapped on every step, and heap tops
/// above the trim threshold are given back, so each step pays page faults to zero the same memory
/// again (about a fifth of the MNIST U-Net's training step on the 2-core development machine:
/// 1.92-1.94 s per step before, 1.55-1.58 s after, `trainer bench --config configs/ddpm-mnist.toml`).
/// The cost is that the process's resident size stays at its peak. Call once, before any
/// threads start; a no-op outside glibc. `MALLOC_*_` environment variables set by the user are
/// respected (this is skipped when any of them is set).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| {
            k.to_str()
                .is_some_and(|k| k.starts_with("MALLOC_") && k.ends_with('_'))
        });
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; called before other threads.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}

/// Whether f32 GEMMs on CUDA may use TF32 tensor cores (`train.tf32`, on by default as for
/// PyTorch's convolutions; off gives full f32 products).
pub fn set_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, s: &str) -> Result<Device> {
    // An explicit stream of its own, not `Device::new_cuda`'s: that one is CUDA's per-thread
    // default stream, which resolves to a different stream on every host thread (rayon workers,
    // the data-parallel backends' threads), and work issued from two threads would then race.
    let dev = Device::new_cuda_with_stream(n).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or("").to_string();
        Error::Device(format!("{s}: cannot open CUDA device: {first}"))
    })?;
    // One stream per device, whichever thread issues the work: candle's per-allocation event
    // tracking only guards cross-stream use, which cannot happen, and costs an event record per
    // tensor.
    // SAFETY: every launch, copy and allocation on this device goes to its single stream.
    let cuda = dev.as_cuda_device()?;
    unsafe { cuda.disable_event_tracking() };
    keep_pool_memory(cuda)?;
    Ok(dev)
}

/// Sets the release threshold of the device's default memory pool to "never": memory freed by
/// one step is kept for the next instead of being returned to the driver at every stream sync
/// (the default threshold is 0), which turns steady-state allocations into pool hits.
#[cfg(feature = "cuda")]
fn keep_pool_memory(cuda: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let stream = cuda.cuda_stream();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle comes from a live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(stream.context().cu_device())
            .map_err(|e| Error::Device(format!("memory pool: {e}")))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(|e| Error::Device(format!("memory pool: {e}")))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize, s: &str) -> Result<Device> {
    Err(Error::Device(format!(
        "{s}: this build has no CUDA support (rebuild with `--features cuda`, see scripts/cuda-toolchain.sh)"
    )))
}

/// Runs `f` with `threads` CPU threads (0: all cores) inside a rayon pool, the calling thread
/// being one of its workers (so parallel kernels do not hand work across threads and wait).
pub fn with_cpu_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let n = set_cpu_threads(threads);
    match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Sets the CPU thread count that candle reads (0: all cores) and returns it. Must be called
/// before any parallel work starts.
pub fn set_cpu_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    };
    // candle sizes its GEMM parallelism from RAYON_NUM_THREADS.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle's own elementwise pool spins while it waits; beside the rayon pool that runs GEMMs
    // and our fused kernels it only competes for the same cores, so it gets no workers unless
    // the user asks otherwise (the vendored candle then hands its large elementwise ops to the
    // caller's rayon pool: vendor/candle-core/GENTRAIN.md).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    n
}
