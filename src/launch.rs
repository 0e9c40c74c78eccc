//! `trainer launch`: starts one `trainer train` process per GPU (or per CPU share) on this
//! machine as one data-parallel group (the role of `torchrun --standalone`). Every rank gets the
//! same training flags plus its `--rank`, the world size, a shared rendezvous and, with GPUs, its
//! own `--device cuda:N`. The launcher forwards SIGINT and SIGTERM to every rank (the ranks run
//! in their own process group, so a terminal's Ctrl-C reaches them once, through the launcher,
//! and they stop together at a checkpoint); when a rank fails, the others are stopped and the
//! launcher reports which rank failed.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where the ranks run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// One rank per listed GPU, in this order.
    Gpus(Vec<usize>),
    /// `n` ranks on the CPU, each with an equal share of `cores` threads.
    Cpu { processes: usize, cores: usize },
}

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// A free TCP port on the loopback interface (for a single-machine rendezvous).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Distributed(format!("no free local port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Distributed(format!("no free local port: {e}")))?
        .port())
}

/// The `trainer` arguments of every rank. `train_args` are the user's `trainer train` flags;
/// `out` is used when they name neither `--out` nor `--resume` (every rank must agree on the
/// run directory, so it is fixed here).
pub fn rank_arguments(
    placement: &Placement,
    rendezvous: &str,
    backend: Option<&str>,
    train_args: &[String],
    out: PathBuf,
) -> Result<Vec<Vec<String>>> {
    for f in ["--rank", "--world-size", "--rendezvous", "--backend"] {
        if has_flag(train_args, f) {
            return Err(Error::Config(format!(
                "{f} is set by `trainer launch` for every rank; leave it out of the training flags"
            )));
        }
    }
    let (world, backend) = match placement {
        Placement::Gpus(g) => (g.len(), backend.unwrap_or("nccl")),
        Placement::Cpu { processes, .. } => (*processes, backend.unwrap_or("tcp")),
    };
    if world == 0 {
        return Err(Error::Config(
            "launch needs --gpus with at least one GPU or --processes of at least 1".into(),
        ));
    }
    if let Placement::Gpus(g) = placement {
        if has_flag(train_args, "--device") {
            return Err(Error::Config(
                "--gpus gives every rank its own --device; leave --device out".into(),
            ));
        }
        let mut seen = g.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != g.len() {
            return Err(Error::Config(format!("--gpus lists a GPU twice: {g:?}")));
        }
    }
    let mut base: Vec<String> = vec!["train".into()];
    base.extend(train_args.iter().cloned());
    if !has_flag(train_args, "--out") && !has_flag(train_args, "--resume") {
        base.push("--out".into());
        base.push(out.display().to_string());
    }
    Ok((0..world)
        .map(|rank| {
            let mut a = base.clone();
            a.extend([
                "--world-size".into(),
                world.to_string(),
                "--rank".into(),
                rank.to_string(),
                "--rendezvous".into(),
                rendezvous.to_string(),
                "--backend".into(),
                backend.to_string(),
            ]);
            match placement {
                Placement::Gpus(g) => a.extend(["--device".into(), format!("cuda:{}", g[rank])]),
                Placement::Cpu { processes, cores } => {
                    if !has_flag(train_args, "--device") {
                        a.extend(["--device".into(), "cpu".into()]);
                    }
                    if !has_flag(train_args, "--threads") {
                        a.extend(["--threads".into(), (cores / processes).max(1).to_string()]);
                    }
                }
            }
            a
        })
        .collect())
}

fn signal_child(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped (its pid cannot be reused).
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Runs `exe` once per entry of `ranks` and waits for all of them. Forwards SIGINT / SIGTERM;
/// when a rank fails, sends the others SIGTERM (and SIGKILL after `grace`).
pub fn run(exe: &std::path::Path, ranks: &[Vec<String>], grace: Duration) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let received = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM] {
        let r = Arc::clone(&received);
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            signal_hook::low_level::register(sig, move || r.store(sig as usize, Ordering::SeqCst))
        }
        .map_err(|e| Error::Config(format!("cannot install signal handler: {e}")))?;
    }
    let mut children: Vec<Option<Child>> = Vec::with_capacity(ranks.len());
    for (rank, args) in ranks.iter().enumerate() {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(exe);
        cmd.args(args).process_group(0);
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(Error::Distributed(format!(
                    "cannot start rank {rank} ({}): {e}",
                    exe.display()
                )));
            }
        }
    }
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut forwarded = 0usize;
    loop {
        let sig = received.swap(0, Ordering::SeqCst);
        if sig != 0 {
            forwarded += 1;
            for c in children.iter().flatten() {
                signal_child(c, sig as i32);
            }
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failure.is_none() {
                        failure = Some((rank, status));
                    }
                    *slot = None;
                }
                Ok(None) => {}
                Err(e) => return Err(Error::Distributed(format!("waiting for rank {rank}: {e}"))),
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if failure.is_some() {
            match stopping_since {
                None => {
                    for c in children.iter().flatten() {
                        signal_child(c, SIGTERM);
                    }
                    stopping_since = Some(Instant::now());
                }
                Some(t) if t.elapsed() > grace => {
                    for c in children.iter_mut().flatten() {
                        let _ = c.kill();
                    }
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some((rank, status)) => Err(Error::Distributed(format!(
            "rank {rank} of {} failed ({status}); the other ranks were stopped{}",
            ranks.len(),
            if forwarded > 0 {
                " after a forwarded signal"
            } else {
                ""
            }
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_rank_gets_its_rank_device_and_the_shared_rendezvous() {
        let r = rank_arguments(
            &Placement::Gpus(vec![2, 0]),
            "tcp://127.0.0.1:1234",
            None,
            &args(&["--config", "c.toml"]),
            "runs/x".into(),
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[1],
            args(&[
                "train",
                "--config",
                "c.toml",
                "--out",
                "runs/x",
                "--world-size",
                "2",
                "--rank",
                "1",
                "--rendezvous",
                "tcp://127.0.0.1:1234",
                "--backend",
                "nccl",
                "--device",
                "cuda:0"
            ])
        );
        let r = rank_arguments(
            &Placement::Cpu {
                processes: 3,
                cores: 8,
            },
            "h:1",
            None,
            &args(&["--resume", "runs/y"]),
            "unused".into(),
        )
        .unwrap();
        assert!(r[2].ends_with(&args(&[
            "--backend",
            "tcp",
            "--device",
            "cpu",
            "--threads",
            "2"
        ])));
        assert!(!r[0].contains(&"--out".to_string()));
    }

    #[test]
    fn conflicting_flags_are_refused() {
        let g = Placement::Gpus(vec![0, 1]);
        for bad in [
            &["--rank", "1"][..],
            &["--device", "cuda:0"],
            &["--world-size=2"],
        ] {
            assert!(rank_arguments(&g, "h:1", None, &args(bad), "o".into()).is_err());
        }
        assert!(
            rank_arguments(&Placement::Gpus(vec![1, 1]), "h:1", None, &[], "o".into()).is_err()
        );
        assert!(rank_arguments(&Placement::Gpus(vec![]), "h:1", None, &[], "o".into()).is_err());
    }
}
