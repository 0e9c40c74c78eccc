//! Bad input gets one line on stderr and exit code 2, never a panic: bad flags and config values,
//! malformed data files, and corrupt or mismatched checkpoints.

mod common;
use common::*;

#[test]
fn bad_flags_and_config_values() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--k",
                "0",
                "--epochs",
                "1",
            ],
            "objective.k",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--batch-size",
                "0",
            ],
            "batch_size",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--lr",
                "-0.1",
            ],
            "optim.lr",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--device",
                "cuda:9",
            ],
            "cuda:9",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--device",
                "tpu",
            ],
            "unknown device",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "train.no_such_key=1",
            ],
            "no_such_key",
        ),
        (
            &["train", "--config", "configs/does-not-exist.toml"],
            "does-not-exist.toml",
        ),
        (&["train"], "--config"),
        (
            &["eval", "--checkpoint", "/nonexistent/run"],
            "does not exist",
        ),
        // The players' own optimizer settings: only for a GAN, and valid values.
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "optim.d_lr=4e-4",
            ],
            "not one",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "optim.g_lr=-1e-4",
            ],
            "optim.g_lr",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "optim.d_betas=[0.5, 1.0]",
            ],
            "optim.d_betas",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "model.gan.loss=\"wgan_gp\"",
                "--set",
                "model.gan.penalty=\"r1\"",
            ],
            "gradient penalty already",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "model.gan.r1_gamma=-1",
            ],
            "r1_gamma",
        ),
        // The IWAE reference recipe's options: a VAE's, and valid values.
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "model.init=\"glorot_uniform\"",
            ],
            "model.family = \"gan\"",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "model.gaussian_head=\"log_std\"",
            ],
            "log_std",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "optim.second_moment_init=-1",
            ],
            "optim.second_moment_init",
        ),
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "optim.kind=\"sgd\"",
                "--set",
                "optim.second_moment_init=1",
            ],
            "Adam's",
        ),
        // Another family's section is refused rather than ignored.
        (
            &[
                "train",
                "--config",
                "configs/vae-examples.toml",
                "--set",
                "model.gan.loss=\"minimax\"",
            ],
            "[model.gan] is set but model.family = \"vae\"",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "model.diffusion.timesteps=10",
            ],
            "[model.diffusion]",
        ),
        (
            &[
                "train",
                "--config",
                "configs/sngan-grid25.toml",
                "--set",
                "optim.kind=\"sgd\"",
                "--set",
                "optim.d_betas=[0.5, 0.9]",
            ],
            "d_betas and g_betas are Adam's",
        ),
    ];
    for (args, needle) in cases {
        let out = trainer(args);
        assert_user_error(&out, needle);
    }
}

#[test]
fn unknown_key_in_a_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    std::fs::write(&p, "[train]\nepochs = 1\nlearning_rate = 0.1\n").unwrap();
    assert_user_error(
        &trainer(&["train", "--config", p.to_str().unwrap()]),
        "learning_rate",
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = trainer(&[
        "train",
        "--config",
        "configs/vae-examples.toml",
        "--epoch",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// Rewrites the file at `path` with `edit` applied to its bytes.
fn edit_file(path: &std::path::Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    edit(&mut b);
    std::fs::write(path, &b).unwrap();
}

fn data_case(mutate: impl Fn(&std::path::Path), needle: &str) {
    let (tmp, cfg) = small_setup(100, 20);
    mutate(&tmp.path().join("data"));
    let out = train_cmd(&cfg, &["--out", tmp.path().join("run").to_str().unwrap()]);
    assert_user_error(&out, needle);
    assert!(!tmp.path().join("run").join("latest").exists());
}

#[test]
fn truncated_idx_file() {
    data_case(
        |d| {
            edit_file(&d.join("train-images-idx3-ubyte"), |b| {
                b.truncate(b.len() - 100)
            })
        },
        "header claims",
    );
}

#[test]
fn corrupt_gzip_stream() {
    data_case(
        |d| {
            let p = d.join("train-images-idx3-ubyte");
            let raw = std::fs::read(&p).unwrap();
            let mut gz = Vec::new();
            {
                use std::io::Write;
                let mut enc =
                    flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
                enc.write_all(&raw).unwrap();
                enc.finish().unwrap();
            }
            let mid = gz.len() / 2;
            for b in &mut gz[mid..mid + 64] {
                *b ^= 0x5a;
            }
            std::fs::remove_file(&p).unwrap();
            std::fs::write(d.join("train-images-idx3-ubyte.gz"), gz).unwrap();
        },
        "train-images-idx3-ubyte.gz",
    );
}

#[test]
fn idx_with_bad_magic() {
    data_case(
        |d| edit_file(&d.join("t10k-images-idx3-ubyte"), |b| b[0] = 0x42),
        "bad magic",
    );
}

#[test]
fn idx_header_claiming_more_than_present() {
    data_case(
        |d| {
            edit_file(&d.join("train-images-idx3-ubyte"), |b| {
                b[4..8].copy_from_slice(&4_000_000_000u32.to_be_bytes())
            })
        },
        "header claims",
    );
}

#[test]
fn image_and_label_counts_differ() {
    data_case(
        |d| write_idx(&d.join("train-labels-idx1-ubyte"), &[99], &[0; 99]),
        "labels",
    );
}

#[test]
fn empty_image_set() {
    data_case(
        |d| write_idx(&d.join("train-images-idx3-ubyte"), &[0, 28, 28], &[]),
        "empty",
    );
}

#[test]
fn missing_data_files() {
    data_case(
        |d| std::fs::remove_file(d.join("train-images-idx3-ubyte")).unwrap(),
        "train-images-idx3-ubyte",
    );
}

/// Trains a tiny model for one epoch: (tempdir, config, run dir).
fn trained_run() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    small_trained_run(100, 20, &["--epochs", "1", "--json"])
}

fn checkpoint_case(mutate: impl Fn(&[u8]) -> Vec<u8>, needle: &str) {
    let (_tmp, _, run) = trained_run();
    edit_file(&latest_model(&run), |b| *b = mutate(b));
    assert_user_error(
        &trainer(&[
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--k",
            "2",
            "--limit",
            "5",
        ]),
        needle,
    );
}

/// [`checkpoint_case`] with the model file's JSON header edited by `edit`.
fn header_case(edit: impl Fn(&mut serde_json::Value), needle: &str) {
    checkpoint_case(|b| safetensors_with_header(b, &edit), needle);
}

#[test]
fn checkpoint_header_length_lies() {
    checkpoint_case(
        |b| {
            let mut b = b.to_vec();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        },
        "not a valid safetensors file",
    );
}

#[test]
fn checkpoint_truncated() {
    checkpoint_case(
        |b| b[..b.len() / 2].to_vec(),
        "not a valid safetensors file",
    );
}

#[test]
fn checkpoint_offsets_out_of_range() {
    header_case(
        |h| h["encoders.0.net.0.bias"]["data_offsets"][1] = serde_json::json!(1u64 << 40),
        "not a valid safetensors file",
    );
}

#[test]
fn checkpoint_wrong_dtype() {
    header_case(
        |h| {
            let off = h["decoders.0.out.bias"]["data_offsets"].clone();
            let (a, z) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
            h["decoders.0.out.bias"] =
                serde_json::json!({"dtype": "I32", "shape": [(z - a) / 4], "data_offsets": [a, z]});
        },
        "dtype",
    );
}

#[test]
fn checkpoint_missing_tensor() {
    header_case(
        |h| {
            let v = h
                .as_object_mut()
                .unwrap()
                .remove("encoders.0.mu.weight")
                .unwrap();
            h["renamed.weight"] = v;
        },
        "encoders.0.mu.weight",
    );
}

#[test]
fn checkpoint_misshapen_tensor() {
    header_case(
        |h| {
            let s = h["encoders.0.mu.weight"]["shape"].clone();
            let (r, c) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
            h["encoders.0.mu.weight"]["shape"] = serde_json::json!([c, r]);
        },
        "shape",
    );
}

#[test]
fn checkpoint_from_an_unknown_family() {
    header_case(
        |h| h["__metadata__"]["model_family"] = serde_json::json!("score"),
        "model family `score`",
    );
}

#[test]
fn checkpoint_family_that_contradicts_its_config() {
    header_case(
        |h| h["__metadata__"]["model_family"] = serde_json::json!("gan"),
        "is `gan` but its config says `vae`",
    );
}

#[test]
fn checkpoint_config_describing_a_huge_model_is_refused_before_allocating() {
    header_case(
        |h| {
            let mut cfg: serde_json::Value =
                serde_json::from_str(h["__metadata__"]["config"].as_str().unwrap()).unwrap();
            cfg["model"]["layers"][0]["hidden"] = serde_json::json!([4_000_000_000u64]);
            h["__metadata__"]["config"] = serde_json::json!(cfg.to_string());
        },
        "describes",
    );
}

#[test]
fn resume_with_a_different_architecture_names_the_field() {
    let (_tmp, cfg, run) = trained_run();
    let r = run.to_str().unwrap();
    let out = train_cmd(
        &cfg,
        &[
            "--resume",
            r,
            "--set",
            "model.layers=[{hidden=[32],latent=8}]",
        ],
    );
    assert_user_error(&out, "model.layers");
    // Another family's fields on this VAE run are refused before the structural comparison
    // (which `config::tests::every_model_field_is_structural_unless_declared_tunable` covers).
    for (set, field) in [
        (
            "model.gan.conv_channels=[8, 16]",
            "[model.gan] is set but model.family = \"vae\"",
        ),
        (
            "model.gan.architecture=\"dcgan\"",
            "[model.gan] is set but model.family = \"vae\"",
        ),
    ] {
        let out = train_cmd(&cfg, &["--resume", r, "--set", set]);
        assert_user_error(&out, field);
    }
    // Adam's initial second moment cannot apply to a resumed run (the moment is restored): a
    // change is refused rather than logged as an override that does nothing.
    let out = train_cmd(
        &cfg,
        &["--resume", r, "--set", "optim.second_moment_init=1.0"],
    );
    assert_user_error(&out, "optim.second_moment_init differs");
}

#[test]
fn training_into_an_existing_run_is_refused() {
    let (_tmp, cfg, run) = trained_run();
    let before = tensors(&latest_model(&run));
    assert_user_error(
        &train_cmd(&cfg, &["--out", run.to_str().unwrap()]),
        "already holds a run",
    );
    let after = tensors(&latest_model(&run));
    assert_eq!(before, after);
}

#[test]
fn nan_loss_stops_with_exit_2_and_keeps_the_checkpoint() {
    let (_tmp, cfg, run) = trained_run();
    let latest_before = std::fs::read_to_string(run.join("latest")).unwrap();
    // An absurd learning rate drives the loss to infinity within a few steps.
    let r = run.to_str().unwrap();
    let out = train_cmd(&cfg, &["--resume", r, "--epochs", "30", "--lr", "1e30"]);
    assert_user_error(&out, "non-finite");
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap(),
        latest_before
    );
}

#[test]
fn nan_policy_skip_counts_skipped_steps_and_finishes() {
    let (_tmp, cfg, run) = trained_run();
    train_ok(
        &cfg,
        &[
            "--resume",
            run.to_str().unwrap(),
            "--epochs",
            "4",
            "--lr",
            "1e30",
            "--set",
            "train.on_nonfinite=\"skip\"",
            "--set",
            "eval.final_k=0",
            "--json",
        ],
    );
    let events = metrics_events(&run);
    let skipped = events
        .iter()
        .filter(|e| e["event"] == "train")
        .filter_map(|e| e["skipped_steps"].as_f64())
        .fold(0.0, f64::max);
    assert!(skipped >= 1.0, "no step was skipped: {events:?}");
}

/// The inputs the checkpoint fuzzer found (`fuzz/reproducers/`, see `docs/fuzzing.md`): each used
/// to panic or to allocate without bound; each must now be one clean error line.
#[test]
fn fuzz_reproducers_are_refused_with_exit_2() {
    let cases = [
        ("checkpoint-zero-input-dim.safetensors", "`input_dim` is 0"),
        (
            "checkpoint-image-shape-overflow.safetensors",
            "does not match input_dim",
        ),
        ("checkpoint-huge-hidden.safetensors", "describes"),
    ];
    for (file, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/reproducers")
            .join(file);
        std::fs::copy(&source, tmp.path().join("model.safetensors")).unwrap();
        let out = trainer(&[
            "eval",
            "--checkpoint",
            tmp.path().to_str().unwrap(),
            "--k",
            "2",
            "--limit",
            "5",
        ]);
        assert_user_error(&out, needle);
    }
}

/// `bytes` with the first value of tensor `name` set to `v`.
fn with_value(bytes: &[u8], name: &str, v: f32) -> Vec<u8> {
    let (n, h) = safetensors_header(bytes);
    let start = 8 + n + h[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut b = bytes.to_vec();
    b[start..start + 4].copy_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn checkpoint_with_a_non_finite_parameter_is_refused_by_name() {
    // It used to evaluate to `test NLL: inf +- NaN` with exit 0 (a NaN log-weight read as
    // probability zero).
    for v in [f32::NAN, f32::INFINITY] {
        checkpoint_case(
            |b| with_value(b, "decoders.0.out.bias", v),
            "tensor `decoders.0.out.bias` holds a non-finite value",
        );
    }
}

#[test]
fn resume_from_a_non_finite_optimizer_state_is_refused_by_name() {
    let (_tmp, cfg, run) = trained_run();
    let name = "decoders.0.out.bias.exp_avg_sq";
    edit_file(&latest_checkpoint(&run).join("optim.safetensors"), |b| {
        *b = with_value(b, name, f32::NAN)
    });
    assert_user_error(
        &train_cmd(&cfg, &["--epochs", "2", "--resume", run.to_str().unwrap()]),
        &format!("tensor `{name}` holds a non-finite value"),
    );
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // println! used to panic (exit 101 with a backtrace) when the reader went away, as in
    // `trainer check-kernels --json | head -c 1`.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["check-kernels", "--device", "cpu", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader closes before the command writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// MNIST-layout files of `n` images of `rows x cols` (the first pixels of real MNIST) in `dir`.
fn shaped_set(dir: &std::path::Path, rows: usize, cols: usize, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let set = gentrain::data::images::ImageSet::load(&root, gentrain::data::images::Split::Train)
        .unwrap();
    let pixels = &set.pixels[..n * rows * cols];
    let labels = &set.labels.as_ref().unwrap()[..n];
    for prefix in ["train", "t10k"] {
        write_idx(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &[n, rows, cols],
            pixels,
        );
        write_idx(
            &dir.join(format!("{prefix}-labels-idx1-ubyte")),
            &[n],
            labels,
        );
    }
}

#[test]
fn evaluating_or_sampling_on_transposed_images_is_refused() {
    // A model of 20x32 images used to evaluate 32x20 ones without a word (only the product of
    // the sides was compared).
    let tmp = tempfile::tempdir().unwrap();
    let (wide, tall) = (tmp.path().join("wide"), tmp.path().join("tall"));
    shaped_set(&wide, 20, 32, 60);
    shaped_set(&tall, 32, 20, 60);
    let cfg = small_config(tmp.path(), &wide, "");
    let run = tmp.path().join("run");
    train_ok(&cfg, &["--epochs", "1", "--out", run.to_str().unwrap()]);
    let needle = "trained on 20x32 data (640 values per row), this data is 32x20";
    let png = tmp.path().join("x.png");
    let png = png.to_str().unwrap();
    let run = run.to_str().unwrap();
    let tall = tall.to_str().unwrap();
    let idx = tmp.path().join("x.idx");
    let idx = idx.to_str().unwrap();
    for args in [
        vec![
            "export-data",
            "--checkpoint",
            run,
            "--data-dir",
            tall,
            "--out",
            idx,
        ],
        vec!["eval", "--checkpoint", run, "--data-dir", tall, "--k", "2"],
        vec![
            "sample",
            "--checkpoint",
            run,
            "--data-dir",
            tall,
            "--kind",
            "reconstructions",
            "--out",
            png,
        ],
    ] {
        assert_user_error(&trainer(&args), needle);
    }
    let resumed = train_cmd(
        &cfg,
        &["--data-dir", tall, "--epochs", "2", "--resume", run],
    );
    assert_user_error(&resumed, needle);
}

#[test]
fn an_io_error_is_told_once() {
    // The I/O error's text was both in the message and its source, so the context chain printed
    // it twice ("... (os error 2): No such file or directory (os error 2)").
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-run");
    let out = trainer(&["plot", missing.to_str().unwrap()]);
    assert_user_error(&out, "metrics.jsonl: No such file or directory");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}
