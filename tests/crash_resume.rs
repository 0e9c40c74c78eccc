//! A run killed at random moments (SIGKILL, including inside checkpoint writes) always resumes
//! from `latest` and ends with exactly the parameters of an uninterrupted run; SIGINT finishes the
//! step, checkpoints and exits 0; a second SIGINT exits at once without touching checkpoints.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// `trainer ARGS` started with every checkpoint write stalled by `failpoint_ms`.
fn spawn(args: &[&str], failpoint_ms: u64) -> std::process::Child {
    let ms = failpoint_ms.to_string();
    spawn_trainer(
        args,
        &[(gentrain::checkpoint::FAILPOINT_SLEEP_ENV, ms.as_str())],
    )
}

/// Starts `trainer train --config cfg --out run --json` (see [`spawn`]), waits until training
/// is under way (the first epoch's metrics) and sends it SIGINT.
fn start_then_interrupt(cfg: &str, run: &Path, failpoint_ms: u64) -> std::process::Child {
    let args = [
        "train",
        "--config",
        cfg,
        "--out",
        run.to_str().unwrap(),
        "--json",
    ];
    let child = spawn(&args, failpoint_ms);
    wait_for_metrics(run, 3, Duration::from_secs(60));
    send_signal(&child, "-INT");
    child
}

/// [`small_setup`] of 400 images with `epochs`, a checkpoint every `every_steps` steps (0: off)
/// and every `every_epochs` epochs: `(directory, config path)`.
fn setup(
    epochs: usize,
    every_steps: usize,
    every_epochs: usize,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let (tmp, p) = small_setup(400, 50);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(
            "epochs = 2",
            &format!("epochs = {epochs}\ncheckpoint_every_steps = {every_steps}\ncheckpoint_every = {every_epochs}\neval_every = 0\nsample_every = 0"),
        )
        .replace("batch_size = 50", "batch_size = 40")
        .replace("final_k = 20", "final_k = 0");
    std::fs::write(&p, text).unwrap();
    (tmp, p)
}

/// True while an unfinished checkpoint write (a `.tmp-ckpt-*` directory) is in `run`.
fn write_in_progress(run: &Path) -> bool {
    std::fs::read_dir(run)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-ckpt-"))
        })
        .unwrap_or(false)
}

/// `trainer train` arguments that continue `run` if it has a checkpoint, or start it.
fn start_or_resume<'a>(cfg: &'a str, run: &'a Path, run_s: &'a str) -> Vec<&'a str> {
    let how = if run.join("latest").exists() {
        "--resume"
    } else {
        "--out"
    };
    vec!["train", "--config", cfg, how, run_s, "--json"]
}

#[test]
fn sigkill_at_twenty_random_moments_then_resume_matches_uninterrupted_run() {
    // 500 steps (10 per epoch) with a checkpoint after every step; checkpointing draws no
    // random numbers, so the reference run may skip it.
    let (tmp, cfg) = setup(50, 1, 1);
    let cfg = cfg.to_str().unwrap();
    let reference = tmp.path().join("reference");
    train_ok(
        cfg,
        &[
            "--out",
            reference.to_str().unwrap(),
            "--set",
            "train.checkpoint_every_steps=0",
            "--json",
        ],
    );

    let run = tmp.path().join("crashy");
    let run_s = run.to_str().unwrap().to_string();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261123);
    let mut kills_inside_writes = 0;
    // The failpoint stretches every checkpoint write by 10 ms, so most random moments after
    // start-up fall between writing a checkpoint's files and publishing it; each attempt lives
    // at most 400 ms, so 20 attempts do not reach the end of the run.
    const STALL_MS: u64 = 10;
    let horizon = 400;
    for _ in 0..20 {
        let mut child = spawn(&start_or_resume(cfg, &run, &run_s), STALL_MS);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..horizon)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if write_in_progress(&run) {
            kills_inside_writes += 1;
        }
        if run.join("latest").exists() {
            // Whatever `latest` names is complete and loadable.
            let ck = gentrain::session::load_checkpoint(&run, &candle_core::Device::Cpu)
                .expect("latest checkpoint loads");
            assert!(ck.dir.join("optim.safetensors").is_file());
        }
    }
    assert_success(&trainer(&start_or_resume(cfg, &run, &run_s)));
    assert_eq!(
        tensors(&latest_model(&reference)),
        tensors(&latest_model(&run)),
        "parameters differ from the uninterrupted run"
    );
    eprintln!("{kills_inside_writes} of 20 kills interrupted a checkpoint write");
    assert!(
        kills_inside_writes >= 1,
        "no kill landed inside a checkpoint write; the test did not test that case"
    );
}

#[test]
fn sigint_checkpoints_and_exits_zero_and_the_run_resumes_exactly() {
    let (tmp, cfg) = setup(200, 0, 1);
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let child = start_then_interrupt(cfg, &run, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let ck = gentrain::session::load_checkpoint(&run, &candle_core::Device::Cpu).unwrap();
    assert!(ck.step > 0 && ck.step < 2000, "stopped at step {}", ck.step);
    // Resuming for a few epochs equals a straight run of the same length.
    let epochs = (ck.step / 10 + 2).to_string();
    let (r, straight) = (run.to_str().unwrap(), tmp.path().join("straight"));
    train_ok(cfg, &["--resume", r, "--epochs", &epochs, "--json"]);
    let s = straight.to_str().unwrap();
    train_ok(cfg, &["--out", s, "--epochs", &epochs, "--json"]);
    assert_eq!(
        tensors(&latest_model(&straight)),
        tensors(&latest_model(&run))
    );
}

#[test]
fn second_sigint_exits_at_once_without_touching_checkpoints() {
    // No periodic checkpoints: the only write is the one the first signal asks for.
    let (tmp, cfg) = setup(200, 0, 1000);
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    // Every checkpoint write stalls for 3 s before it is published.
    let child = start_then_interrupt(cfg, &run, 3000);
    // The first signal starts the (stalled) checkpoint write; the second must not wait for it.
    let t_first = Instant::now();
    while !write_in_progress(&run) {
        assert!(
            t_first.elapsed() < Duration::from_secs(20),
            "no checkpoint write started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(&child, "-INT");
    let t_second = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t_second.elapsed() < Duration::from_millis(2500),
        "the second signal did not exit at once"
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // Nothing was published: the interrupted write never became `latest`.
    assert!(!run.join("latest").exists());
    // The next start cleans the unfinished write up and trains normally.
    train_ok(
        cfg,
        &["--out", run.to_str().unwrap(), "--epochs", "1", "--json"],
    );
    assert!(!write_in_progress(&run));
}
