//! One function per command: each takes its parsed flags, resolves them (see
//! [`super::resolve`]), calls the library and prints the outcome on stdout.

pub(crate) mod bench;
pub(crate) mod check_kernels;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod launch;
pub(crate) mod plot;
pub(crate) mod sample;
pub(crate) mod train;
