//! The training loop: seeded minibatches, one optimizer step per batch, metrics at a fixed
//! cadence, evaluation, sample grids and crash-safe checkpoints at epoch ends, and exact resume.
//!
//! Determinism: on the CPU, for a given seed and thread count, a run is bit-for-bit reproducible,
//! and a run resumed from any checkpoint continues exactly as the uninterrupted run (every random
//! draw is keyed by seed, stream and step, see [`crate::rng`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::checkpoint::{self, FileContents, LoadedFile};
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::eval;
use crate::optim::{learning_rate, Optimizer};
use crate::report::MetricsWriter;
use crate::rng::epoch_permutation;
use crate::session::{self, Datasets};
use progress::Progress;

pub mod flow;
pub mod gan;
pub mod progress;
pub mod vae;

pub use flow::FlowTrainee;
pub use gan::GanTrainee;
pub use vae::{train_step, VaeStepOutput, VaeTrainee};

/// Where and how to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Run directory.
    pub out: PathBuf,
    /// Resume from this run or checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Stop after this many optimizer steps in this process (tests of resume; None: run to the end).
    pub max_steps: Option<u64>,
    /// Install SIGINT/SIGTERM handlers: the first signal finishes the current step, writes a
    /// checkpoint and returns; a second one exits at once without touching saved checkpoints.
    pub handle_signals: bool,
    /// Join a data-parallel group (see [`crate::distributed`]); `None` trains in this process
    /// alone. Only rank 0 writes into the run directory.
    pub parallel: Option<crate::distributed::ParallelSpec>,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    /// Trainable scalars (a data-parallel step all-reduces this many gradients).
    pub parameters: usize,
    /// Ranks that trained together (1 for one process).
    pub world_size: usize,
    pub epochs: usize,
    pub samples_per_s: f64,
    pub test_elbo: Option<f64>,
    /// Figures of the last epoch-end evaluation.
    pub last_eval: std::collections::BTreeMap<String, f64>,
    /// Figures of the end-of-training evaluation (any family).
    pub final_figures: std::collections::BTreeMap<String, f64>,
    pub final_eval: Option<eval::EvalReport>,
    pub seconds: f64,
    /// True when a signal stopped the run early (a checkpoint was written).
    pub interrupted: bool,
}

/// Registers SIGINT and SIGTERM: the first sets the returned flag, a second one (while the flag
/// is set) exits the process at once with 130 / 143.
fn install_signal_handlers() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (sig, code) in [(SIGINT, 130), (SIGTERM, 143)] {
        let io = |e: std::io::Error| Error::Config(format!("cannot install signal handler: {e}"));
        signal_hook::flag::register_conditional_shutdown(sig, code, std::sync::Arc::clone(&flag))
            .map_err(io)?;
        signal_hook::flag::register(sig, std::sync::Arc::clone(&flag)).map_err(io)?;
    }
    Ok(flag)
}

/// Settings of one step handed to a [`Trainee`].
pub struct StepContext<'a> {
    pub cfg: &'a Config,
    /// Global optimizer step (keys every random draw of the step).
    pub step: u64,
    /// Epochs done, fractional (for warm-up schedules).
    pub epoch_progress: f64,
    pub lr: f64,
    pub device: &'a Device,
    /// This process's data-parallel group, if any: `idx` is then the global batch.
    pub parallel: Option<&'a crate::distributed::DataParallel>,
}

impl StepContext<'_> {
    /// This rank's rows of a global batch of `batch` rows (all of them in one process).
    pub fn shard(&self, batch: usize) -> std::ops::Range<usize> {
        self.parallel.map_or(0..batch, |p| p.shard(batch))
    }
}

/// The rows `rows` of a global-batch tensor (rows along dimension 0), contiguous; the tensor
/// itself when `rows` is all of it.
pub fn rows_of(t: &Tensor, rows: &std::ops::Range<usize>) -> Result<Tensor> {
    if rows.start == 0 && rows.end == t.dim(0)? {
        return Ok(t.clone());
    }
    Ok(t.narrow(0, rows.start, rows.len())?.contiguous()?)
}

/// The backward pass of a step's mean loss over this rank's `rows` of a global batch of `batch`
/// rows, with the gradients of `vars` and the scalars `[loss, extra..]` averaged over the
/// data-parallel group when there is one (see [`crate::distributed`]). `loss` is `None` for a
/// rank whose shard is empty (a short last batch): it contributes zeros, weighted 0.
/// Returns the (averaged) loss, the (averaged) extras and the gradients.
pub fn averaged_backward(
    parallel: Option<&crate::distributed::DataParallel>,
    device: &Device,
    vars: &[candle_core::Var],
    loss: Option<(&Tensor, Vec<Tensor>)>,
    extras: usize,
    rows: usize,
    batch: usize,
) -> Result<(Tensor, Vec<Tensor>, candle_core::backprop::GradStore)> {
    let zero = || Tensor::new(0f32, device);
    let (loss, extra, grads) = match loss {
        Some((l, extra)) => (l.clone(), extra, l.backward()?),
        None => {
            let z = zero()?;
            let grads = z.backward()?;
            let extra = (0..extras)
                .map(|_| zero())
                .collect::<candle_core::Result<_>>()?;
            (z, extra, grads)
        }
    };
    let Some(p) = parallel else {
        return Ok((loss, extra, grads));
    };
    let mut scalars = vec![loss.detach()];
    scalars.extend(extra.iter().map(Tensor::detach));
    let avg = p.average(vars, grads, &scalars, rows, batch)?;
    let mut s = avg.scalars.into_iter();
    let loss = s.next().expect("the loss was passed");
    Ok((loss, s.collect(), avg.grads))
}

/// What one update reports. The tensors are scalars on the training device, read only at
/// logging intervals (on a GPU each read waits for the device).
pub struct StepOutput {
    /// The loss that was minimized (the discriminator's for GANs).
    pub loss: Tensor,
    /// Named scalars averaged over the logging window; the first is shown in the progress bar.
    pub values: Vec<(&'static str, Tensor)>,
    /// Host-side figures logged as they are (schedules).
    pub constants: Vec<(&'static str, f64)>,
    /// 1 when the update was skipped because something was non-finite, else 0.
    pub skipped: Tensor,
    /// Whether the update was applied, when the host knows it at once; `None` when the device
    /// decided (fused Adam on a GPU reads the found-inf guard itself).
    pub applied: Option<bool>,
}

/// Figures of an epoch-end evaluation.
pub struct EpochEval {
    /// One line for the console.
    pub summary: String,
    pub figures: Vec<(&'static str, f64)>,
    /// Validation score (lower is better) that marks the best checkpoint.
    pub score: Option<f64>,
}

/// Figures of the end-of-training evaluation.
#[derive(Default)]
pub struct FinalEval {
    pub figures: Vec<(&'static str, f64)>,
    /// The full VAE evaluation report, when there is one.
    pub report: Option<eval::EvalReport>,
}

/// A model of any family with its optimizer(s), as the training loop drives it.
pub trait Trainee {
    /// Trainable scalars.
    fn numel(&self) -> usize;
    /// The variables a data-parallel group keeps identical (broadcast at start, gradients
    /// averaged every step).
    fn parameters(&self) -> Vec<candle_core::Var>;
    /// One update on the rows `idx` of `data`.
    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput>;
    /// Evaluation at an epoch end.
    fn epoch_eval(&self, cfg: &Config, data: &Datasets) -> Result<EpochEval>;
    /// A sample grid (or, for 2-D data, a plot) at `path` after epoch `epoch`.
    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()>;
    /// The files of a checkpoint: `model.safetensors` with `metadata`, and optimizer state.
    fn checkpoint_files(
        &self,
        cfg: &Config,
        metadata: std::collections::HashMap<String, String>,
        epoch: u64,
    ) -> Result<Vec<(&'static str, FileContents)>>;
    /// The end-of-training evaluation and pictures.
    fn finish(&self, cfg: &Config, data: &Datasets, run_dir: &Path) -> Result<FinalEval>;
}

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

/// Checks that a checkpoint can continue the run `cfg` (same structure and optimizer) and
/// logs the tunable settings the run overrides.
fn check_resumable(cfg: &Config, ck: &session::LoadedCheckpoint) -> Result<()> {
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
fn start(
    cfg: &Config,
    resume: Option<&Path>,
    data: &Datasets,
    device: &Device,
) -> Result<(Box<dyn Trainee>, Progress)> {
    let family = cfg.model.family.as_str();
    let Some(resume) = resume else {
        let fresh: Box<dyn Trainee> = match family {
            "flow" => Box::new(FlowTrainee::fresh(cfg, data, device)?),
            "gan" => Box::new(GanTrainee::fresh(cfg, data, device)?),
            _ => Box::new(VaeTrainee::fresh(cfg, data, device)?),
        };
        return Ok((fresh, Progress::start()));
    };
    let ck = session::load_checkpoint(resume, device)?;
    check_resumable(cfg, &ck)?;
    ck.check_data(data)?;
    let progress = checkpoint_progress(&ck, data.train.len())?;
    let restored: Box<dyn Trainee> = match family {
        "flow" => Box::new(FlowTrainee::restore(cfg, ck, data, device)?),
        "gan" => Box::new(GanTrainee::restore(cfg, ck, data, device)?),
        _ => Box::new(VaeTrainee::restore(cfg, ck, data, device)?),
    };
    Ok((restored, progress))
}

/// Where a checkpoint stands: its step, completed epochs and `epoch_offset` (samples into the
/// current epoch); checkpoints written before offsets were recorded derive it from the step and
/// the batch size they were trained with.
fn checkpoint_progress(ck: &session::LoadedCheckpoint, n: usize) -> Result<Progress> {
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

fn save_checkpoint(
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

/// Applies `train.on_nonfinite` to `count` skipped updates: an error for `stop` (saying which
/// checkpoint of `run_dir`, if any, is left to resume from), a count and a warning for `skip`.
#[allow(clippy::too_many_arguments)]
fn on_nonfinite(
    cfg: &Config,
    run_dir: &Path,
    metrics: &mut MetricsWriter,
    skipped: &mut u64,
    count: usize,
    loss: f32,
    step: u64,
    epoch: u64,
) -> Result<()> {
    match cfg.train.on_nonfinite {
        crate::config::NonFinitePolicy::Stop => {
            metrics.flush()?;
            let left = match checkpoint::resolve(run_dir) {
                Ok(dir) => format!(
                    "stopped without writing a checkpoint, the last saved one ({}) is intact",
                    dir.display()
                ),
                Err(e) if run_dir.join(checkpoint::LATEST).exists() => {
                    format!("stopped without writing a checkpoint, and the run's last one is unusable: {e}")
                }
                Err(_) => format!(
                    "stopped; no checkpoint had been saved in {}, there is none to resume from",
                    run_dir.display()
                ),
            };
            Err(Error::NonFinite(format!(
                "loss {loss} at step {step} (epoch {}); {left}",
                epoch + 1
            )))
        }
        crate::config::NonFinitePolicy::Skip => {
            *skipped += count as u64;
            tracing::warn!(
                step,
                "non-finite loss or gradient: {count} step(s) skipped ({skipped} so far)"
            );
            Ok(())
        }
    }
}

/// Refuses a run whose model, batch or evaluation chunk cannot fit in memory, before anything
/// is allocated (see [`crate::memory`]).
fn check_memory(cfg: &Config, data: &Datasets) -> Result<()> {
    use crate::memory::{check, f32_bytes, training_bytes, widest_layer};
    let bs = cfg.train.batch_size.min(data.train.len());
    check(
        &format!(
            "training this model on {} values per row, batch {bs}, k {}",
            data.dim(),
            cfg.objective.k
        ),
        training_bytes(cfg, data.dim(), bs),
    )?;
    check(
        &format!("eval.max_rows = {}", cfg.eval.max_rows),
        f32_bytes(&[cfg.eval.max_rows, widest_layer(cfg, data.dim()), 4]),
    )
}

/// Trains according to `cfg`, writing everything into `opts.out`.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    // Installed first, so that a signal during start-up (data loading, the rendezvous) is not
    // fatal: the run stops at its first logging interval with a checkpoint, every rank alike.
    let stop = if opts.handle_signals {
        Some(install_signal_handlers()?)
    } else {
        None
    };
    let device = crate::device::open_device(&cfg.train.device)?;
    crate::device::set_tf32(cfg.train.tf32);
    let data = session::load_datasets(cfg)?;
    if data.train.is_empty() {
        return Err(Error::Data("the training set is empty".into()));
    }
    check_memory(cfg, &data)?;
    let parallel = match &opts.parallel {
        Some(spec) => {
            let bs = cfg.train.batch_size.min(data.train.len());
            if bs < spec.world_size {
                return Err(Error::Config(format!(
                    "train.batch_size {bs} is the global batch: it must be at least the world size {}",
                    spec.world_size
                )));
            }
            Some(crate::distributed::connect(spec, &device)?)
        }
        _ => None,
    };
    let root = parallel.as_ref().is_none_or(|p| p.is_root());
    let world_size = parallel.as_ref().map_or(1, |p| p.world_size());
    let run_dir = &opts.out;
    if opts.resume.is_none() && run_dir.join(checkpoint::LATEST).exists() {
        return Err(Error::Config(format!(
            "{} already holds a run: pass --resume {} to continue it, or choose another --out",
            run_dir.display(),
            run_dir.display()
        )));
    }
    let (mut trainee, mut progress) = start(cfg, opts.resume.as_deref(), &data, &device)?;
    if let Some(p) = &parallel {
        // Identical starting points whatever each rank initialized or loaded.
        p.broadcast_parameters(&trainee.parameters())?;
        tracing::info!(
            rank = p.rank(),
            world_size = p.world_size(),
            backend = p.backend(),
            "data-parallel group formed"
        );
    }
    if root {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let stale = checkpoint::remove_stale_temporaries(run_dir)?;
        if stale > 0 {
            tracing::warn!(
                "removed {stale} unfinished checkpoint director(ies) of an earlier crash"
            );
        }
    }
    let mut best = checkpoint::read_best(run_dir).map(|(_, score)| score);
    let mut saved_at: Option<u64> = None;
    let mut interrupted = false;
    let mut metrics = if root {
        let cfg_path = run_dir.join("config.toml");
        std::fs::write(&cfg_path, cfg.to_toml()).map_err(|e| Error::io(&cfg_path, e))?;
        MetricsWriter::open(run_dir)?
    } else {
        MetricsWriter::disabled()
    };

    let n = data.train.len();
    let bs = cfg.train.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let epochs = cfg.train.epochs as u64;
    let total_steps = progress.step + progress.remaining_steps(epochs, bs, n);
    let seed = cfg.train.seed;
    let already_complete = progress.epoch >= epochs;
    if already_complete {
        tracing::warn!(
            "the run is complete: its checkpoint has {} of {} epochs trained; pass a larger --epochs to train further",
            progress.epoch,
            epochs
        );
    }
    tracing::info!(
        params = trainee.numel(),
        steps_per_epoch,
        total_steps,
        start = progress.step,
        "training"
    );

    let bar = if opts.progress && root {
        let b = indicatif::ProgressBar::new(total_steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} epoch {prefix} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_position(progress.step);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut perm: Option<(u64, Vec<u32>)> = None;
    let mut window = (0f64, 0usize, Instant::now(), 0usize); // (unused), (unused), start, samples
    let zero = Tensor::new(0f32, &device)?;
    let mut window_values: Vec<(&'static str, Tensor)> = Vec::new();
    let (mut window_skipped, mut window_steps) = (zero.clone(), 0usize);
    let mut skipped = 0u64;
    let mut last_eval: Vec<(&'static str, f64)> = Vec::new();
    let mut trained_samples = 0usize;
    let t_train = Instant::now();
    let steps_limit = opts
        .max_steps
        .map(|m| progress.step + m)
        .unwrap_or(u64::MAX);
    while progress.epoch < epochs && progress.step < steps_limit {
        let epoch = progress.epoch;
        let step = progress.step;
        if perm.as_ref().map(|p| p.0) != Some(epoch) {
            perm = Some((epoch, epoch_permutation(seed, epoch, n)));
            bar.set_prefix(format!("{}", epoch + 1));
        }
        let order = &perm.as_ref().expect("set above").1;
        let idx = &order[progress.batch_range(bs, n)];
        let lr = learning_rate(&cfg.optim, epoch as usize);
        let ctx = StepContext {
            cfg,
            step,
            epoch_progress: progress.epochs_done(n, bs),
            lr,
            device: &device,
            parallel: parallel.as_ref(),
        };
        let out = trainee.step(&ctx, &data.train, idx)?;
        if out.applied == Some(false) {
            let loss = out.loss.to_scalar::<f32>()?;
            on_nonfinite(
                cfg,
                run_dir,
                &mut metrics,
                &mut skipped,
                1,
                loss,
                step + 1, // counted as metrics.jsonl counts steps: the steps done after this one
                epoch,
            )?;
        }
        // Window sums stay on the device; they are read at logging intervals only.
        let skipped_now = out.skipped.ge(0.5f32)?;
        if window_values.len() != out.values.len() {
            window_values = out.values.iter().map(|(n, _)| (*n, zero.clone())).collect();
        }
        for ((_, sum), (_, v)) in window_values.iter_mut().zip(&out.values) {
            *sum = (&*sum + skipped_now.where_cond(&zero, v)?)?;
        }
        window_skipped = (window_skipped + &out.skipped)?;
        window_steps += 1;
        let epoch_done = progress.advance(idx.len(), n);
        let step = progress.step;
        trained_samples += idx.len();
        bar.inc(1);
        window.3 += idx.len();
        let logging = step % cfg.train.log_every as u64 == 0 || epoch_done;
        if logging {
            let loss = out.loss.to_scalar::<f32>()?;
            let window_skips = window_skipped.to_scalar::<f32>()?.round() as usize;
            if out.applied.is_none() && window_skips > 0 {
                // The device skipped these updates itself; apply the policy now.
                on_nonfinite(
                    cfg,
                    run_dir,
                    &mut metrics,
                    &mut skipped,
                    window_skips,
                    loss,
                    step,
                    epoch,
                )?;
            }
            let secs = window.2.elapsed().as_secs_f64();
            let sps = window.3 as f64 / secs.max(1e-9);
            let kept = window_steps.saturating_sub(window_skips).max(1) as f64;
            let mut fields = Vec::new();
            for (name, sum) in &window_values {
                fields.push((*name, sum.to_scalar::<f32>()? as f64 / kept));
            }
            if let Some((name, v)) = fields.first() {
                bar.set_message(format!("{name} {v:.3} | {sps:.0} samples/s"));
            }
            fields.push(("loss", loss as f64));
            fields.push(("lr", lr));
            fields.extend(out.constants.iter().copied());
            fields.push(("samples_per_s", sps));
            fields.push(("wall_s", t_start.elapsed().as_secs_f64()));
            fields.push(("skipped_steps", skipped as f64));
            metrics.log("train", step, progress.epochs_done(n, bs), &fields)?;
            window = (0.0, 0, Instant::now(), 0);
            window_values.clear();
            window_skipped = zero.clone();
            window_steps = 0;
        }
        let every = cfg.train.checkpoint_every_steps as u64;
        let mut want_checkpoint = root && every > 0 && step % every == 0;
        let mut valid_score = None;
        if epoch_done && root {
            let e = epoch as usize + 1;
            let last = e == cfg.train.epochs;
            if cfg.train.eval_every > 0 && (e % cfg.train.eval_every == 0 || last) {
                let t = Instant::now();
                let ev = trainee.epoch_eval(cfg, &data)?;
                valid_score = ev.score;
                let mut fields = ev.figures.clone();
                fields.push(("eval_s", t.elapsed().as_secs_f64()));
                fields.push(("wall_s", t_start.elapsed().as_secs_f64()));
                metrics.log("eval", step, e as f64, &fields)?;
                bar.println(format!("epoch {e}: {}", ev.summary));
                last_eval = ev.figures;
                window.2 = Instant::now();
            }
            if last || (cfg.train.sample_every > 0 && e % cfg.train.sample_every == 0) {
                trainee.write_samples(
                    cfg,
                    &data,
                    &run_dir.join(format!("samples-epoch-{e:04}.png")),
                    e as u64,
                )?;
            }
            want_checkpoint |=
                last || (cfg.train.checkpoint_every > 0 && e % cfg.train.checkpoint_every == 0);
        }
        if want_checkpoint {
            let dir = save_checkpoint(cfg, &data, trainee.as_ref(), progress, run_dir, world_size)?;
            saved_at = Some(step);
            if let Some(score) = valid_score.filter(|s| best.is_none_or(|b| *s < b)) {
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                checkpoint::mark_best(run_dir, &name, score)?;
                best = Some(score);
            }
            metrics.flush()?;
        }
        if epoch_done && root && cfg.train.sample_every > 0 {
            metrics.flush()?;
            if let Err(e) = crate::report::plot::write_training_curves(run_dir) {
                tracing::warn!("could not draw the training curves: {e}");
            }
        }
        let signalled = stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
        let stop_now = match &parallel {
            // The ranks agree on the step to stop at, at logging intervals and epoch ends (an
            // agreement is a collective; doing it every step would sync the device every step).
            Some(p) if logging || epoch_done => p.any(signalled, &device)?,
            Some(_) => false,
            None => signalled,
        };
        if stop_now {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    let seconds_training = t_train.elapsed().as_secs_f64();
    let step = progress.step;
    let finished = progress.epoch >= epochs;
    if root && !finished && saved_at != Some(step) {
        // Stopped early (signal or --max-steps): checkpoint here so the run can be resumed.
        save_checkpoint(cfg, &data, trainee.as_ref(), progress, run_dir, world_size)?;
    }
    if interrupted {
        metrics.log(
            "interrupted",
            step,
            progress.epochs_done(n, bs),
            &[("wall_s", t_start.elapsed().as_secs_f64())],
        )?;
    }
    let mut final_figures = std::collections::BTreeMap::new();
    let final_eval = if root && finished && !interrupted && !already_complete {
        let fin = trainee.finish(cfg, &data, run_dir)?;
        if !fin.figures.is_empty() {
            metrics.log("final_eval", step, cfg.train.epochs as f64, &fin.figures)?;
        }
        final_figures.extend(fin.figures.iter().map(|(n, v)| (n.to_string(), *v)));
        fin.report
    } else {
        None
    };
    metrics.flush()?;
    if root {
        if let Err(e) = crate::report::plot::write_training_curves(run_dir) {
            tracing::warn!("could not draw the training curves: {e}");
        }
    }
    Ok(TrainSummary {
        run_dir: run_dir.clone(),
        steps: step,
        parameters: trainee.numel(),
        world_size,
        epochs: cfg.train.epochs,
        samples_per_s: trained_samples as f64 / seconds_training.max(1e-9),
        test_elbo: last_eval
            .iter()
            .find(|(n, _)| *n == "test_elbo")
            .map(|(_, v)| *v),
        last_eval: last_eval.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        final_eval,
        final_figures,
        seconds: t_start.elapsed().as_secs_f64(),
        interrupted,
    })
}
