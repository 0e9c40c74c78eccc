//! Models. Each family keeps its parameters in a [`params::ParamStore`] whose names are the
//! PyTorch `state_dict` names of the equivalent module tree (see `docs/checkpoints.md`).

pub mod diffusion;
pub mod flow;
pub mod gan;
pub mod mlp;
pub mod params;
pub mod vae;

pub use diffusion::Diffusion;
pub use flow::Flow;
pub use gan::Gan;
pub use params::ParamStore;
pub use vae::Vae;
