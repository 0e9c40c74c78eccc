//! A run killed at random moments (SIGKILL, including inside checkpoint writes) always resumes
//! from `latest` and ends with exactly the parameters of an uninterrupted run; SIGINT finishes the
//! step, checkpoints and exits 0; a second SIGINT exits at once without touching checkpoints.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn latest_model(run: &Path) -> std::path::PathBuf {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    run.join(latest.trim()).join("model.safetensors")
}

fn spawn(args: &[&str], failpoint_ms: u64) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            gentrain::checkpoint::FAILPOINT_SLEEP_ENV,
            failpoint_ms.to_string(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// The small test config with `epochs`, a checkpoint every `every_steps` steps (0: off) and
/// every `every_epochs` epochs.
fn config(
    tmp: &Path,
    epochs: usize,
    every_steps: usize,
    every_epochs: usize,
) -> std::path::PathBuf {
    let data = small_mnist(&tmp.join("data"), 400, 50);
    let p = small_config(tmp, &data, "");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(
            "epochs = 2",
            &format!("epochs = {epochs}\ncheckpoint_every_steps = {every_steps}\ncheckpoint_every = {every_epochs}\neval_every = 0\nsample_every = 0"),
        )
        .replace("batch_size = 50", "batch_size = 40")
        .replace("final_k = 20", "final_k = 0");
    std::fs::write(&p, text).unwrap();
    p
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
    let tmp = tempfile::tempdir().unwrap();
    // 500 steps (10 per epoch) with a checkpoint after every step; checkpointing draws no
    // random numbers, so the reference run may skip it.
    let cfg = config(tmp.path(), 50, 1, 1);
    let cfg = cfg.to_str().unwrap();
    let reference = tmp.path().join("reference");
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        reference.to_str().unwrap(),
        "--set",
        "train.checkpoint_every_steps=0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = trainer(&start_or_resume(cfg, &run, &run_s));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 200, 0, 1);
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let child = spawn(
        &[
            "train",
            "--config",
            cfg,
            "--out",
            run.to_str().unwrap(),
            "--json",
        ],
        0,
    );
    // Wait for training to be under way (the first epoch's metrics), then interrupt.
    let t0 = Instant::now();
    while !std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|m| m.lines().count() >= 3)
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let ck = gentrain::session::load_checkpoint(&run, &candle_core::Device::Cpu).unwrap();
    assert!(ck.step > 0 && ck.step < 2000, "stopped at step {}", ck.step);
    // Resuming for a few epochs equals a straight run of the same length.
    let epochs = (ck.step / 10 + 2).to_string();
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        &epochs,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let straight = tmp.path().join("straight");
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        straight.to_str().unwrap(),
        "--epochs",
        &epochs,
        "--json",
    ]);
    assert!(out.status.success());
    assert_eq!(
        tensors(&latest_model(&straight)),
        tensors(&latest_model(&run))
    );
}

#[test]
fn second_sigint_exits_at_once_without_touching_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    // No periodic checkpoints: the only write is the one the first signal asks for.
    let cfg = config(tmp.path(), 200, 0, 1000);
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    // Every checkpoint write stalls for 3 s before it is published.
    let child = spawn(
        &[
            "train",
            "--config",
            cfg,
            "--out",
            run.to_str().unwrap(),
            "--json",
        ],
        3000,
    );
    let t0 = Instant::now();
    while !std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|m| m.lines().count() >= 3)
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, "-INT");
    // The first signal starts the (stalled) checkpoint write; the second must not wait for it.
    let t_first = Instant::now();
    while !write_in_progress(&run) {
        assert!(
            t_first.elapsed() < Duration::from_secs(20),
            "no checkpoint write started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&child, "-INT");
    let t_second = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t_second.elapsed() < Duration::from_millis(2500),
        "the second signal did not exit at once"
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was published: the interrupted write never became `latest`.
    assert!(!run.join("latest").exists());
    // The next start cleans the unfinished write up and trains normally.
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        run.to_str().unwrap(),
        "--epochs",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!write_in_progress(&run));
}
