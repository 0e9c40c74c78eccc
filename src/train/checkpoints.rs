//! A run's checkpoints: their contents (model and optimizer files), saving, and starting a run
//! fresh or from a checkpoint (resume validation and the position in the schedule).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::diffusion::DiffusionTrainee;
use super::flow::FlowTrainee;
use super::gan::GanTrainee;
use super::progress::Progress;
use super::vae::VaeTrainee;
use super::Trainee;
use crate::checkpoint::{self, FileContents, LoadedFile};
use crate::config::{Config, ModelFamily};
use crate::error::{Error, Result};
use crate::optim::{learning_rate, Optimizer};
use crate::session::{self, Datasets};

/// The contents of `optim.safetensors` for one or more optimizers; each optimizer's step is
/// stored under `step` (first) or `{prefix}step`.
pub fn optim_contents(
    cfg: &Config,
    opts: &[(&str, &Optimizer)],
    epoch: u64,
) -> Result<FileContents> {
    let mut tensors = Vec::new();
    let mut metadata: std::collections::HashMap<String, String> = [
        ("optimizer".to_string(), opts[0].1.kind_name().to_string()),
        (
            "lr".to_string(),
            learning_rate(&cfg.optim, epoch.saturating_sub(1) as usize).to_string(),
        ),
        (
            "gentrain_format_version".to_string(),
            checkpoint::FORMAT_VERSION.to_string(),
        ),
    ]
    .into();
    for (prefix, opt) in opts {
        tensors.extend(opt.named_state()?);
        metadata.insert(format!("{prefix}step"), opt.step.to_string());
    }
    Ok(FileContents { tensors, metadata })
}

/// The files of a checkpoint: `model.safetensors` with the model's `tensors` and `metadata`,
/// and `optim.safetensors` with the optimizers `opts` (see [`optim_contents`]).
pub fn checkpoint_contents(
    cfg: &Config,
    tensors: Vec<(String, Tensor)>,
    metadata: std::collections::HashMap<String, String>,
    opts: &[(&str, &Optimizer)],
    epoch: u64,
) -> Result<Vec<(&'static str, FileContents)>> {
    Ok(vec![
        (checkpoint::MODEL_FILE, FileContents { tensors, metadata }),
        (checkpoint::OPTIM_FILE, optim_contents(cfg, opts, epoch)?),
    ])
}

/// Restores one optimizer of `optim.safetensors` (see [`optim_contents`]).
pub fn restore_optimizer(
    opt: &mut Optimizer,
    file: &LoadedFile,
    prefix: &str,
    device: &Device,
) -> Result<()> {
    let key = format!("{prefix}step");
    let step: u64 = file
        .meta(&key)?
        .parse()
        .map_err(|_| file.error(format!("metadata `{key}` is not a number")))?;
    if file.meta("optimizer")? != opt.kind_name() {
        return Err(file.error(format!(
            "optimizer is {}, the run uses {}",
            file.meta("optimizer")?,
            opt.kind_name()
        )));
    }
    opt.load_state(step, |name, dims| file.tensor(name, dims, device))
        .map_err(|e| file.error(e))
}

/// Checks that a checkpoint can continue the run `cfg` (same structure and optimizer, and the
/// same `optim.second_moment_init`, which a resume could not apply) and logs the tunable settings
/// the run overrides.
pub(super) fn check_resumable(cfg: &Config, ck: &session::LoadedCheckpoint) -> Result<()> {
    let differences = cfg.differences(&ck.config);
    if let Some(d) = differences.iter().find(|d| d.structural) {
        return Err(Error::checkpoint(
            &ck.dir,
            format!(
                "structural field {} differs: checkpoint has {}, the run asks for {}",
                d.path, d.old, d.new
            ),
        ));
    }
    if let Some(d) = differences
        .iter()
        .find(|d| d.path == "optim.second_moment_init")
    {
        return Err(Error::checkpoint(
            &ck.dir,
            format!(
                "optim.second_moment_init differs (checkpoint {}, the run {}): it sets Adam's second moment at the start of a run only, and a resume restores that moment from the checkpoint",
                d.old, d.new
            ),
        ));
    }
    if ck.config.optim.kind != cfg.optim.kind {
        return Err(Error::checkpoint(
            &ck.dir,
            "optim.kind differs from the checkpoint's; the optimizer state cannot be carried over",
        ));
    }
    for d in &differences {
        if d.path == "train.seed" {
            // Shown by default: the data order and every random draw follow the new seed from
            // here on, so the run no longer matches an uninterrupted one.
            tracing::warn!(
                "resume overrides train.seed: {} -> {}; data order and noise follow the new seed from here",
                d.old,
                d.new
            );
        } else {
            tracing::info!("resume overrides {}: {} -> {}", d.path, d.old, d.new);
        }
    }
    Ok(())
}

/// The trainee of a fresh run, or restored from `resume`, with the step it starts at.
pub(super) fn start(
    cfg: &Config,
    resume: Option<&Path>,
    data: &Datasets,
    device: &Device,
) -> Result<(Box<dyn Trainee>, Progress)> {
    let family = cfg.model.family;
    let Some(resume) = resume else {
        let fresh: Box<dyn Trainee> = match family {
            ModelFamily::Flow => Box::new(FlowTrainee::fresh(cfg, data, device)?),
            ModelFamily::Gan => Box::new(GanTrainee::fresh(cfg, data, device)?),
            ModelFamily::Diffusion => Box::new(DiffusionTrainee::fresh(cfg, data, device)?),
            ModelFamily::Vae => Box::new(VaeTrainee::fresh(cfg, data, device)?),
        };
        return Ok((fresh, Progress::start()));
    };
    let ck = session::load_checkpoint(resume, device)?;
    check_resumable(cfg, &ck)?;
    ck.check_data(data)?;
    let progress = checkpoint_progress(&ck, data.train.len())?;
    let restored: Box<dyn Trainee> = match family {
        ModelFamily::Flow => Box::new(FlowTrainee::restore(cfg, ck, device)?),
        ModelFamily::Gan => Box::new(GanTrainee::restore(cfg, ck, device)?),
        ModelFamily::Diffusion => Box::new(DiffusionTrainee::restore(cfg, ck, device)?),
        ModelFamily::Vae => Box::new(VaeTrainee::restore(cfg, ck, device)?),
    };
    Ok((restored, progress))
}

/// Where a checkpoint stands: its step, completed epochs and `epoch_offset` (samples into the
/// current epoch); checkpoints written before offsets were recorded derive it from the step and
/// the batch size they were trained with.
pub(super) fn checkpoint_progress(ck: &session::LoadedCheckpoint, n: usize) -> Result<Progress> {
    let offset = match ck.file.metadata.get("epoch_offset") {
        Some(v) => Some(v.trim().parse::<usize>().ok().filter(|o| *o < n.max(1)).ok_or_else(
            || {
                ck.file.error(format!(
                    "metadata `epoch_offset` = {v:?} is not a row offset below the {n} training rows"
                ))
            },
        )?),
        None => None,
    };
    Ok(Progress::from_checkpoint(
        ck.step,
        ck.epoch,
        offset,
        ck.config.train.batch_size,
        n,
    ))
}

pub(super) fn save_checkpoint(
    cfg: &Config,
    data: &Datasets,
    trainee: &dyn Trainee,
    progress: Progress,
    run_dir: &Path,
    world_size: usize,
) -> Result<PathBuf> {
    let mut metadata = session::model_metadata(cfg, data, progress.step, progress.epoch);
    metadata.insert("epoch_offset".into(), progress.offset.to_string());
    metadata.insert("world_size".into(), world_size.to_string());
    let files = trainee.checkpoint_files(cfg, metadata, progress.epoch)?;
    checkpoint::save(run_dir, progress.step, &files, cfg.train.keep_checkpoints)
}
