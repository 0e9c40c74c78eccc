//! Raw flags resolved, once, into the typed values the library takes: the config of `train`,
//! `bench` and `export-data` (TOML file or checkpoint, then flags: the one override path), the
//! checkpoint config of `eval` and `sample` with their data directory, run directories, and the
//! data-parallel group of `train`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use crate::config::{Config, Overrides};
use crate::distributed::{Backend, ParallelSpec};

use super::{ExportArgs, TrainArgs};

/// Flags shared by commands that take a config.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigFlags {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Random seed of the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// `data.dir`: the data (IDX directory, `.npy`/`.npz` file or directory, CIFAR-10 batches or
    /// image folder; docs/data.md).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Minibatch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Samples per data point of the objective.
    #[arg(long)]
    pub k: Option<usize>,
    /// CPU threads (0: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Any config value as section.key=value (TOML syntax), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

fn overrides(f: &ConfigFlags, epochs: Option<usize>) -> Overrides {
    Overrides {
        epochs,
        device: f.device.clone(),
        seed: f.seed,
        data_dir: f.data_dir.clone(),
        batch_size: f.batch_size,
        lr: f.lr,
        k: f.k,
        threads: f.threads,
        set: f.set.clone(),
    }
}

/// The config of `--config` (else `fallback`) with the flags applied.
///
/// # Errors
/// Neither `--config` nor a fallback, an unreadable or invalid config file, or a flag the config
/// rejects.
pub(crate) fn resolve_config(
    f: &ConfigFlags,
    epochs: Option<usize>,
    fallback: Option<Config>,
) -> Result<Config> {
    let base = match (&f.config, fallback) {
        (Some(p), _) => Config::load(p)?,
        (None, Some(c)) => c,
        (None, None) => bail!("--config FILE is required"),
    };
    Ok(base.with_overrides(&overrides(f, epochs))?)
}

/// The config saved in the checkpoint of a run or checkpoint directory (not validated).
///
/// # Errors
/// No checkpoint there, an unreadable model file, or metadata that is not a config.
pub(crate) fn checkpoint_config(path: &Path) -> Result<Config> {
    let dir = crate::checkpoint::resolve(path)?;
    let file = crate::checkpoint::LoadedFile::read(&dir.join(crate::checkpoint::MODEL_FILE))?;
    let text = file.meta("config")?;
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(file.error(format!("metadata `config` is not a valid config: {e}")))
    })
}

/// The config of `trainer train`: `--config`, or the resumed run's when only `--resume` names
/// one, with the flags applied.
///
/// # Errors
/// As [`resolve_config`] and [`checkpoint_config`].
pub(crate) fn train_config(a: &TrainArgs) -> Result<Config> {
    let fallback = match &a.resume {
        Some(r) if a.flags.config.is_none() => Some(checkpoint_config(r)?),
        _ => None,
    };
    resolve_config(&a.flags, a.epochs, fallback)
}

/// The config of `trainer export-data`: `--config`, or the checkpoint's, with `--data-dir` and
/// `--set` applied.
///
/// # Errors
/// As [`resolve_config`] and [`checkpoint_config`].
pub(crate) fn export_config(a: &ExportArgs) -> Result<Config> {
    let fallback = match &a.checkpoint {
        Some(c) => Some(checkpoint_config(c)?),
        None => None,
    };
    let flags = ConfigFlags {
        config: a.config.clone(),
        data_dir: a.data_dir.clone(),
        set: a.set.clone(),
        ..Default::default()
    };
    resolve_config(&flags, None, fallback)
}

/// A checkpoint's config with the data directory of `--data-dir`, when given (`eval`, `sample`).
pub(crate) fn with_data_dir(mut cfg: Config, data_dir: Option<&Path>) -> Config {
    if let Some(d) = data_dir {
        cfg.data.dir = d.to_path_buf();
    }
    cfg
}

/// `runs/<config file stem>-<unix time>` (`run` without a config file).
pub(crate) fn default_run_dir(cfg_path: Option<&Path>) -> PathBuf {
    let stem = cfg_path
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{t}"))
}

/// The run directory of a run or checkpoint directory.
fn run_dir_of(p: &Path) -> PathBuf {
    let is_ckpt = p
        .file_name()
        .map(|n| n.to_string_lossy().starts_with("ckpt-"))
        .unwrap_or(false);
    if is_ckpt {
        p.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| p.to_path_buf())
    } else {
        p.to_path_buf()
    }
}

/// The run directory of `trainer train`: `--out`, else the resumed run's, else a new one under
/// `runs/`.
///
/// # Errors
/// A data-parallel rank (`--rendezvous`) with neither `--out` nor `--resume`: the ranks would
/// not agree on a directory.
pub(crate) fn train_run_dir(a: &TrainArgs) -> Result<PathBuf> {
    Ok(match (&a.out, &a.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => run_dir_of(r),
        (None, None) if a.rendezvous.is_some() => bail!(
            "--world-size {} needs --out (or --resume): every rank must name the same run directory",
            a.world_size
        ),
        (None, None) => default_run_dir(a.flags.config.as_deref()),
    })
}

/// The data-parallel group of `trainer train`'s flags (`None` for one process).
///
/// # Errors
/// A rank outside the world, a group without `--rendezvous`, or an unknown backend or
/// rendezvous.
pub(crate) fn parallel_spec(a: &TrainArgs, cfg: &Config) -> Result<Option<ParallelSpec>> {
    if a.world_size == 1 && a.rendezvous.is_none() {
        if a.rank != 0 {
            bail!("--rank {} is outside --world-size 1", a.rank);
        }
        return Ok(None);
    }
    // A world of 1 with a rendezvous still goes through the group (NCCL on one GPU, checked
    // against the plain run).
    if a.rank >= a.world_size {
        bail!("--rank {} is outside --world-size {}", a.rank, a.world_size);
    }
    let Some(r) = &a.rendezvous else {
        bail!(
            "--world-size {} needs --rendezvous tcp://HOST:PORT or file:PATH",
            a.world_size
        );
    };
    let backend = match &a.backend {
        Some(b) => b.parse()?,
        None if cfg.train.device.starts_with("cuda") => Backend::Nccl,
        None => Backend::Tcp,
    };
    Ok(Some(ParallelSpec {
        rank: a.rank,
        world_size: a.world_size,
        rendezvous: r.parse()?,
        backend,
        timeout: std::time::Duration::from_secs(a.rendezvous_timeout.max(1)),
    }))
}

/// Applies `--sampler`, `--steps` and `--eta` to a diffusion checkpoint's model (and its
/// config, which the reports print).
///
/// # Errors
/// The flags on a model of another family, or values the config would refuse (steps outside
/// 1..=T, a negative eta).
pub(crate) fn apply_sampler_flags(
    ck: &mut crate::session::LoadedCheckpoint,
    f: &crate::cli::SamplerFlags,
) -> anyhow::Result<()> {
    let given = f.sampler.is_some() || f.steps.is_some() || f.eta.is_some();
    let crate::session::Model::Diffusion(m) = &mut ck.model else {
        if given {
            anyhow::bail!(
                "--sampler, --steps and --eta apply to diffusion models; this checkpoint is a {}",
                ck.config.model.family.as_str()
            );
        }
        return Ok(());
    };
    let d = &mut ck.config.model.diffusion;
    if let Some(s) = f.sampler {
        d.sampler = match s {
            crate::cli::SamplerChoice::Ddpm => crate::config::SamplerKind::Ddpm,
            crate::cli::SamplerChoice::Ddim => crate::config::SamplerKind::Ddim,
        };
    }
    if let Some(s) = f.steps {
        d.sample_steps = s;
    }
    if let Some(e) = f.eta {
        d.ddim_eta = e;
    }
    d.validate().map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.to_string()
                .replace("model.diffusion.sample_steps", "--steps")
                .replace("model.diffusion.ddim_eta", "--eta")
        )
    })?;
    m.cfg = d.clone();
    Ok(())
}
