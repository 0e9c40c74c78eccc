//! `trainer check-kernels`: every fused kernel on a device against the CPU reference.

use anyhow::{Context, Result};

use crate::cli::output::print_json;
use crate::cli::CheckKernelsArgs;

/// Runs every check, prints one line each and a tally (or one JSON array).
///
/// # Errors
/// [`crate::error::Error::ChecksFailed`] when any check disagrees (`main` exits with 1), an
/// unknown device, or a failed write to stdout.
pub(crate) fn run(a: &CheckKernelsArgs) -> Result<()> {
    let device = crate::device::open_device(&a.device)?;
    let r = crate::device::with_cpu_threads(0, || crate::kernel_check::run_all(&device));
    if a.json {
        print_json(&r)?;
    } else {
        for c in &r {
            match &c.error {
                None => outln!(
                    "ok    {:<60} max rel err {:.2e} (tol {:.0e})",
                    c.check,
                    c.max_rel_err,
                    c.tolerance
                ),
                Some(e) => outln!("FAIL  {:<60} {e}", c.check),
            }
        }
    }
    let failed = r.iter().filter(|c| !c.passed).count();
    if !a.json {
        outln!("{} passed, {failed} failed", r.len() - failed);
    }
    if failed > 0 {
        return Err(crate::error::Error::ChecksFailed {
            failed,
            total: r.len(),
        }
        .into());
    }
    Ok(())
}
