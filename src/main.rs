//! `trainer`: parses flags, sets up logging, runs the command, and maps the outcome to an exit
//! code: 0 when it succeeded (or stdout was closed under it), 1 when `check-kernels` ran and
//! found a disagreement, 2 for any other error, printed as one line on stderr.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`trainer eval --json | head -c 1`): stop quietly, as ripgrep does.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            // 1: checks ran and some failed (their lines are printed); 2: anything else.
            match e.downcast_ref::<gentrain::error::Error>() {
                Some(gentrain::error::Error::ChecksFailed { .. }) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

/// Parses the command line (clap exits on `--help` and on bad flags), sets up logging on stderr
/// (`RUST_LOG`, `warn` by default) and runs the command.
fn run() -> anyhow::Result<()> {
    gentrain::device::keep_freed_memory();
    let cli = match gentrain::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_on_flag_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    gentrain::cli::run(cli)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `--help` and `--version` print as clap renders them (exit 0); a bad flag or value prints as
/// one line on stderr (clap's message, its hints joined on) and exits 2, like every other user
/// error.
fn exit_on_flag_error(e: clap::Error) -> ! {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    eprintln!("{} (see --help)", parts.join(" "));
    std::process::exit(2)
}
