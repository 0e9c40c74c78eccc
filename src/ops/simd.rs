//! Runtime dispatch of the fused CPU loops to AVX-512.
//!
//! The crate is compiled for x86-64-v3 (AVX2 + FMA, `.cargo/config.toml`) so that the binary runs
//! on every x86 CPU since 2013-2015; the `gemm` crate picks its own kernels at run time. The
//! elementwise and row-reduction loops of the fused ops (GroupNorm + SiLU, ...) are written to
//! vectorize, and on a CPU with full-width AVX-512 units (Zen 4 and 5, Intel server parts) they
//! run about twice as many lanes per instruction when compiled for it. [`wide`] runs a closure
//! through a function compiled with AVX-512 enabled when the CPU has it, and plainly otherwise.
//!
//! The results are bit-identical either way: Rust never reassociates or contracts f32 arithmetic
//! (no fast-math, no implicit FMA), so a wider vector unit computes the same operations in the
//! same order; the loops fix their summation order with explicit partial sums.
//!
//! The closure's body is compiled into the AVX-512 function only as far as it is inlined there:
//! callers pass an `#[inline(always)]` closure that calls `#[inline(always)]` functions (without
//! the attribute on the closure, the AVX-512 function is a jump to the closure compiled for AVX2).

use std::sync::OnceLock;

/// Whether this CPU has the AVX-512 subsets [`wide`] compiles for (F, BW, DQ, VL), tested once.
/// `GENTRAIN_NO_AVX512=1` turns the dispatch off (to compare, or to rule it out).
pub fn avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        if std::env::var_os("GENTRAIN_NO_AVX512").is_some_and(|v| v == "1") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `f()`, compiled with AVX-512 when [`avx512`] holds.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU supports every feature this function is compiled for (tested above).
            return unsafe { wide_avx512(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn wide_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
