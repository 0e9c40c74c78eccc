//! `trainer plot`: redraws a run directory's training curves.

use anyhow::{Context, Result};

use crate::cli::PlotArgs;

/// Writes `RUN_DIR/curves.png` from `RUN_DIR/metrics.jsonl` and names the file.
///
/// # Errors
/// An unreadable or malformed `metrics.jsonl`, or a PNG that cannot be written.
pub(crate) fn run(a: &PlotArgs) -> Result<()> {
    crate::report::plot::write_training_curves(&a.run)?;
    outln!("wrote {}", a.run.join("curves.png").display());
    Ok(())
}
