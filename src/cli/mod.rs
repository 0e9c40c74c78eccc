//! Command-line interface: the clap types (raw values, as parsed) and [`run`], which hands each
//! command to its own function. Flags are resolved into typed values in one place (`resolve`),
//! command output goes through one set of helpers (`output`), and every failure comes back as an
//! error for `main` to print on one line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[macro_use]
mod output;
mod commands;
mod resolve;

pub use resolve::ConfigFlags;

/// gentrain: train and evaluate deep generative models on CPU and CUDA.
#[derive(Debug, Parser)]
#[command(name = "trainer", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of `trainer`, each with its flags.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a TOML config (flags override the file).
    Train(TrainArgs),
    /// Train one data-parallel group on this machine: one `trainer train` process per GPU
    /// (NCCL) or per CPU share (TCP), signals forwarded: `trainer launch --gpus 0,1 -- --config C`.
    Launch(LaunchArgs),
    /// Evaluate a checkpoint: the test likelihood (a VAE's ELBO and importance-sampled NLL, a
    /// flow's exact NLL, a diffusion model's bound; nats and bits/dim), and the sample metrics
    /// (MNIST-FID, Inception-Score analogue, mode coverage, ...).
    Eval(EvalArgs),
    /// Redraw a run directory's training curves (`curves.png`) from its `metrics.jsonl`.
    Plot(PlotArgs),
    /// Write a PNG grid of samples, reconstructions or a latent interpolation.
    Sample(SampleArgs),
    /// Measure training throughput (samples/s) of a config.
    Bench(BenchArgs),
    /// Measure each fused kernel's memory bandwidth against a device copy.
    BenchKernels(BenchKernelsArgs),
    /// Check every fused kernel on a device against the CPU reference (exit 1 on a mismatch, 2 on an error).
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

/// Flags of `trainer train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The config and the flags that override it.
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Run directory (default: runs/<config name>-<unix time>).
    #[allow(rustdoc::invalid_html_tags)] // clap prints this text verbatim as --help
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this run (or checkpoint) directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many optimizer steps in this process, with a checkpoint to resume from
    /// (long runs in chunks, e.g. on a machine lent for minutes).
    #[arg(long)]
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
    #[allow(rustdoc::invalid_html_tags)] // clap prints this text verbatim as --help
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

/// Flags of `trainer eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory (its latest checkpoint) or checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Importance samples (default: the config's eval.k, 5000).
    #[arg(long)]
    pub k: Option<usize>,
    /// Evaluate the first N test images only (0: all; default: the config's eval.limit, 0).
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
    /// `data.dir`: the data (IDX directory, `.npy`/`.npz` file or directory, CIFAR-10 batches or
    /// image folder; docs/data.md). Default: the one the model was trained on.
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
    /// Diffusion models: steps drawn per row for the bound's Monte-Carlo estimate of its
    /// T - 1 KL terms (the prior and reconstruction terms are always exact); 0 sums all T
    /// terms exactly (T network passes per row).
    /// Default: 16.
    #[arg(long)]
    pub t_draws: Option<usize>,
    /// VAE family: also report the NLL estimated from the first k' of the same draws, for each
    /// k' in this comma-separated list (each at most --k). Default: the powers of ten below k,
    /// and k.
    #[arg(long, value_delimiter = ',')]
    pub k_sweep: Option<Vec<usize>>,
    /// VAE family: `importance` (z ~ q(z|x), the default) or `prior` (z ~ p(z), the naive
    /// Monte-Carlo estimate, to compare with).
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorChoice>,
    /// VAE family: write a PNG plot of the k-sweep (NLL against k) to this path.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub sampler: SamplerFlags,
}

/// `--estimator` of `trainer eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EstimatorChoice {
    /// Importance sampling from the encoder, q(z|x).
    Importance,
    /// Naive Monte Carlo: samples from the prior p(z).
    Prior,
}

/// Diffusion models: the sampler of `eval`'s sample metrics and of `sample` (default: the
/// checkpoint's `model.diffusion.sampler`, `sample_steps` and `ddim_eta`).
#[derive(Debug, Clone, Default, Args)]
pub struct SamplerFlags {
    /// `ddpm` (ancestral, all T steps) or `ddim`. Default: the checkpoint's
    /// model.diffusion.sampler.
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerChoice>,
    /// Steps of the DDIM sampler. Default: the checkpoint's model.diffusion.sample_steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's eta (0: deterministic, 1: DDPM's variance). Default: the checkpoint's
    /// model.diffusion.ddim_eta.
    #[arg(long)]
    pub eta: Option<f64>,
}

/// The samplers of a diffusion model.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SamplerChoice {
    /// Ancestral sampling through all T steps.
    Ddpm,
    /// DDIM on `--steps` evenly spaced steps.
    Ddim,
}

/// Flags of `trainer sample`.
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
    /// `data.dir` for reconstructions and interpolations (any source of docs/data.md).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (0: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub sampler: SamplerFlags,
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
    /// A diffusion model's denoising trajectories: n rows, each of 10 states from pure noise
    /// (left) to the sample (right).
    Trajectory,
}

impl SampleKind {
    /// The spelling on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SampleKind::Prior => "prior",
            SampleKind::Reconstructions => "reconstructions",
            SampleKind::Interpolation => "interpolation",
            SampleKind::Trajectory => "trajectory",
        }
    }
}

/// Flags of `trainer bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The config and the flags that override it.
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

/// Flags of `trainer bench-kernels`.
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

/// Flags of `trainer check-kernels`.
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
    /// `data.dir`: the data (IDX directory, `.npy`/`.npz` file or directory, CIFAR-10 batches or
    /// image folder; docs/data.md).
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

/// Runs a parsed command line: resolves its flags, calls the library and prints the outcome on
/// stdout.
///
/// # Errors
/// Any failure of the command, for `main` to print on one line:
/// [`crate::error::Error::ChecksFailed`] when `check-kernels` found a disagreement (exit code
/// 1), anything else for exit code 2. A closed stdout comes back as an I/O error of kind
/// `BrokenPipe` in the chain.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Launch(a) => commands::launch::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Plot(a) => commands::plot::run(a),
        Command::Sample(a) => commands::sample::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::BenchKernels(a) => commands::bench::run_kernels(a),
        Command::CheckKernels(a) => commands::check_kernels::run(a),
        Command::ExportData(a) => commands::export::run(a),
    }
}
