//! Command-line interface: clap types (raw values) and the dispatch that resolves them into
//! library calls. Every failure comes back as an error for `main` to print on one line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `println!` for command output that returns an error instead of panicking when stdout is
/// closed (`trainer eval --json | head -c 1`); `main` exits quietly on a broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing to stdout")?
    }};
}
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::data::idx::encode_idx;

/// gentrain: train and evaluate deep generative models on CPU and CUDA.
#[derive(Debug, Parser)]
#[command(name = "trainer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a TOML config (flags override the file).
    Train(TrainArgs),
    /// Train one data-parallel group on this machine: one `trainer train` process per GPU
    /// (NCCL) or per CPU share (TCP), signals forwarded: `trainer launch --gpus 0,1 -- --config C`.
    Launch(LaunchArgs),
    /// Evaluate a checkpoint: test ELBO, importance-sampled NLL, active units, bits/dim, and
    /// the sample metrics (MNIST-FID, Inception-Score analogue, mode coverage, ...).
    Eval(EvalArgs),
    /// Redraw a run directory's training curves (`curves.png`) from its `metrics.jsonl`.
    Plot(PlotArgs),
    /// Write a PNG grid of samples, reconstructions or a latent interpolation.
    Sample(SampleArgs),
    /// Measure training throughput (samples/s) of a config.
    Bench(BenchArgs),
    /// Measure each fused kernel's memory bandwidth against a device copy.
    BenchKernels(BenchKernelsArgs),
    /// Check every fused kernel on a device against the CPU reference (exit 2 on a mismatch).
    CheckKernels(CheckKernelsArgs),
    /// Write the exact evaluation data of a config or checkpoint as an IDX file.
    ExportData(ExportArgs),
}

/// Flags of `trainer plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory.
    pub run: PathBuf,
}

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
    /// Directory with IDX image files (MNIST layout).
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

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Run directory (default: runs/<config name>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this run (or checkpoint) directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many steps (for testing resume).
    #[arg(long, hide = true)]
    pub max_steps: Option<u64>,
    /// Data parallelism: processes in the group (`trainer launch` sets this and the three
    /// flags below; set them by hand to span machines). The global batch is train.batch_size.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Data parallelism: this process's rank (0 writes the run directory).
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// Data parallelism: where ranks meet: tcp://HOST:PORT (rank 0 listens there) or
    /// file:PATH on a shared file system (nccl only).
    #[arg(long)]
    pub rendezvous: Option<String>,
    /// Data parallelism: nccl (GPUs) or tcp (CPUs). Default: nccl on cuda, tcp on cpu.
    #[arg(long)]
    pub backend: Option<String>,
    /// Data parallelism: seconds every rank has to reach the rendezvous.
    #[arg(long, default_value_t = 300)]
    pub rendezvous_timeout: u64,
}

/// Flags of `trainer launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// GPUs to train on, one rank each, e.g. 0,1,2,3 (ranks follow this order).
    #[arg(long, value_delimiter = ',', required_unless_present = "processes")]
    pub gpus: Vec<usize>,
    /// Ranks on the CPU instead (tcp backend; the cores are split between them).
    #[arg(long, conflicts_with = "gpus")]
    pub processes: Option<usize>,
    /// Rendezvous (default: tcp://127.0.0.1:<a free port>).
    #[arg(long)]
    pub rendezvous: Option<String>,
    /// Collective backend (default: nccl with --gpus, tcp with --processes).
    #[arg(long)]
    pub backend: Option<String>,
    /// Seconds a failing group's other ranks get to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// The `trainer train` flags, after `--`.
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory (its latest checkpoint) or checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Importance samples (default: the config's eval.k, 5000).
    #[arg(long)]
    pub k: Option<usize>,
    /// Evaluate the first N test images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per forward pass (bounds memory).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (0: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory with IDX image files (default: the one the model was trained on).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed of the importance samples and of the generated samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples drawn for the sample-quality metrics (MNIST-FID, Inception-Score analogue,
    /// class histogram, PCA spectrum, duplicates, mode coverage); 0 skips them. Default:
    /// 10000 for images, 2500 for 2-D points.
    #[arg(long)]
    pub samples: Option<usize>,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Run directory (its latest checkpoint) or checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// How many: prior samples; test images, each shown beside its reconstruction; or for
    /// interpolation, rows (pairs of test images), each of 10 decoded steps. Default: 64 (8 rows
    /// for interpolation).
    #[arg(long)]
    pub n: Option<usize>,
    /// Output PNG file.
    #[arg(long)]
    pub out: PathBuf,
    /// What to draw.
    #[arg(long, value_enum, default_value_t = SampleKind::Prior)]
    pub kind: SampleKind,
    /// Seed of the prior samples (reconstructions and interpolations use no randomness).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory with IDX image files (for reconstructions and interpolations).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Kinds of image grids.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SampleKind {
    /// Samples from the prior, decoded to pixel means.
    Prior,
    /// Test images beside their reconstructions.
    Reconstructions,
    /// Decoded straight lines between posterior means of test images (n rows of 10).
    Interpolation,
}

impl SampleKind {
    /// The spelling on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SampleKind::Prior => "prior",
            SampleKind::Reconstructions => "reconstructions",
            SampleKind::Interpolation => "interpolation",
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Timed steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 30)]
    pub warmup: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchKernelsArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Elements per tensor (rounded down to rows of 784).
    #[arg(long, default_value_t = 1 << 26)]
    pub elements: usize,
    /// Timed calls per kernel.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckKernelsArgs {
    /// Device under test: cuda or cuda:N (cpu checks the harness against itself). Every check
    /// runs; the exit code is 0 when all pass, 1 when any disagrees with the CPU, 2 on an error.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Print one JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `trainer export-data`: only those that change which data is written (the test set
/// is binarized or dequantized with its own fixed seed, whatever the run's).
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Take the config from this run or checkpoint directory instead of --config.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Directory with IDX image files (MNIST layout).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Any config value as section.key=value (TOML syntax), repeatable; the `data` section is
    /// what matters here.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output IDX file (uncompressed).
    #[arg(long)]
    pub out: PathBuf,
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

fn resolve_config(
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

fn checkpoint_config(path: &Path) -> Result<Config> {
    let dir = crate::checkpoint::resolve(path)?;
    let file = crate::checkpoint::LoadedFile::read(&dir.join(crate::checkpoint::MODEL_FILE))?;
    let text = file.meta("config")?;
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(file.error(format!("metadata `config` is not a valid config: {e}")))
    })
}

fn default_run_dir(cfg_path: Option<&Path>) -> PathBuf {
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

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    outln!("{}", crate::report::json::to_json(v)?);
    Ok(())
}

/// The data-parallel group of `trainer train`'s flags (`None` for one process).
fn parallel_spec(a: &TrainArgs, cfg: &Config) -> Result<Option<crate::distributed::ParallelSpec>> {
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
        None if cfg.train.device.starts_with("cuda") => crate::distributed::Backend::Nccl,
        None => crate::distributed::Backend::Tcp,
    };
    Ok(Some(crate::distributed::ParallelSpec {
        rank: a.rank,
        world_size: a.world_size,
        rendezvous: r.parse()?,
        backend,
        timeout: std::time::Duration::from_secs(a.rendezvous_timeout.max(1)),
    }))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Launch(a) => {
            use crate::launch::{rank_arguments, Placement};
            let placement = match a.processes {
                Some(n) => Placement::Cpu {
                    processes: n,
                    cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
                },
                None => Placement::Gpus(a.gpus.clone()),
            };
            let rendezvous = match &a.rendezvous {
                Some(r) => r.clone(),
                None => format!("tcp://127.0.0.1:{}", crate::launch::free_port()?),
            };
            let config = a
                .train_args
                .iter()
                .position(|x| x == "--config")
                .and_then(|i| a.train_args.get(i + 1))
                .map(PathBuf::from);
            let ranks = rank_arguments(
                &placement,
                &rendezvous,
                a.backend.as_deref(),
                &a.train_args,
                default_run_dir(config.as_deref()),
            )?;
            let exe = std::env::current_exe().context("locating the trainer executable")?;
            crate::launch::run(&exe, &ranks, std::time::Duration::from_secs(a.grace))
                .context("launch")?;
            Ok(())
        }
        Command::Train(a) => {
            let fallback = match &a.resume {
                Some(r) if a.flags.config.is_none() => Some(checkpoint_config(r)?),
                _ => None,
            };
            let cfg = resolve_config(&a.flags, a.epochs, fallback)?;
            let out = match (&a.out, &a.resume) {
                (Some(o), _) => o.clone(),
                (None, Some(r)) => run_dir_of(r),
                (None, None) if a.rendezvous.is_some() => bail!(
                    "--world-size {} needs --out (or --resume): every rank must name the same run directory",
                    a.world_size
                ),
                (None, None) => default_run_dir(a.flags.config.as_deref()),
            };
            let parallel = parallel_spec(&a, &cfg)?;
            let root = a.rank == 0;
            let opts = crate::train::TrainOptions {
                out,
                resume: a.resume.clone(),
                progress: !a.json && root,
                max_steps: a.max_steps,
                handle_signals: true,
                parallel,
            };
            let s = crate::device::with_cpu_threads(cfg.train.threads, || {
                crate::train::train(&cfg, &opts)
            })
            .context(if a.world_size > 1 {
                format!("train (rank {} of {})", a.rank, a.world_size)
            } else {
                "train".to_string()
            })?;
            if !root {
                return Ok(());
            }
            if s.interrupted {
                eprintln!(
                    "interrupted at step {}: checkpoint written; continue with `trainer train --resume {}`",
                    s.steps,
                    s.run_dir.display()
                );
            }
            if a.json {
                return print_json(&s);
            }
            outln!("run directory: {}", s.run_dir.display());
            outln!(
                "steps: {}  wall: {:.1} s  throughput: {:.0} samples/s",
                s.steps,
                s.seconds,
                s.samples_per_s
            );
            if let Some(e) = s.test_elbo {
                outln!("test -ELBO: {e:.2} nats");
            }
            if let Some(r) = &s.final_eval {
                outln!(
                    "test NLL (importance sampled, k = {}, first {} test images): {:.2} +- {:.2} nats ({:.4} bits/dim)",
                    r.k, r.n, r.nll, r.nll_stderr, r.bits_per_dim
                );
            } else {
                // Flows and GANs: their own end-of-run figures (the last epoch's when the run
                // ends without a final evaluation), on stdout like the VAE's.
                let (figures, when) = if s.final_figures.is_empty() {
                    (&s.last_eval, " (last epoch)")
                } else {
                    (&s.final_figures, "")
                };
                for (name, v) in figures {
                    if v.fract() == 0.0 && v.abs() < 1e15 {
                        outln!("{name}{when}: {v}");
                    } else {
                        outln!("{name}{when}: {v:.4}");
                    }
                }
            }
            Ok(())
        }
        Command::Eval(a) => {
            let device = crate::device::open_device(a.device.as_deref().unwrap_or("cpu"))?;
            let ck = crate::session::load_checkpoint(&a.checkpoint, &device)?;
            let mut cfg = ck.config.clone();
            if let Some(d) = &a.data_dir {
                cfg.data.dir = d.clone();
            }
            let k = a.k.unwrap_or(cfg.eval.k);
            if k == 0 {
                bail!("--k must be at least 1");
            }
            let max_rows = a.max_rows.unwrap_or(cfg.eval.max_rows);
            if max_rows == 0 {
                bail!("--max-rows must be at least 1");
            }
            let data = crate::session::load_datasets(&cfg)?;
            ck.check_data(&data)?;
            crate::memory::check(
                &format!("--max-rows {max_rows}"),
                crate::memory::f32_bytes(&[
                    max_rows,
                    crate::memory::widest_layer(&cfg, data.dim()),
                    4,
                ]),
            )?;
            let limit = a.limit.unwrap_or(cfg.eval.limit);
            let mut v = serde_json::json!({
                "checkpoint": ck.dir.display().to_string(),
                "step": ck.step,
                "family": cfg.model.family,
            });
            let mut lines = vec![format!(
                "checkpoint: {} (step {}, epoch {})",
                ck.dir.display(),
                ck.step,
                ck.epoch
            )];
            match &ck.model {
                crate::session::Model::Vae(model) => {
                    let r = crate::device::with_cpu_threads(a.threads.unwrap_or(0), || {
                        crate::eval::evaluate(model, &data.test, k, limit, max_rows, a.seed)
                    })?;
                    merge(&mut v, crate::report::json::to_json(&r)?);
                    lines.push(format!(
                        "test -ELBO ({} of {} test images): {:.3} nats",
                        r.n,
                        data.test.len(),
                        r.test_elbo
                    ));
                    lines.push(format!(
                        "test NLL (k = {}, {} images): {:.3} +- {:.3} nats",
                        r.k, r.n, r.nll, r.nll_stderr
                    ));
                    lines.push(format!("bits/dim: {:.4}", r.bits_per_dim));
                    lines.push(format!("active units per layer: {:?}", r.active_units));
                }
                crate::session::Model::Flow(flow) => {
                    let r = crate::device::with_cpu_threads(a.threads.unwrap_or(0), || {
                        crate::eval::evaluate_flow(flow, &data.test, limit, 1000)
                    })?;
                    merge(&mut v, crate::report::json::to_json(&r)?);
                    lines.push(format!(
                        "test NLL (exact, {} rows): {:.3} +- {:.3} nats",
                        r.n, r.nll, r.nll_stderr
                    ));
                    if let Some(b) = r.bits_per_dim {
                        lines.push(format!("bits/dim: {b:.4}"));
                    }
                }
                crate::session::Model::Gan(_) => {
                    lines.push("a GAN has no likelihood: sample metrics only".into());
                }
            }
            let n = a
                .samples
                .unwrap_or(if ck.image_shape.0 > 1 { 10_000 } else { 2_500 });
            crate::memory::check(
                &format!("--samples {n}"),
                crate::memory::f32_bytes(&[n, ck.model.input_dim(), 4]),
            )?;
            if n > 0 {
                let r = crate::device::with_cpu_threads(a.threads.unwrap_or(0), || {
                    crate::metrics::sample_metrics(&ck.model, &cfg, &data, n, a.seed)
                })?;
                lines.extend(r.lines());
                merge(&mut v, crate::report::json::to_json(&r)?);
            }
            if a.json {
                return print_json(&v);
            }
            for l in lines {
                outln!("{l}");
            }
            Ok(())
        }
        Command::Plot(a) => {
            crate::report::plot::write_training_curves(&a.run)?;
            outln!("wrote {}", a.run.join("curves.png").display());
            Ok(())
        }
        Command::Sample(a) => {
            let n = a.n.unwrap_or(match a.kind {
                SampleKind::Interpolation => 8,
                _ => 64,
            });
            if n == 0 {
                bail!("--n must be at least 1");
            }
            let ck = crate::session::load_checkpoint(&a.checkpoint, &candle_core::Device::Cpu)?;
            let images = match a.kind {
                SampleKind::Interpolation => n.saturating_mul(10),
                _ => n,
            };
            // The samples, the model's activations for them and the grid's pixels at once.
            crate::memory::check(
                &format!("sampling {images} images"),
                crate::memory::f32_bytes(&[images, ck.model.input_dim(), 4]),
            )?;
            let shape = ck.image_shape;
            if shape.0 == 1 && matches!(ck.model, crate::session::Model::Vae(_)) {
                bail!("this model was trained on 2-D points, not images");
            }
            let model = match (&ck.model, a.kind) {
                (crate::session::Model::Vae(m), _) => m,
                (crate::session::Model::Gan(_), SampleKind::Prior) => {
                    let mut cfg = ck.config.clone();
                    cfg.train.seed = a.seed;
                    crate::samples::write_model_samples(&ck.model, &cfg, &a.out, n, 0, shape)?;
                    outln!("wrote {}", a.out.display());
                    return Ok(());
                }
                (crate::session::Model::Flow(f), SampleKind::Prior) => {
                    let extent = ck
                        .config
                        .data
                        .synthetic()
                        .map(|s| s.extent())
                        .unwrap_or((-6.0, 6.0));
                    crate::samples::write_flow_samples(f, &a.out, n, a.seed, 0, shape, extent)?;
                    outln!("wrote {}", a.out.display());
                    return Ok(());
                }
                (_, kind) => bail!(
                    "--kind {} needs a model with an encoder (a VAE); this checkpoint is a {}",
                    kind.name(),
                    ck.config.model.family
                ),
            };
            match a.kind {
                SampleKind::Prior => {
                    crate::samples::write_samples(model, &a.out, n, a.seed, 0, shape)?
                }
                SampleKind::Reconstructions | SampleKind::Interpolation => {
                    let mut cfg = ck.config.clone();
                    if let Some(d) = &a.data_dir {
                        cfg.data.dir = d.clone();
                    }
                    let data = crate::session::load_datasets(&cfg)?;
                    ck.check_data(&data)?;
                    if let SampleKind::Reconstructions = a.kind {
                        crate::samples::write_reconstructions(model, &data.test, &a.out, n, shape)?
                    } else {
                        crate::samples::write_interpolation(
                            model, &data.test, &a.out, n, 10, shape,
                        )?
                    }
                }
            }
            outln!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Bench(a) => {
            let cfg = resolve_config(&a.flags, None, None)?;
            let r = crate::device::with_cpu_threads(cfg.train.threads, || {
                crate::bench::bench(&cfg, a.steps, a.warmup)
            })?;
            if a.json {
                return print_json(&r);
            }
            outln!(
                "{} on {} ({} threads), batch {}, k {}: {:.0} samples/s ({:.2} ms/step)",
                r.framework,
                r.device,
                r.threads,
                r.batch,
                r.k,
                r.samples_per_s,
                r.ms_per_step
            );
            Ok(())
        }
        Command::BenchKernels(a) => {
            let device = crate::device::open_device(&a.device)?;
            let r = crate::device::with_cpu_threads(a.threads, || {
                crate::bench::bench_kernels(&device, a.elements, a.repeats)
            })?;
            if a.json {
                return print_json(&r);
            }
            outln!("| kernel | GB/s | fraction of copy | us/call |");
            outln!("| --- | ---: | ---: | ---: |");
            for k in &r {
                outln!(
                    "| {} | {:.1} | {:.2} | {:.1} |",
                    k.kernel,
                    k.gb_per_s,
                    k.fraction_of_copy,
                    k.microseconds_per_call
                );
            }
            Ok(())
        }
        Command::CheckKernels(a) => {
            let device = crate::device::open_device(&a.device)?;
            let r = crate::device::with_cpu_threads(0, || crate::kernel_check::run_all(&device));
            if a.json {
                print_json(&r)?;
            } else {
                for c in &r {
                    match &c.error {
                        None => outln!(
                            "ok    {:<60} max rel err {:.2e} (tol {:.0e})",
                            c.check,
                            c.max_rel_err,
                            c.tolerance
                        ),
                        Some(e) => outln!("FAIL  {:<60} {e}", c.check),
                    }
                }
            }
            let failed = r.iter().filter(|c| !c.passed).count();
            if !a.json {
                outln!("{} passed, {failed} failed", r.len() - failed);
            }
            if failed > 0 {
                return Err(crate::error::Error::ChecksFailed {
                    failed,
                    total: r.len(),
                }
                .into());
            }
            Ok(())
        }
        Command::ExportData(a) => {
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
            let cfg = resolve_config(&flags, None, fallback)?;
            if let Some(reason) = no_idx_form(&cfg) {
                bail!("export-data: {reason}");
            }
            let data = crate::session::load_datasets(&cfg)?;
            let bytes = data
                .test
                .bytes()
                .context("export-data: the evaluation rows are real values, not bytes")?;
            let encoded = encode_idx(&[data.test.len(), data.rows, data.cols], bytes);
            std::fs::write(&a.out, encoded).with_context(|| format!("{}", a.out.display()))?;
            outln!(
                "wrote {} ({} images, {}x{})",
                a.out.display(),
                data.test.len(),
                data.rows,
                data.cols
            );
            Ok(())
        }
    }
}

/// Why the evaluation data of `cfg` cannot be written as IDX bytes, if it cannot.
fn no_idx_form(cfg: &Config) -> Option<String> {
    if cfg.data.synthetic().is_some() {
        return Some(format!(
            "data.dataset = \"{}\" is a set of 2-D points with real coordinates, not images: \
             IDX bytes cannot hold them",
            cfg.data.dataset
        ));
    }
    if cfg.data.binarize == crate::data::Binarization::Dequantize {
        return Some(format!(
            "data.binarize = \"dequantize\": the evaluation images are pixels plus uniform noise, \
             real values that IDX bytes cannot hold (the pixels before the noise are the test \
             images in {} as they stand)",
            cfg.data.dir.display()
        ));
    }
    None
}

/// Copies the fields of the object `extra` into the object `into`.
fn merge(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (into.as_object_mut(), extra) {
        o.extend(e);
    }
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
