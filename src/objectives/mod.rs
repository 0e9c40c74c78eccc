//! Objectives of every family, pure functions of what a model pass returns: the ELBO and IWAE
//! bound of the VAE family (`vae`), bits/dim for likelihood models (`flow`), and the GAN
//! losses (`gan`), the diffusion family's simple and hybrid losses and variational bound
//! (`diffusion`).

pub mod diffusion;
pub mod flow;
pub mod gan;
pub mod vae;

pub use flow::{bits_per_dim, bits_per_dim_scale};
pub use vae::*;
