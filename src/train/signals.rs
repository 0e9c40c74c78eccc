//! SIGINT and SIGTERM during training: the first stops the run at a checkpoint, a second one
//! exits at once.

use crate::error::{Error, Result};

/// Registers SIGINT and SIGTERM: the first sets the returned flag, a second one (while the flag
/// is set) exits the process at once with 130 / 143.
pub(super) fn install_signal_handlers() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (sig, code) in [(SIGINT, 130), (SIGTERM, 143)] {
        let io = |e: std::io::Error| Error::Config(format!("cannot install signal handler: {e}"));
        signal_hook::flag::register_conditional_shutdown(sig, code, std::sync::Arc::clone(&flag))
            .map_err(io)?;
        signal_hook::flag::register(sig, std::sync::Arc::clone(&flag)).map_err(io)?;
    }
    Ok(flag)
}
