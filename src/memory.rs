//! Requests sized by users (samples, rows, importance samples, layer widths) checked against the
//! machine's memory before anything is allocated.
//!
//! Rust aborts the process when an allocation fails (`memory allocation of N bytes failed`, exit
//! 134), where PyTorch raises an error the caller can catch. So every quantity a user sets that
//! scales an allocation is turned into a byte estimate here first, and a request that cannot fit
//! in the memory the system reports as available is refused with exit 2. The estimates are
//! lower bounds (the tensors that must exist at once), so a refusal is certain to be right; a
//! request just under the limit may still run out.

use crate::config::Config;
use crate::error::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes the system reports as available (`MemAvailable` of `/proc/meminfo`), `None` where that
/// cannot be read (then nothing is refused).
pub fn available_bytes() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses `what` when it needs more than `available` bytes (`None` for `needed`: the estimate
/// itself overflowed, which no machine has).
pub fn check_against(what: &str, needed: Option<u128>, available: Option<u128>) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    match needed {
        Some(b) if b <= available => Ok(()),
        Some(b) => Err(Error::Config(format!(
            "{what} needs at least {:.1} GiB of memory, more than the {:.1} GiB available",
            b as f64 / GIB,
            available as f64 / GIB
        ))),
        None => Err(Error::Config(format!(
            "{what} needs more memory than any machine has"
        ))),
    }
}

/// [`check_against`] the memory available now.
pub fn check(what: &str, needed: Option<u128>) -> Result<()> {
    check_against(what, needed, available_bytes())
}

/// `f32` bytes of `counts` multiplied together (`None` on overflow).
pub fn f32_bytes(counts: &[usize]) -> Option<u128> {
    counts
        .iter()
        .try_fold(4u128, |acc, &c| acc.checked_mul(c as u128))
}

/// The widest layer a config's model has (the input included): what one row of activations
/// costs at most per layer.
pub fn widest_layer(cfg: &Config, input_dim: usize) -> usize {
    let m = &cfg.model;
    let layers = m
        .layers
        .iter()
        .flat_map(|l| l.hidden.iter().chain([&l.latent]));
    let gan = m.gan.gen_hidden.iter().chain(&m.gan.disc_hidden);
    let widest = layers
        .chain(gan)
        .chain(&m.flow.hidden)
        .copied()
        .chain([input_dim, m.gan.latent])
        .max()
        .unwrap_or(input_dim);
    if m.family == crate::config::ModelFamily::Diffusion {
        return widest.max(diffusion_widest(&m.diffusion, input_dim));
    }
    widest
}

/// A diffusion denoiser's widest activation per row: the MLP's widest layer or its input, or
/// one feature map of the U-Net's widest level at full resolution.
fn diffusion_widest(d: &crate::config::DiffusionConfig, input_dim: usize) -> usize {
    match d.denoiser {
        crate::config::DenoiserKind::Mlp => d
            .hidden
            .iter()
            .copied()
            .chain([input_dim.saturating_mul(d.input_embedding + 1) + d.time_embedding])
            .max()
            .unwrap_or(input_dim),
        crate::config::DenoiserKind::Unet => {
            let widest = d.channel_mult.iter().copied().max().unwrap_or(1);
            d.channels.saturating_mul(widest).saturating_mul(input_dim)
        }
    }
}

/// Copies of the widest activation a training step keeps per row: a forward and a backward
/// copy, or for a U-Net about 24 maps per residual block level (every block keeps its
/// normalized, activated and convolved maps for the backward pass).
fn activation_copies(cfg: &Config) -> usize {
    let d = &cfg.model.diffusion;
    if cfg.model.family == crate::config::ModelFamily::Diffusion
        && d.denoiser == crate::config::DenoiserKind::Unet
    {
        24 * d.res_blocks.max(1)
    } else {
        2
    }
}

/// Rows an evaluation pass holds at once: `eval.max_rows`, or for a diffusion model the chunk
/// of its bound's evaluation.
pub fn eval_rows(cfg: &Config) -> usize {
    if cfg.model.family == crate::config::ModelFamily::Diffusion {
        crate::config::DIFFUSION_EVAL_ROWS
    } else {
        cfg.eval.max_rows
    }
}

/// The least memory training `cfg` on rows of `input_dim` values needs: the parameters with
/// their gradients and two optimizer moments (4 copies), and one batch of activations
/// (`batch x k` rows of the widest layer, a forward and a backward copy).
pub fn training_bytes(cfg: &Config, input_dim: usize, batch: usize) -> Option<u128> {
    let params = cfg.model.parameter_count(input_dim)?;
    let rows = batch.checked_mul(cfg.objective.k.max(1))?;
    let activations = f32_bytes(&[rows, widest_layer(cfg, input_dim), activation_copies(cfg)])?;
    f32_bytes(&[params, 4])?.checked_add(activations)
}

/// Refuses training `cfg` on `train_rows` rows of `input_dim` values when its model, batch or
/// evaluation chunk cannot fit in memory (see [`training_bytes`]); `trainer train` and
/// `trainer bench` call it before building anything.
///
/// # Errors
/// [`Error::Config`] naming the request and the memory it needs.
pub fn check_training(cfg: &Config, input_dim: usize, train_rows: usize) -> Result<()> {
    let bs = cfg.train.batch_size.min(train_rows);
    check(
        &format!(
            "training this model on {input_dim} values per row, batch {bs}, k {}",
            cfg.objective.k
        ),
        training_bytes(cfg, input_dim, bs),
    )?;
    let rows = eval_rows(cfg);
    check(
        &if cfg.model.family == crate::config::ModelFamily::Diffusion {
            format!("evaluating the diffusion bound on {rows} rows at once")
        } else {
            format!("eval.max_rows = {rows}")
        },
        f32_bytes(&[rows, widest_layer(cfg, input_dim), 4]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_beyond_the_machine_are_refused_before_allocating() {
        let gib = 1u128 << 30;
        assert!(check_against("x", Some(gib), Some(2 * gib)).is_ok());
        let e = check_against("sampling 100000000 images", Some(300 * gib), Some(20 * gib));
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("needs at least 300.0 GiB") && e.contains("20.0 GiB"),
            "{e}"
        );
        assert!(check_against("x", None, Some(gib)).is_err());
        assert!(check_against("x", Some(u128::MAX), None).is_ok());
        assert_eq!(f32_bytes(&[10, 3]), Some(120));
        assert_eq!(f32_bytes(&[usize::MAX, usize::MAX, usize::MAX]), None);
    }

    #[test]
    fn the_field_report_model_is_counted_in_tens_of_gigabytes() {
        // `model.layers=[{hidden=[100000,100000], latent=20}]` on MNIST: 2 x 1e10 weights.
        let mut cfg = Config::default();
        cfg.model.layers[0].hidden = vec![100_000, 100_000];
        let b = training_bytes(&cfg, 784, 128).unwrap();
        assert!(b > 100 * (1u128 << 30), "{b}");
        // The default VAE needs a few MB.
        let b = training_bytes(&Config::default(), 784, 128).unwrap();
        assert!(b < 64 << 20, "{b}");
    }
}
