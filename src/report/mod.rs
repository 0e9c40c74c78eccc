//! Outputs a person reads: metrics (JSONL and TensorBoard scalars) and PNG image grids.

pub mod json;
pub mod metrics;
pub mod plot;
pub mod png;
pub mod tensorboard;

pub use metrics::MetricsWriter;
