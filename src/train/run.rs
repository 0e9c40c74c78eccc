//! One training run as a struct with small steps: start-up ([`Run::start`]), one optimizer step
//! ([`Run::step`]), the logging window, the end of an epoch (evaluation, samples), checkpoints,
//! the agreed stop, and the end of the run ([`Run::finish`]).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::checkpoints::{save_checkpoint, start};
use super::progress::Progress;
use super::{StepContext, StepOutput, TrainOptions, TrainSummary, Trainee};
use crate::checkpoint;
use crate::config::Config;
use crate::distributed::DataParallel;
use crate::error::{Error, Result};
use crate::optim::learning_rate_at;
use crate::report::MetricsWriter;
use crate::rng::epoch_permutation;
use crate::session::{self, Datasets};

/// The training figures summed over the steps since the last `train` event. The sums stay on the
/// device and are read at logging intervals only (a read waits for the device).
struct Window {
    zero: Tensor,
    values: Vec<(&'static str, Tensor)>,
    skipped: Tensor,
    steps: usize,
    samples: usize,
    started: Instant,
}

impl Window {
    fn new(device: &Device) -> Result<Self> {
        let zero = Tensor::new(0f32, device)?;
        Ok(Window {
            skipped: zero.clone(),
            zero,
            values: Vec::new(),
            steps: 0,
            samples: 0,
            started: Instant::now(),
        })
    }

    /// Adds one step's figures (a skipped step adds none, only its skip).
    fn add(&mut self, out: &StepOutput, rows: usize) -> Result<()> {
        let skipped_now = out.skipped.ge(0.5f32)?;
        if self.values.len() != out.values.len() {
            self.values = out
                .values
                .iter()
                .map(|(n, _)| (*n, self.zero.clone()))
                .collect();
        }
        for ((_, sum), (_, v)) in self.values.iter_mut().zip(&out.values) {
            *sum = (&*sum + skipped_now.where_cond(&self.zero, v)?)?;
        }
        self.skipped = (&self.skipped + &out.skipped)?;
        self.steps += 1;
        self.samples += rows;
        Ok(())
    }

    /// Empties the window and restarts its clock.
    fn reset(&mut self) {
        self.values.clear();
        self.skipped = self.zero.clone();
        self.steps = 0;
        self.samples = 0;
        self.started = Instant::now();
    }
}

/// A run in progress.
pub(super) struct Run<'a> {
    cfg: &'a Config,
    opts: &'a TrainOptions,
    t_start: Instant,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    device: Device,
    data: Datasets,
    parallel: Option<DataParallel>,
    root: bool,
    trainee: Box<dyn Trainee>,
    progress: Progress,
    already_complete: bool,
    metrics: MetricsWriter,
    bar: indicatif::ProgressBar,
    perm: Option<(u64, Vec<u32>)>,
    window: Window,
    skipped: u64,
    best: Option<f64>,
    saved_at: Option<u64>,
    last_eval: Vec<(&'static str, f64)>,
    /// The step of the last epoch-end evaluation.
    last_eval_step: Option<u64>,
    trained_samples: usize,
}

impl<'a> Run<'a> {
    /// Start-up: signal handlers first (so a signal during data loading or the rendezvous stops
    /// the run cleanly), the device and data, the memory check, the data-parallel group, the
    /// model (fresh or resumed), the run directory and the metrics log.
    pub(super) fn start(cfg: &'a Config, opts: &'a TrainOptions) -> Result<Self> {
        let t_start = Instant::now();
        let stop = if opts.handle_signals {
            Some(super::signals::install_signal_handlers()?)
        } else {
            None
        };
        let device = crate::device::open_device(&cfg.train.device)?;
        crate::device::set_tf32(cfg.train.tf32);
        let data = session::load_datasets(cfg)?;
        if data.train.is_empty() {
            return Err(Error::Data("the training set is empty".into()));
        }
        crate::memory::check_training(cfg, data.dim(), data.train.len())?;
        let parallel = connect(cfg, opts, &data, &device)?;
        let root = parallel.as_ref().is_none_or(|p| p.is_root());
        if opts.resume.is_none() && opts.out.join(checkpoint::LATEST).exists() {
            return Err(Error::Config(format!(
                "{} already holds a run: pass --resume {} to continue it, or choose another --out",
                opts.out.display(),
                opts.out.display()
            )));
        }
        let (trainee, progress) = start(cfg, opts.resume.as_deref(), &data, &device)?;
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
        let metrics = open_run_dir(cfg, &opts.out, root)?;
        let window = Window::new(&device)?;
        let mut run = Run {
            cfg,
            opts,
            t_start,
            stop,
            device,
            data,
            parallel,
            root,
            trainee,
            progress,
            already_complete: false,
            metrics,
            bar: indicatif::ProgressBar::hidden(),
            perm: None,
            window,
            skipped: 0,
            best: checkpoint::read_best(&opts.out).map(|(_, score)| score),
            saved_at: None,
            last_eval: Vec::new(),
            last_eval_step: None,
            trained_samples: 0,
        };
        run.announce();
        Ok(run)
    }

    fn n(&self) -> usize {
        self.data.train.len()
    }

    fn batch_size(&self) -> usize {
        self.cfg.train.batch_size.min(self.n())
    }

    fn epochs(&self) -> u64 {
        self.cfg.train.epochs as u64
    }

    fn run_dir(&self) -> &'a Path {
        &self.opts.out
    }

    fn world_size(&self) -> usize {
        self.parallel.as_ref().map_or(1, |p| p.world_size())
    }

    /// Logs the plan, says so when the run is already complete, and sets up the progress bar.
    fn announce(&mut self) {
        let (n, bs, epochs) = (self.n(), self.batch_size(), self.epochs());
        let total_steps = self.progress.step + self.progress.remaining_steps(epochs, bs, n);
        self.already_complete = self.progress.epoch >= epochs;
        if self.already_complete {
            if self.opts.resume.is_some() {
                tracing::warn!(
                    "nothing to train: the checkpoint has {} epochs trained and train.epochs is {}; pass --epochs above {} to train further",
                    self.progress.epoch,
                    epochs,
                    self.progress.epoch
                );
            } else {
                tracing::warn!("nothing to train: train.epochs is 0");
            }
        }
        tracing::info!(
            params = self.trainee.numel(),
            steps_per_epoch = n.div_ceil(bs),
            total_steps,
            start = self.progress.step,
            "training"
        );
        if self.opts.progress && self.root {
            let b = indicatif::ProgressBar::new(total_steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} epoch {prefix} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_position(self.progress.step);
            self.bar = b;
        }
    }

    /// Trains until the epochs are done, `--max-steps` is reached or a signal stops the group;
    /// true when a signal stopped it.
    pub(super) fn train_loop(&mut self) -> Result<bool> {
        let limit = self
            .opts
            .max_steps
            .map(|m| self.progress.step + m)
            .unwrap_or(u64::MAX);
        while self.progress.epoch < self.epochs() && self.progress.step < limit {
            let epoch = self.progress.epoch;
            let (out, lr, epoch_done) = self.step()?;
            let step = self.progress.step;
            let logging = step % self.cfg.train.log_every as u64 == 0 || epoch_done;
            if logging {
                self.log_window(&out, epoch, lr)?;
            }
            let every = self.cfg.train.checkpoint_every_steps as u64;
            let mut want_checkpoint = self.root && every > 0 && step % every == 0;
            let mut score = None;
            if epoch_done && self.root {
                let (wanted, s) = self.end_epoch(epoch)?;
                want_checkpoint |= wanted;
                score = s;
            }
            if want_checkpoint {
                self.checkpoint(score)?;
            }
            if epoch_done && self.root && self.cfg.train.sample_every > 0 {
                self.metrics.flush()?;
                self.draw_curves();
            }
            if self.should_stop(logging || epoch_done)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One optimizer step on the next batch; returns its output, its learning rate, and whether
    /// it completed the epoch.
    fn step(&mut self) -> Result<(StepOutput, f64, bool)> {
        let (n, bs) = (self.n(), self.batch_size());
        let (epoch, step) = (self.progress.epoch, self.progress.step);
        if self.perm.as_ref().map(|p| p.0) != Some(epoch) {
            self.perm = Some((epoch, epoch_permutation(self.cfg.train.seed, epoch, n)));
            self.bar.set_prefix(format!("{}", epoch + 1));
        }
        let order = &self.perm.as_ref().expect("set above").1;
        let idx = &order[self.progress.batch_range(bs, n)];
        let lr = learning_rate_at(&self.cfg.optim, epoch as usize, step);
        let ctx = StepContext {
            cfg: self.cfg,
            step,
            epoch_progress: self.progress.epochs_done(n, bs),
            lr,
            device: &self.device,
            parallel: self.parallel.as_ref(),
        };
        let out = self.trainee.step(&ctx, &self.data.train, idx)?;
        let rows = idx.len();
        if out.applied == Some(false) {
            let loss = out.loss.to_scalar::<f32>()?;
            // Counted as metrics.jsonl counts steps: the steps done after this one.
            self.on_nonfinite(1, loss, step + 1, epoch)?;
        }
        self.window.add(&out, rows)?;
        let epoch_done = self.progress.advance(rows, n);
        self.trained_samples += rows;
        self.bar.inc(1);
        Ok((out, lr, epoch_done))
    }

    /// Writes the `train` event of the window that ends with `out` (step of epoch `epoch`, rate
    /// `lr`) and starts a new window.
    fn log_window(&mut self, out: &StepOutput, epoch: u64, lr: f64) -> Result<()> {
        let step = self.progress.step;
        let loss = out.loss.to_scalar::<f32>()?;
        let window_skips = self.window.skipped.to_scalar::<f32>()?.round() as usize;
        if out.applied.is_none() && window_skips > 0 {
            // The device skipped these updates itself; apply the policy now.
            self.on_nonfinite(window_skips, loss, step, epoch)?;
        }
        let secs = self.window.started.elapsed().as_secs_f64();
        let sps = self.window.samples as f64 / secs.max(1e-9);
        let kept = self.window.steps.saturating_sub(window_skips).max(1) as f64;
        let mut fields = Vec::new();
        for (name, sum) in &self.window.values {
            fields.push((*name, sum.to_scalar::<f32>()? as f64 / kept));
        }
        if let Some((name, v)) = fields.first() {
            self.bar
                .set_message(format!("{name} {v:.3} | {sps:.0} samples/s"));
        }
        fields.push(("loss", loss as f64));
        fields.push(("lr", lr));
        fields.extend(out.constants.iter().copied());
        fields.push(("samples_per_s", sps));
        fields.push(("wall_s", self.t_start.elapsed().as_secs_f64()));
        fields.push(("skipped_steps", self.skipped as f64));
        let epochs_done = self.progress.epochs_done(self.n(), self.batch_size());
        self.metrics.log("train", step, epochs_done, &fields)?;
        self.window.reset();
        Ok(())
    }

    /// The end of epoch `epoch` (0-based): evaluation and sample grid when due. Returns whether
    /// a checkpoint is due and the validation score, if any.
    fn end_epoch(&mut self, epoch: u64) -> Result<(bool, Option<f64>)> {
        let cfg = self.cfg;
        let e = epoch as usize + 1;
        let last = e == cfg.train.epochs;
        let mut score = None;
        if cfg.train.eval_every > 0 && (e % cfg.train.eval_every == 0 || last) {
            let t = Instant::now();
            let ev = self.trainee.epoch_eval(cfg, &self.data)?;
            score = ev.score;
            let mut fields = ev.figures.clone();
            fields.push(("eval_s", t.elapsed().as_secs_f64()));
            fields.push(("wall_s", self.t_start.elapsed().as_secs_f64()));
            self.metrics
                .log("eval", self.progress.step, e as f64, &fields)?;
            self.bar.println(format!("epoch {e}: {}", ev.summary));
            self.last_eval = ev.figures;
            self.last_eval_step = Some(self.progress.step);
            // Evaluation time does not count against the next window's samples/s.
            self.window.started = Instant::now();
        }
        if last || (cfg.train.sample_every > 0 && e % cfg.train.sample_every == 0) {
            let path = self.run_dir().join(format!("samples-epoch-{e:04}.png"));
            self.trainee
                .write_samples(cfg, &self.data, &path, e as u64)?;
        }
        let due = last || (cfg.train.checkpoint_every > 0 && e % cfg.train.checkpoint_every == 0);
        Ok((due, score))
    }

    /// Saves a checkpoint of the run as it stands; returns its directory.
    fn save(&mut self) -> Result<std::path::PathBuf> {
        let dir = save_checkpoint(
            self.cfg,
            &self.data,
            self.trainee.as_ref(),
            self.progress,
            self.run_dir(),
            self.world_size(),
        )?;
        self.saved_at = Some(self.progress.step);
        Ok(dir)
    }

    /// Saves a checkpoint here; marks it best when its validation `score` is the lowest yet.
    fn checkpoint(&mut self, score: Option<f64>) -> Result<()> {
        let dir = self.save()?;
        if let Some(score) = score.filter(|s| self.best.is_none_or(|b| *s < b)) {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            checkpoint::mark_best(self.run_dir(), &name, score)?;
            self.best = Some(score);
        }
        self.metrics.flush()
    }

    /// Whether to stop now: a signal arrived. A group agrees on the step to stop at, at logging
    /// intervals and epoch ends only (`agree`): an agreement is a collective, and doing it every
    /// step would sync the device every step.
    fn should_stop(&self, agree: bool) -> Result<bool> {
        let signalled = self
            .stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
        Ok(match &self.parallel {
            Some(p) if agree => p.any(signalled, &self.device)?,
            Some(_) => false,
            None => signalled,
        })
    }

    fn draw_curves(&self) {
        if let Err(e) = crate::report::plot::write_training_curves(self.run_dir()) {
            tracing::warn!("could not draw the training curves: {e}");
        }
    }

    /// Applies `train.on_nonfinite` to `count` skipped updates: an error for `stop` (saying
    /// which checkpoint of the run, if any, is left to resume from), a count and a warning for
    /// `skip`.
    fn on_nonfinite(&mut self, count: usize, loss: f32, step: u64, epoch: u64) -> Result<()> {
        on_nonfinite(
            self.cfg,
            self.run_dir(),
            &mut self.metrics,
            &mut self.skipped,
            count,
            loss,
            step,
            epoch,
        )
    }

    /// The end of the run: a checkpoint where an early stop left none, the `interrupted` event,
    /// the final evaluation of a finished run, the curves, and the summary.
    pub(super) fn finish(
        mut self,
        interrupted: bool,
        seconds_training: f64,
    ) -> Result<TrainSummary> {
        self.bar.finish_and_clear();
        let step = self.progress.step;
        let finished = self.progress.epoch >= self.epochs();
        if self.root && !finished && self.saved_at != Some(step) {
            // Stopped early (signal or --max-steps): checkpoint here so the run can be resumed.
            self.save()?;
        }
        if interrupted {
            let epochs_done = self.progress.epochs_done(self.n(), self.batch_size());
            let wall = self.t_start.elapsed().as_secs_f64();
            self.metrics
                .log("interrupted", step, epochs_done, &[("wall_s", wall)])?;
        }
        let mut final_figures = std::collections::BTreeMap::new();
        let final_eval = if self.root && finished && !interrupted && !self.already_complete {
            let fresh = (self.last_eval_step == Some(step)).then_some(self.last_eval.as_slice());
            let fin = self
                .trainee
                .finish(self.cfg, &self.data, self.run_dir(), fresh)?;
            if !fin.figures.is_empty() {
                let epochs = self.cfg.train.epochs as f64;
                self.metrics.log("final_eval", step, epochs, &fin.figures)?;
            }
            final_figures.extend(fin.figures.iter().map(|(n, v)| (n.to_string(), *v)));
            fin.report
        } else {
            None
        };
        self.metrics.flush()?;
        if self.root {
            self.draw_curves();
        }
        let last_eval = &self.last_eval;
        Ok(TrainSummary {
            run_dir: self.opts.out.clone(),
            steps: step,
            parameters: self.trainee.numel(),
            world_size: self.world_size(),
            epochs: self.cfg.train.epochs,
            samples_per_s: self.trained_samples as f64 / seconds_training.max(1e-9),
            test_elbo: last_eval
                .iter()
                .find(|(n, _)| *n == "test_elbo")
                .map(|(_, v)| *v),
            last_eval: last_eval.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            final_eval,
            final_figures,
            seconds: self.t_start.elapsed().as_secs_f64(),
            interrupted,
        })
    }
}

/// The data-parallel group of `opts`, if any (its global batch must cover every rank).
fn connect(
    cfg: &Config,
    opts: &TrainOptions,
    data: &Datasets,
    device: &Device,
) -> Result<Option<DataParallel>> {
    let Some(spec) = &opts.parallel else {
        return Ok(None);
    };
    let bs = cfg.train.batch_size.min(data.train.len());
    if bs < spec.world_size {
        return Err(Error::Config(format!(
            "train.batch_size {bs} is the global batch: it must be at least the world size {}",
            spec.world_size
        )));
    }
    Ok(Some(crate::distributed::connect(spec, device)?))
}

/// Creates the run directory (rank 0), clears an earlier crash's unfinished checkpoints, writes
/// the resolved config, and opens the metrics log (a writer that drops everything on other
/// ranks).
fn open_run_dir(cfg: &Config, run_dir: &Path, root: bool) -> Result<MetricsWriter> {
    if !root {
        return Ok(MetricsWriter::disabled());
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let stale = checkpoint::remove_stale_temporaries(run_dir)?;
    if stale > 0 {
        tracing::warn!("removed {stale} unfinished checkpoint director(ies) of an earlier crash");
    }
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(|e| Error::io(&cfg_path, e))?;
    MetricsWriter::open(run_dir)
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
