//! Typed errors of the library. Every failure a user can cause (bad files, bad flags, bad
//! checkpoints, non-finite losses) maps to one variant with a one-line message; the binary turns
//! any of them into exit code 2.

use std::path::PathBuf;

/// Errors returned by the gentrain library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named path.
    ///
    /// The message already holds the I/O error, so it is not also returned as the `source()`
    /// (a context chain printed with `{:#}` would repeat it).
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A malformed IDX data file.
    #[error("{path}: invalid IDX file: {reason}")]
    Idx { path: PathBuf, reason: String },
    /// A data set that is inconsistent or unusable (count mismatch, empty, checksum).
    #[error("data: {0}")]
    Data(String),
    /// A configuration or flag value that is not allowed.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not match the run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A device that does not exist or is not compiled in.
    #[error("device: {0}")]
    Device(String),
    /// The loss or a gradient became NaN or infinite.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// A data-parallel group that cannot form or lost a rank (rendezvous, peer, protocol).
    #[error("distributed: {0}")]
    Distributed(String),
    /// Checks that ran to the end and found disagreements (`trainer check-kernels`); the binary
    /// exits with code 1 for this one, 2 for every other error.
    #[error("{failed} of {total} checks failed")]
    ChecksFailed { failed: usize, total: usize },
    /// An error from the tensor library.
    #[error("tensor: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Wraps a tensor-library error; its text is the message (not also a `source()`, which a
    /// context chain would print twice).
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
