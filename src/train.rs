//! The training loop: seeded minibatches, one optimizer step per batch, metrics at a fixed
//! cadence, evaluation, sample grids and crash-safe checkpoints at epoch ends, and exact resume.
//!
//! Determinism: on the CPU, for a given seed and thread count, a run is bit-for-bit reproducible,
//! and a run resumed from any checkpoint continues exactly as the uninterrupted run (every random
//! draw is keyed by seed, stream and step, see [`crate::rng`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::checkpoint::{self, FileContents, LoadedFile, OPTIM_FILE};
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::eval;
use crate::models::Vae;
use crate::objectives::{kl_weight, needs_densities, objective};
use crate::optim::{check_finite_grads, learning_rate, Optimizer};
use crate::report::MetricsWriter;
use crate::rng::{epoch_permutation, stream_rng, Stream};
use crate::samples;
use crate::session::{self, Datasets};

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
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub epochs: usize,
    pub samples_per_s: f64,
    pub test_elbo: Option<f64>,
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

/// The model and optimizer of a run, fresh or restored.
struct State {
    model: Vae,
    opt: Optimizer,
    step: u64,
}

fn restore(cfg: &Config, resume: &Path, data: &Datasets, device: &Device) -> Result<State> {
    let ck = session::load_checkpoint(resume, device)?;
    for ((name, want), (_, have)) in cfg
        .structural_fields()
        .iter()
        .zip(ck.config.structural_fields())
    {
        if *want != have {
            return Err(Error::checkpoint(&ck.dir, format!("structural field {name} differs: checkpoint has {have}, the run asks for {want}")));
        }
    }
    if ck.model.input_dim != data.dim() {
        return Err(Error::checkpoint(
            &ck.dir,
            format!(
                "data dimension differs: checkpoint has {}, the data has {}",
                ck.model.input_dim,
                data.dim()
            ),
        ));
    }
    if ck.config.optim.kind != cfg.optim.kind {
        return Err(Error::checkpoint(
            &ck.dir,
            "optim.kind differs from the checkpoint's; the optimizer state cannot be carried over",
        ));
    }
    for (field, old, new) in [
        (
            "optim.lr",
            ck.config.optim.lr.to_string(),
            cfg.optim.lr.to_string(),
        ),
        (
            "train.batch_size",
            ck.config.train.batch_size.to_string(),
            cfg.train.batch_size.to_string(),
        ),
        (
            "train.epochs",
            ck.config.train.epochs.to_string(),
            cfg.train.epochs.to_string(),
        ),
        (
            "objective.k",
            ck.config.objective.k.to_string(),
            cfg.objective.k.to_string(),
        ),
    ] {
        if old != new {
            tracing::info!("resume overrides {field}: {old} -> {new}");
        }
    }
    let mut opt = Optimizer::new(&cfg.optim, &ck.model.store)?;
    let optim_file = LoadedFile::read(&ck.dir.join(OPTIM_FILE))?;
    let opt_step: u64 = optim_file
        .meta("step")?
        .parse()
        .map_err(|_| optim_file.error("metadata `step` is not a number"))?;
    if optim_file.meta("optimizer")? != opt.kind_name() {
        return Err(optim_file.error(format!(
            "optimizer is {}, the run uses {}",
            optim_file.meta("optimizer")?,
            opt.kind_name()
        )));
    }
    opt.load_state(opt_step, |name, dims| optim_file.tensor(name, dims, device))
        .map_err(|e| optim_file.error(e))?;
    Ok(State {
        model: ck.model,
        opt,
        step: ck.step,
    })
}

fn save_checkpoint(
    cfg: &Config,
    data: &Datasets,
    st: &State,
    run_dir: &Path,
    epoch: u64,
    keep: usize,
) -> Result<PathBuf> {
    let model = FileContents {
        tensors: st
            .model
            .store
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
            .collect(),
        metadata: session::model_metadata(cfg, data, st.step, epoch),
    };
    let optim = FileContents {
        tensors: st.opt.named_state()?,
        metadata: [
            ("optimizer".to_string(), st.opt.kind_name().to_string()),
            ("step".to_string(), st.opt.step.to_string()),
            (
                "lr".to_string(),
                learning_rate(&cfg.optim, epoch.saturating_sub(1) as usize).to_string(),
            ),
            (
                "gentrain_format_version".to_string(),
                checkpoint::FORMAT_VERSION.to_string(),
            ),
        ]
        .into(),
    };
    checkpoint::save(
        run_dir,
        st.step,
        &[(checkpoint::MODEL_FILE, model), (OPTIM_FILE, optim)],
        keep,
    )
}

/// The result of one optimizer step. The tensors are scalars on the training device; on a GPU
/// read them only at logging intervals (each read waits for the device).
pub struct StepOutput {
    /// The loss (negative weighted bound).
    pub loss: Tensor,
    /// The batch-mean bound.
    pub bound: Tensor,
    /// 1 when the loss or a gradient was non-finite and the update was skipped, else 0.
    pub skipped: Tensor,
    /// Whether the update was applied, when the host knows it at once (CPU, or SGD anywhere);
    /// `None` when the device decided (fused Adam on a GPU reads the found-inf guard itself).
    pub applied: Option<bool>,
}

/// One optimizer step on the rows `idx` of `data` at global step `step`.
///
/// On the CPU the loss and the gradients are tested on the host before the update. On a CUDA
/// device nothing waits for the device: the batch bits and the noise are drawn there, and the
/// guard `loss + 0 * sum(grads)` (NaN or infinite exactly when something is) is handed to the
/// fused Adam kernels, which skip the update by themselves.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Vae,
    opt: &mut Optimizer,
    cfg: &Config,
    data: &DataSource,
    idx: &[u32],
    step: u64,
    beta: f64,
    lr: f64,
    device: &Device,
) -> Result<StepOutput> {
    let k = cfg.objective.k;
    let seed = cfg.train.seed;
    let x = data.batch(idx, step, device)?;
    let eps = if device.is_cpu() {
        model.draw_noise(k, idx.len(), &mut stream_rng(seed, Stream::Noise, step))?
    } else {
        model.draw_noise_keyed(
            k,
            idx.len(),
            crate::rng::stream_key(seed, Stream::Noise, step),
        )?
    };
    let pass = model.pass(
        &x,
        k,
        &eps,
        needs_densities(&cfg.objective, model.latents.len()),
    )?;
    let obj = objective(&pass, &cfg.objective, k, beta)?;
    let flag = |v: f64| Tensor::new(v as f32, device);
    let device_guard = !device.is_cpu() && cfg.optim.kind == crate::config::OptimizerKind::Adam;
    if !device_guard {
        let loss = obj.loss.to_scalar::<f32>()?;
        let applied = loss.is_finite() && {
            let grads = obj.loss.backward()?;
            let ok = check_finite_grads(&model.store, &grads).is_ok();
            if ok {
                opt.step(&grads, lr, None)?;
            }
            ok
        };
        return Ok(StepOutput {
            loss: obj.loss,
            bound: obj.bound,
            skipped: flag(if applied { 0.0 } else { 1.0 })?,
            applied: Some(applied),
        });
    }
    let grads = obj.loss.backward()?;
    let mut guard = obj.loss.detach();
    for (_, var) in model.store.iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            guard = (guard + (g.sum_all()? * 0.0)?)?;
        }
    }
    opt.step(&grads, lr, Some(&guard))?;
    // 0 * x is NaN exactly when x is NaN or infinite.
    let skipped = (&guard * 0.0)?
        .ne(0f32)?
        .to_dtype(candle_core::DType::F32)?;
    Ok(StepOutput {
        loss: obj.loss,
        bound: obj.bound,
        skipped,
        applied: None,
    })
}

/// Applies `train.on_nonfinite` to `count` skipped updates: an error for `stop`, a count and a
/// warning for `skip`.
fn on_nonfinite(
    cfg: &Config,
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
            Err(Error::NonFinite(format!(
                "loss {loss} at step {step} (epoch {}); stopped without writing a checkpoint, the last saved one is intact",
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

/// Trains according to `cfg`, writing everything into `opts.out`.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let device = crate::device::open_device(&cfg.train.device)?;
    crate::device::set_tf32(cfg.train.tf32);
    let data = session::load_datasets(cfg)?;
    if data.train.is_empty() {
        return Err(Error::Data("the training set is empty".into()));
    }
    let run_dir = &opts.out;
    if opts.resume.is_none() && run_dir.join(checkpoint::LATEST).exists() {
        return Err(Error::Config(format!(
            "{} already holds a run: pass --resume {} to continue it, or choose another --out",
            run_dir.display(),
            run_dir.display()
        )));
    }
    let mut st = match &opts.resume {
        Some(r) => restore(cfg, r, &data, &device)?,
        None => {
            let model = session::build_model(cfg, data.dim(), &device)?;
            let opt = Optimizer::new(&cfg.optim, &model.store)?;
            State {
                model,
                opt,
                step: 0,
            }
        }
    };
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let stale = checkpoint::remove_stale_temporaries(run_dir)?;
    if stale > 0 {
        tracing::warn!("removed {stale} unfinished checkpoint director(ies) of an earlier crash");
    }
    let stop = if opts.handle_signals {
        Some(install_signal_handlers()?)
    } else {
        None
    };
    let mut best = checkpoint::read_best(run_dir).map(|(_, score)| score);
    let mut saved_at: Option<u64> = None;
    let mut interrupted = false;
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(|e| Error::io(&cfg_path, e))?;
    let mut metrics = MetricsWriter::open(run_dir)?;

    let n = data.train.len();
    let bs = cfg.train.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let total_steps = steps_per_epoch * cfg.train.epochs as u64;
    let seed = cfg.train.seed;
    tracing::info!(
        params = st.model.store.numel(),
        steps_per_epoch,
        total_steps,
        start = st.step,
        "training"
    );

    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total_steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} epoch {prefix} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_position(st.step);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut perm: Option<(u64, Vec<u32>)> = None;
    let mut window = (0f64, 0usize, Instant::now(), 0usize); // (unused), (unused), start, samples
    let zero = Tensor::new(0f32, &device)?;
    let (mut window_bound, mut window_skipped, mut window_steps) =
        (zero.clone(), zero.clone(), 0usize);
    let mut skipped = 0u64;
    let mut last_test_elbo = None;
    let mut trained_samples = 0usize;
    let t_train = Instant::now();
    let steps_limit = opts.max_steps.map(|m| st.step + m).unwrap_or(u64::MAX);
    while st.step < total_steps && st.step < steps_limit {
        let epoch = st.step / steps_per_epoch;
        let within = (st.step % steps_per_epoch) as usize;
        if perm.as_ref().map(|p| p.0) != Some(epoch) {
            perm = Some((epoch, epoch_permutation(seed, epoch, n)));
            bar.set_prefix(format!("{}", epoch + 1));
        }
        let order = &perm.as_ref().expect("set above").1;
        let idx = &order[within * bs..((within + 1) * bs).min(n)];
        let beta = kl_weight(
            &cfg.objective,
            epoch as f64 + within as f64 / steps_per_epoch as f64,
        );
        let lr = learning_rate(&cfg.optim, epoch as usize);
        let out = train_step(
            &st.model,
            &mut st.opt,
            cfg,
            &data.train,
            idx,
            st.step,
            beta,
            lr,
            &device,
        )?;
        if out.applied == Some(false) {
            let loss = out.loss.to_scalar::<f32>()?;
            on_nonfinite(cfg, &mut metrics, &mut skipped, 1, loss, st.step, epoch)?;
        }
        // Window sums stay on the device; they are read at logging intervals only.
        let good_bound = out.skipped.ge(0.5f32)?.where_cond(&zero, &out.bound)?;
        window_bound = (window_bound + good_bound)?;
        window_skipped = (window_skipped + &out.skipped)?;
        window_steps += 1;
        st.step += 1;
        trained_samples += idx.len();
        bar.inc(1);
        window.3 += idx.len();
        if st.step % cfg.train.log_every as u64 == 0 || within as u64 + 1 == steps_per_epoch {
            let loss = out.loss.to_scalar::<f32>()?;
            let window_skips = window_skipped.to_scalar::<f32>()?.round() as usize;
            if out.applied.is_none() && window_skips > 0 {
                // The device skipped these updates itself; apply the policy now.
                on_nonfinite(
                    cfg,
                    &mut metrics,
                    &mut skipped,
                    window_skips,
                    loss,
                    st.step,
                    epoch,
                )?;
            }
            let secs = window.2.elapsed().as_secs_f64();
            let sps = window.3 as f64 / secs.max(1e-9);
            let bound = window_bound.to_scalar::<f32>()? as f64
                / window_steps.saturating_sub(window_skips).max(1) as f64;
            bar.set_message(format!("bound {bound:.2} | {sps:.0} samples/s"));
            metrics.log(
                "train",
                st.step,
                st.step as f64 / steps_per_epoch as f64,
                &[
                    ("bound", bound),
                    ("loss", loss as f64),
                    ("lr", lr),
                    ("kl_weight", beta),
                    ("samples_per_s", sps),
                    ("wall_s", t_start.elapsed().as_secs_f64()),
                    ("skipped_steps", skipped as f64),
                ],
            )?;
            window = (0.0, 0, Instant::now(), 0);
            window_bound = zero.clone();
            window_skipped = zero.clone();
            window_steps = 0;
        }
        let epoch_done = within as u64 + 1 == steps_per_epoch;
        let every = cfg.train.checkpoint_every_steps as u64;
        let mut want_checkpoint = every > 0 && st.step % every == 0;
        let mut valid_score = None;
        if epoch_done {
            let e = epoch as usize + 1;
            let last = e == cfg.train.epochs;
            if cfg.train.eval_every > 0 && (e % cfg.train.eval_every == 0 || last) {
                let t = Instant::now();
                // Reported as positive nats (negative ELBO), like the NLL.
                let test_elbo =
                    -eval::mean_elbo(&st.model, &data.test, data.test.len(), 1000, seed)?;
                let mut fields = vec![("test_elbo", test_elbo)];
                if let Some(v) = &data.valid {
                    let score = -eval::mean_elbo(&st.model, v, v.len(), 1000, seed)?;
                    valid_score = Some(score);
                    fields.push(("valid_elbo", score));
                }
                fields.push(("eval_s", t.elapsed().as_secs_f64()));
                fields.push(("wall_s", t_start.elapsed().as_secs_f64()));
                metrics.log("eval", st.step, e as f64, &fields)?;
                bar.println(format!("epoch {e}: test -ELBO {test_elbo:.2} nats"));
                last_test_elbo = Some(test_elbo);
                window.2 = Instant::now();
            }
            if last || (cfg.train.sample_every > 0 && e % cfg.train.sample_every == 0) {
                samples::write_samples(
                    &st.model,
                    &run_dir.join(format!("samples-epoch-{e:04}.png")),
                    64,
                    seed,
                    e as u64,
                    (data.rows, data.cols),
                )?;
            }
            want_checkpoint |=
                last || (cfg.train.checkpoint_every > 0 && e % cfg.train.checkpoint_every == 0);
        }
        if want_checkpoint {
            let dir = save_checkpoint(
                cfg,
                &data,
                &st,
                run_dir,
                st.step / steps_per_epoch,
                cfg.train.keep_checkpoints,
            )?;
            saved_at = Some(st.step);
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
        if stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    let seconds_training = t_train.elapsed().as_secs_f64();
    let finished = st.step >= total_steps;
    if !finished && saved_at != Some(st.step) {
        // Stopped early (signal or --max-steps): checkpoint here so the run can be resumed.
        save_checkpoint(
            cfg,
            &data,
            &st,
            run_dir,
            st.step / steps_per_epoch,
            cfg.train.keep_checkpoints,
        )?;
    }
    if interrupted {
        metrics.log(
            "interrupted",
            st.step,
            st.step as f64 / steps_per_epoch as f64,
            &[("wall_s", t_start.elapsed().as_secs_f64())],
        )?;
    }
    let final_eval = if finished && !interrupted && cfg.eval.final_k > 0 {
        let r = eval::evaluate(
            &st.model,
            &data.test,
            cfg.eval.final_k,
            cfg.eval.final_limit,
            cfg.eval.max_rows,
            seed,
        )?;
        metrics.log(
            "final_eval",
            st.step,
            cfg.train.epochs as f64,
            &[
                ("test_elbo", r.test_elbo),
                ("nll", r.nll),
                ("nll_stderr", r.nll_stderr),
                ("k", r.k as f64),
                ("n", r.n as f64),
                ("bits_per_dim", r.bits_per_dim),
            ],
        )?;
        Some(r)
    } else {
        None
    };
    if finished && (data.rows > 1) {
        samples::write_reconstructions(
            &st.model,
            &data.test,
            &run_dir.join("reconstructions.png"),
            32,
            (data.rows, data.cols),
        )?;
    }
    metrics.flush()?;
    Ok(TrainSummary {
        run_dir: run_dir.clone(),
        steps: st.step,
        epochs: cfg.train.epochs,
        samples_per_s: trained_samples as f64 / seconds_training.max(1e-9),
        test_elbo: last_test_elbo,
        final_eval,
        seconds: t_start.elapsed().as_secs_f64(),
        interrupted,
    })
}
