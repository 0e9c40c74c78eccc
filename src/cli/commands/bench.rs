//! `trainer bench` (training throughput of a config) and `trainer bench-kernels` (each fused
//! kernel's bandwidth against a device copy).

use anyhow::{Context, Result};

use crate::cli::output::print_json;
use crate::cli::resolve::resolve_config;
use crate::cli::{BenchArgs, BenchKernelsArgs};

/// Times training steps of the resolved config and prints samples/s (or one JSON object).
///
/// # Errors
/// A config that does not resolve, a failure while training, or a failed write to stdout.
pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    let cfg = resolve_config(&a.flags, None, None)?;
    let r = crate::device::with_cpu_threads(cfg.train.threads, || {
        crate::bench::bench(&cfg, a.steps, a.warmup)
    })?;
    if a.json {
        return print_json(&r);
    }
    outln!(
        "{} {} training step on {} ({} threads), batch {}, k {}: {:.0} samples/s ({:.2} ms/step)",
        r.framework,
        r.family,
        r.device,
        r.threads,
        r.batch,
        r.k,
        r.samples_per_s,
        r.ms_per_step
    );
    Ok(())
}

/// Measures every fused kernel on the device and prints a Markdown table (or one JSON array).
///
/// # Errors
/// An unknown device, a kernel failure, or a failed write to stdout.
pub(crate) fn run_kernels(a: &BenchKernelsArgs) -> Result<()> {
    let device = crate::device::open_device(&a.device)?;
    let r = crate::device::with_cpu_threads(a.threads, || {
        crate::bench::bench_kernels(&device, a.elements, a.repeats)
    })?;
    if a.json {
        return print_json(&r);
    }
    outln!("| kernel | GB/s | fraction of copy | us/call |");
    outln!("| --- | ---: | ---: | ---: |");
    for k in &r {
        outln!(
            "| {} | {:.1} | {:.2} | {:.1} |",
            k.kernel,
            k.gb_per_s,
            k.fraction_of_copy,
            k.microseconds_per_call
        );
    }
    Ok(())
}
