//! `trainer launch`: one data-parallel group of `trainer train` processes on this machine.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cli::resolve::default_run_dir;
use crate::cli::LaunchArgs;
use crate::launch::{rank_arguments, Placement};

/// Starts one `trainer train` per GPU (`--gpus`) or CPU share (`--processes`) with the group
/// flags added, forwards signals, and waits for all of them.
///
/// # Errors
/// No free port for the default rendezvous, train flags that clash with the group's, a rank
/// that fails (the others are stopped), or an executable that cannot be located.
pub(crate) fn run(a: &LaunchArgs) -> Result<()> {
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
    // The run directory every rank is given when the train flags name none.
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
    crate::launch::run(&exe, &ranks, std::time::Duration::from_secs(a.grace)).context("launch")?;
    Ok(())
}
