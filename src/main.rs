//! `trainer`: parses flags, sets up logging, runs the command, and maps any error to one line on
//! stderr and exit code 2 (1 when `check-kernels` ran and found a disagreement).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = gentrain::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match gentrain::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`trainer eval --json | head -c 1`): stop quietly, as ripgrep does.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            // 1: checks ran and some failed (their lines are printed); 2: anything else.
            match e.downcast_ref::<gentrain::error::Error>() {
                Some(gentrain::error::Error::ChecksFailed { .. }) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
