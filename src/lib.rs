//! gentrain: a trainer for deep generative models on CPU and CUDA, built on candle.
//!
//! The flow of data is one direction: config -> data -> model -> objective -> optimizer ->
//! checkpoint / metrics / samples. See `docs/` for the checkpoint format and the design notes.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod kernel_check;
pub mod launch;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod objectives;
pub mod ops;
pub mod optim;
pub mod report;
pub mod rng;
pub mod samples;
pub mod session;
pub mod train;

pub use error::{Error, Result};
