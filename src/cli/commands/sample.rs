//! `trainer sample`: PNG grids of prior samples, reconstructions or latent interpolations.

use anyhow::{bail, Context, Result};

use crate::cli::resolve::with_data_dir;
use crate::cli::{SampleArgs, SampleKind};
use crate::models::Vae;
use crate::session::{LoadedCheckpoint, Model};

/// Writes the grid `--kind` asks for to `--out` and names the file. Prior samples work for
/// every family (a density map for 2-D points); reconstructions and interpolations need a VAE.
///
/// # Errors
/// `--n 0`, an unreadable checkpoint, a grid that would not fit in memory, a VAE trained on 2-D
/// points, a kind the model cannot draw, data that is not what the model was trained on, or a
/// PNG that cannot be written.
pub(crate) fn run(a: &SampleArgs) -> Result<()> {
    let n = a.n.unwrap_or(match a.kind {
        SampleKind::Interpolation => 8,
        _ => 64,
    });
    if n == 0 {
        bail!("--n must be at least 1");
    }
    let device = crate::device::open_device(a.device.as_deref().unwrap_or("cpu"))?;
    let mut ck = crate::session::load_checkpoint(&a.checkpoint, &device)?;
    crate::cli::resolve::apply_sampler_flags(&mut ck, &a.sampler)?;
    let images = match a.kind {
        SampleKind::Interpolation => n.saturating_mul(10),
        _ => n,
    };
    // The samples, the model's activations for them and the grid's pixels at once.
    crate::memory::check(
        &format!("sampling {images} images"),
        crate::memory::f32_bytes(&[images, ck.model.input_dim(), 4]),
    )?;
    if !crate::session::is_image(ck.image_shape) && matches!(ck.model, Model::Vae(_)) {
        bail!("this model was trained on 2-D points, not images");
    }
    crate::device::with_cpu_threads(a.threads.unwrap_or(0), || draw(a, &ck, n))?;
    outln!("wrote {}", a.out.display());
    Ok(())
}

/// Draws the grid of `--kind` for the checkpoint's model into `--out`.
fn draw(a: &SampleArgs, ck: &LoadedCheckpoint, n: usize) -> Result<()> {
    let shape = ck.image_shape;
    match (&ck.model, a.kind) {
        (Model::Vae(model), _) => write_vae_grid(a, ck, model, n)?,
        (Model::Diffusion(m), SampleKind::Trajectory) => {
            if !crate::session::is_image(shape) {
                bail!("--kind trajectory draws images; this model was trained on 2-D points");
            }
            let s = m.sampler_settings();
            crate::samples::write_trajectory(m, &s, &a.out, n, a.seed, shape)?;
        }
        (Model::Gan(_) | Model::Diffusion(_), SampleKind::Prior) => {
            let mut cfg = ck.config.clone();
            cfg.train.seed = a.seed;
            crate::samples::write_model_samples(&ck.model, &cfg, &a.out, n, 0, shape)?;
        }
        (Model::Flow(f), SampleKind::Prior) => {
            let extent = ck
                .config
                .data
                .synthetic()
                .map(|s| s.extent())
                .unwrap_or((-6.0, 6.0));
            crate::samples::write_flow_samples(f, &a.out, n, a.seed, 0, shape, extent)?;
        }
        (Model::Gan(_) | Model::Flow(_) | Model::Diffusion(_), kind) => bail!(
            "--kind {} needs a model with an encoder (a VAE), or trajectory a diffusion model; this checkpoint is a {}",
            kind.name(),
            ck.config.model.family.as_str()
        ),
    }
    Ok(())
}

/// A VAE's grid: prior samples, or test images beside their reconstructions, or interpolations
/// (these two read the test set, from `--data-dir` when given).
fn write_vae_grid(a: &SampleArgs, ck: &LoadedCheckpoint, model: &Vae, n: usize) -> Result<()> {
    let shape = ck.image_shape;
    match a.kind {
        SampleKind::Prior => crate::samples::write_samples(model, &a.out, n, a.seed, 0, shape)?,
        SampleKind::Trajectory => {
            bail!("--kind trajectory needs a diffusion model; this checkpoint is a vae")
        }
        SampleKind::Reconstructions | SampleKind::Interpolation => {
            let cfg = with_data_dir(ck.config.clone(), a.data_dir.as_deref());
            let data = crate::session::load_datasets_with(&cfg, ck.standardization.as_ref())?;
            ck.check_data(&data)?;
            if let SampleKind::Reconstructions = a.kind {
                crate::samples::write_reconstructions(model, &data.test, &a.out, n, shape)?
            } else {
                crate::samples::write_interpolation(model, &data.test, &a.out, n, 10, shape)?
            }
        }
    }
    Ok(())
}
