//! `trainer train`: trains a model (alone or as one rank of a data-parallel group) and prints
//! the run's summary.

use anyhow::{Context, Result};

use crate::cli::output::print_json;
use crate::cli::resolve::{parallel_spec, train_config, train_run_dir};
use crate::cli::TrainArgs;
use crate::train::{TrainOptions, TrainSummary};

/// Resolves the config, run directory and group, trains, and (rank 0 only) prints the summary:
/// a note on stderr when a signal interrupted the run, then the figures (or one JSON object).
///
/// # Errors
/// Flags or a config that do not resolve, any failure while training (with the rank when the
/// group has several), or a failed write to stdout.
pub(crate) fn run(a: &TrainArgs) -> Result<()> {
    let cfg = train_config(a)?;
    let out = train_run_dir(a)?;
    let parallel = parallel_spec(a, &cfg)?;
    let root = a.rank == 0;
    let opts = TrainOptions {
        out,
        resume: a.resume.clone(),
        progress: !a.json && root,
        max_steps: a.max_steps,
        handle_signals: true,
        parallel,
    };
    let s = crate::device::with_cpu_threads(cfg.train.threads, || crate::train::train(&cfg, &opts))
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
    print_summary(&s)
}

/// The summary as text: run directory, steps and throughput, then the VAE's test figures or a
/// flow's or GAN's own end-of-run figures.
fn print_summary(s: &TrainSummary) -> Result<()> {
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
        return Ok(());
    }
    // Flows and GANs: their own end-of-run figures (the last epoch's when the run ends without
    // a final evaluation), on stdout like the VAE's.
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
    Ok(())
}
