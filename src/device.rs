//! Device selection: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. A CUDA device in a build without
//! the `cuda` feature, or one that does not exist, is a clear error, not a panic.

use candle_core::Device;

use crate::error::{Error, Result};

/// A parsed device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

/// Parses `cpu | cuda | cuda:N`.
pub fn parse_device_spec(s: &str) -> Result<DeviceSpec> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => Err(Error::Device(format!(
                "unknown device {s:?}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// Opens the requested device.
pub fn open_device(s: &str) -> Result<Device> {
    match parse_device_spec(s)? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => open_cuda(n, s),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, s: &str) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| {
        Error::Device(format!(
            "{s}: cannot open CUDA device: {}",
            e.to_string().lines().next().unwrap_or("")
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize, s: &str) -> Result<Device> {
    Err(Error::Device(format!(
        "{s}: this build has no CUDA support (rebuild with `--features cuda`, see scripts/cuda-toolchain.sh)"
    )))
}

/// Sets the CPU thread count for candle and the rayon pool (0: all cores). Must be called before
/// any parallel work starts.
pub fn set_cpu_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    };
    // candle reads RAYON_NUM_THREADS for its own kernels; the pool below serves ours and gemm.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    rayon::current_num_threads()
}
