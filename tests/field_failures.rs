//! Failures reported from the field (issue 16), each turned into a check: ActNorm initialized
//! from a degenerate batch, a non-finite stop that claimed a checkpoint that was never written,
//! `export-data` giving the wrong reason, and the rough edges of `sample` and of the help texts.

mod common;
use common::*;

use std::path::Path;

/// `trainer train ... --json` with the small RealNVP of the report (2 couplings, MLPs of 64).
fn small_realnvp(run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--set",
        "model.flow.coupling_layers=2",
        "--set",
        "model.flow.hidden=[64]",
        "--out",
        run.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    train_cmd("configs/realnvp-mnist.toml", &args)
}

/// One training image: ActNorm's spread would be 0 in every dimension (it used to become a
/// log-scale of 13.8 everywhere, -38.9 bits/dim at step 1 and 9e25 bits/dim on the test set,
/// with exit 0). Now a clean refusal naming the setting.
#[test]
fn actnorm_on_a_single_training_image_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = small_realnvp(&run, &["--set", "data.limit_train=1", "--epochs", "3"]);
    assert_user_error(&out, "model.flow.actnorm");
    assert!(
        stderr(&out).contains("the training set has 1"),
        "{}",
        stderr(&out)
    );
    assert!(!run.join("latest").exists());
}

/// A batch of one row on a real training set: ActNorm is initialized on more rows than the
/// batch, and the test bits/dim are those of a (barely trained) flow, not 1e26.
#[test]
fn actnorm_with_batch_size_one_gives_sensible_bits_per_dim() {
    let tmp = tempfile::tempdir().unwrap();
    let out = small_realnvp(
        &tmp.path().join("run"),
        &[
            "--set",
            "data.limit_train=300",
            "--batch-size",
            "1",
            "--epochs",
            "1",
        ],
    );
    assert_success(&out);
    let s = stdout_json(&out);
    let bpd = s["final_figures"]["bits_per_dim"].as_f64().unwrap();
    assert!(
        bpd.is_finite() && bpd > 0.5 && bpd < 8.0,
        "bits/dim {bpd}: {s}"
    );
    // Every logged training figure is a possible one too.
    for e in metrics_events(&tmp.path().join("run")) {
        if let Some(b) = e["bits_per_dim"].as_f64() {
            assert!(b > 0.0 && b < 8.0, "{e}");
        }
    }
}

/// Two moons with a batch of one used to stop with exit 2 on a non-finite loss.
#[test]
fn two_moons_train_with_batch_size_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let s = stdout_json(&train_ok(
        "configs/realnvp-moons.toml",
        &[
            "--batch-size",
            "1",
            "--epochs",
            "1",
            "--set",
            "data.synthetic_size=600",
            "--out",
            run.to_str().unwrap(),
            "--json",
        ],
    ));
    let nll = s["final_figures"]["test_nll"].as_f64().unwrap();
    // A standard normal on the standardized moons costs about 2.8 nats.
    assert!(nll.is_finite() && nll < 3.0, "test NLL {nll}: {s}");
}

/// A non-finite stop says which checkpoint is left, and does not claim one when none was written.
#[test]
fn a_non_finite_stop_tells_the_truth_about_checkpoints() {
    let (tmp, cfg) = small_setup(300, 20);
    let fresh = tmp.path().join("fresh");
    let out = train_cmd(&cfg, &["--out", fresh.to_str().unwrap(), "--lr", "1e30"]);
    assert_user_error(&out, "non-finite");
    let msg = stderr(&out);
    assert!(msg.contains("no checkpoint had been saved"), "{msg}");
    assert!(!msg.contains("intact"), "{msg}");
    assert!(!fresh.join("latest").exists());

    // After one good epoch, the message names the checkpoint that is left.
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    train_ok(&cfg, &["--out", r, "--epochs", "1"]);
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    let out = train_cmd(&cfg, &["--resume", r, "--epochs", "3", "--lr", "1e30"]);
    assert_user_error(&out, "is intact");
    assert!(stderr(&out).contains(latest.trim()), "{}", stderr(&out));
}

/// `export-data` on data that has no IDX form names the real reason.
#[test]
fn export_data_gives_the_true_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("x.idx");
    let out_file = out_file.to_str().unwrap();
    for (config, needle) in [
        (
            "configs/realnvp-mnist.toml",
            "data.binarize = \"dequantize\"",
        ),
        (
            "configs/vae-gaussian-dequantized.toml",
            "data.binarize = \"dequantize\"",
        ),
        ("configs/realnvp-moons.toml", "2-D points"),
    ] {
        let out = trainer(&["export-data", "--config", config, "--out", out_file]);
        assert_user_error(&out, needle);
        assert!(
            !stderr(&out).contains("synthetic data"),
            "{config}: {}",
            stderr(&out)
        );
    }
    assert!(!Path::new(out_file).exists());
    // Images that are bytes still export.
    let out = trainer(&[
        "export-data",
        "--config",
        "configs/vae-examples.toml",
        "--out",
        out_file,
    ]);
    assert_success(&out);
}

/// Help texts: the top level names every family; `export-data` lists only flags that apply.
#[test]
fn help_texts_say_what_applies() {
    let top = String::from_utf8_lossy(&trainer(&["--help"]).stdout).into_owned();
    for family in ["VAE", "flow", "GAN"] {
        assert!(top.contains(family), "{family} missing from: {top}");
    }
    let export = String::from_utf8_lossy(&trainer(&["export-data", "--help"]).stdout).into_owned();
    for flag in ["--config", "--checkpoint", "--data-dir", "--set", "--out"] {
        assert!(export.contains(flag), "{flag} missing from: {export}");
    }
    for flag in [
        "--lr",
        "--batch-size",
        "--k ",
        "--threads",
        "--device",
        "--seed",
    ] {
        assert!(!export.contains(flag), "{flag} listed by: {export}");
    }
    let sample = String::from_utf8_lossy(&trainer(&["sample", "--help"]).stdout).into_owned();
    assert!(sample.contains("rows"), "--n of interpolation: {sample}");
}

/// The DCGAN's image-size error is a sentence, not Rust debug output.
#[test]
fn dcgan_on_odd_sized_images_says_so_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    for (prefix, n) in [("train", 40), ("t10k", 10)] {
        let pixels: Vec<u8> = (0..n * 18 * 26).map(|i| (i * 7 % 256) as u8).collect();
        write_idx(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &[n, 18, 26],
            &pixels,
        );
    }
    let out = train_cmd(
        "configs/sngan-dcgan-mnist.toml",
        &[
            "--data-dir",
            dir.to_str().unwrap(),
            "--epochs",
            "1",
            "--out",
            tmp.path().join("run").to_str().unwrap(),
        ],
    );
    assert_user_error(&out, "18x26 images");
    let msg = stderr(&out);
    assert!(!msg.contains("Some(") && !msg.contains("(18, 26)"), "{msg}");
}

/// `sample`: a reconstruction grid fits the count, `--n` of an interpolation is rows (8 by
/// default), and a wrong kind is spelled as on the command line.
#[test]
fn sample_grids_fit_and_errors_use_the_cli_spelling() {
    let (tmp, _, run) = small_trained_run(300, 40, &["--epochs", "1"]);
    let png = tmp.path().join("grid.png");
    let sample = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = trainer(&args);
        assert_success(&out);
        image::open(&png).unwrap()
    };
    // Tiles of 28 + 2 pixels of padding, plus 2, drawn at scale 2.
    let side = |tiles: u32| 2 * (tiles * 30 + 2);
    let g = sample(&["--kind", "reconstructions", "--n", "4"]);
    assert_eq!((g.width(), g.height()), (side(8), side(1)));
    let g = sample(&["--kind", "reconstructions", "--n", "9"]);
    assert_eq!((g.width(), g.height()), (side(10), side(2)));
    let g = sample(&["--kind", "interpolation"]);
    assert_eq!((g.width(), g.height()), (side(10), side(8)));
    let g = sample(&["--kind", "interpolation", "--n", "3"]);
    assert_eq!((g.width(), g.height()), (side(10), side(3)));

    // A model without an encoder.
    let flow_run = tmp.path().join("flow");
    train_ok(
        "configs/realnvp-moons.toml",
        &[
            "--epochs",
            "1",
            "--set",
            "data.synthetic_size=300",
            "--out",
            flow_run.to_str().unwrap(),
        ],
    );
    let out = trainer(&[
        "sample",
        "--checkpoint",
        flow_run.to_str().unwrap(),
        "--kind",
        "reconstructions",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert_user_error(&out, "--kind reconstructions needs");
    let msg = stderr(&out);
    assert!(!msg.contains("Reconstructions"), "{msg}");
}

/// The `train` events of a run's metrics.jsonl as (step, epoch, lr).
fn train_events(run: &Path) -> Vec<(u64, f64, f64)> {
    metrics_events(run)
        .into_iter()
        .filter(|v| v["event"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["epoch"].as_f64().unwrap(),
                v["lr"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The `epoch` and `epoch_offset` metadata of the run's latest checkpoint.
fn latest_position(run: &Path) -> (u64, String, String) {
    let m = checkpoint_metadata(&latest_model(run));
    (
        m["step"].parse().unwrap(),
        m["epoch"].clone(),
        m["epoch_offset"].clone(),
    )
}

/// Resumed with another batch size, a run used to read its step count under the new batch
/// size: step 10 of batch 128 became half-way through epoch 1 at batch 64, half an epoch was
/// trained twice at epoch 1's learning rate, and the epoch in metrics.jsonl went backwards.
#[test]
fn resume_with_another_batch_size_trains_exactly_the_epochs_asked() {
    // A learning rate that halves every epoch, so the epoch of every step shows in its lr.
    let optim = "[optim]\nschedule = \"step\"\nstep_epochs = 1\ngamma = 0.5\n";
    let (tmp, cfg) = small_setup_with(200, 20, "", "", optim);
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    // One epoch at batch 50 (4 steps), then a second one at batch 20 (10 steps).
    train_ok(&cfg, &["--epochs", "1", "--batch-size", "50", "--out", r]);
    assert_eq!(latest_position(&run), (4, "1".into(), "0".into()));
    train_ok(
        &cfg,
        &["--epochs", "2", "--batch-size", "20", "--resume", r],
    );
    assert_eq!(latest_position(&run), (14, "2".into(), "0".into()));
    // A seed change on resume used to pass without a word.
    let reseeded = stderr(&train_ok(
        &cfg,
        &[
            "--epochs",
            "3",
            "--seed",
            "77",
            "--resume",
            r,
            "--max-steps",
            "1",
        ],
    ));
    assert!(
        reseeded.contains("resume overrides train.seed"),
        "{reseeded}"
    );
    // Mid-epoch: 2 steps of 50 (100 rows), then the rest of the epoch at batch 30 (4 steps:
    // 30, 30, 30, 10), then a second epoch (7 steps).
    let run2 = tmp.path().join("run2");
    let r2 = run2.to_str().unwrap();
    train_ok(
        &cfg,
        &[
            "--epochs",
            "2",
            "--batch-size",
            "50",
            "--max-steps",
            "2",
            "--out",
            r2,
        ],
    );
    assert_eq!(latest_position(&run2), (2, "0".into(), "100".into()));
    train_ok(
        &cfg,
        &["--epochs", "2", "--batch-size", "30", "--resume", r2],
    );
    assert_eq!(latest_position(&run2), (2 + 4 + 7, "2".into(), "0".into()));
    let events = train_events(&run2);
    assert!(
        events
            .windows(2)
            .all(|w| w[1].0 > w[0].0 && w[1].1 >= w[0].1),
        "steps and epochs must rise: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!((last.0, last.1), (13, 2.0));
    // Resuming the finished run says so (and how to extend it) instead of doing nothing silently.
    let again = stderr(&train_ok(&cfg, &["--epochs", "2", "--resume", r2]));
    assert!(
        again.contains(
            "nothing to train: the checkpoint has 2 epochs trained and train.epochs is 2"
        ),
        "{again}"
    );
    assert_eq!(train_events(&run2), events);
    // Steps 1..=6 are epoch 1 (lr 0.001 x 1), steps 7..=13 epoch 2 (lr halved).
    for (step, _, lr) in &events {
        let want = if *step <= 6 { 1e-3 } else { 5e-4 };
        assert!(
            (lr - want).abs() < 1e-12,
            "step {step}: lr {lr}, want {want}"
        );
    }
}

/// Requests larger than the machine used to abort the process (`memory allocation of
/// 160000000000 bytes failed`, exit 134): now refused with exit 2 before anything is allocated.
#[test]
fn requests_larger_than_the_machine_are_refused_before_allocating() {
    let (tmp, cfg) = small_setup(100, 20);
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let cfg_s = cfg.to_str().unwrap();
    for (config, set, needle) in [
        (
            cfg_s,
            "model.layers=[{hidden=[100000,100000], latent=20}]",
            "training this model",
        ),
        (cfg_s, "objective.k=100000000", "GiB"),
        (cfg_s, "eval.max_rows=100000000000", "eval.max_rows"),
        (
            "configs/realnvp-moons.toml",
            "data.synthetic_size=100000000000",
            "data.synthetic_size",
        ),
        (
            "configs/realnvp-moons.toml",
            "data.synthetic_size=100000000000",
            "data.synthetic_size",
        ),
    ] {
        assert_user_error(&train_cmd(config, &["--out", r, "--set", set]), needle);
    }
    assert!(!run.join("latest").exists());
    train_ok(&cfg, &["--epochs", "1", "--out", r]);
    let png = tmp.path().join("x.png");
    let p = png.to_str().unwrap();
    for args in [
        vec![
            "bench",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "model.layers=[{hidden=[100000,100000], latent=20}]",
        ],
        vec![
            "bench-kernels",
            "--device",
            "cpu",
            "--elements",
            "100000000000",
        ],
        vec!["sample", "--checkpoint", r, "--n", "100000000", "--out", p],
        vec![
            "sample",
            "--checkpoint",
            r,
            "--kind",
            "interpolation",
            "--n",
            "100000000",
            "--out",
            p,
        ],
        vec![
            "eval",
            "--checkpoint",
            r,
            "--samples",
            "100000000000",
            "--k",
            "2",
        ],
        vec![
            "eval",
            "--checkpoint",
            r,
            "--max-rows",
            "100000000000",
            "--k",
            "2",
        ],
    ] {
        assert_user_error(&trainer(&args), "GiB");
    }
    assert!(!png.exists());
}

/// Flows and GANs used to print no result figure unless stderr was a terminal (it went to the
/// progress bar only); every family prints its figures on stdout, as the VAE does.
#[test]
fn every_family_prints_its_final_figures_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    for (config, figure) in [
        ("configs/realnvp-moons.toml", "test_nll: "),
        ("configs/sngan-grid25.toml", "modes_covered: "),
    ] {
        let run = tmp.path().join(figure.trim_end_matches(": "));
        let out = train_ok(
            config,
            &[
                "--epochs",
                "1",
                "--set",
                "data.synthetic_size=1000",
                "--out",
                run.to_str().unwrap(),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(figure), "{config}: {stdout}");
    }
}
