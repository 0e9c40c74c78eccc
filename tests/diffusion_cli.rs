//! The diffusion family through the `trainer` binary: train, exact resume (EMA included),
//! `eval` (the bound with its estimator named, sample metrics with the sampler named),
//! `sample` (DDPM and DDIM grids, a denoising trajectory), the checkpoint's tensor names, and
//! one-line errors with exit code 2 for bad settings.

mod common;
use common::*;

/// A tiny U-Net on 28x28 images: trains in seconds.
const TINY_UNET: &str = r#"family = "diffusion"
[model.diffusion]
denoiser = "unet"
channels = 8
channel_mult = [1, 2]
groups = 4
time_embedding = 16
timesteps = 50
sample_steps = 3
ema_decay = 0.99
"#;

fn tiny_setup(extra_model: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    small_setup_with(
        120,
        30,
        &format!("{TINY_UNET}{extra_model}"),
        "binarize = \"none\"",
        "[optim]\nwarmup_steps = 3\nclip_grad_norm = 1.0",
    )
}

#[test]
fn a_unet_trains_evaluates_and_samples() {
    let (tmp, cfg) = tiny_setup("");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let out = train_ok(&cfg, &["--out", r, "--epochs", "1", "--json"]);
    let summary = stdout_json(&out);
    assert!(summary.to_string().contains("test_bound"), "{summary}");
    // The checkpoint holds the denoiser under PyTorch names and its EMA under `ema.`.
    let names: Vec<String> = tensors(&latest_model(&run))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for name in [
        "conv_in.weight",
        "down.0.blocks.0.conv1.weight",
        "up.1.upsample.weight",
        "conv_out.bias",
        "ema.conv_in.weight",
        "time_mlp.0.weight",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    let meta = checkpoint_metadata(&latest_model(&run));
    assert_eq!(meta["model_family"], "diffusion");

    let json = trainer_json(&[
        "eval",
        "--checkpoint",
        r,
        "--json",
        "--limit",
        "20",
        "--t-draws",
        "2",
        "--samples",
        "50",
    ]);
    let bound = &json["bound"];
    assert_eq!(bound["estimator"], "stratified");
    assert!(
        bound["weights"] == "ema" || bound["weights"] == "online",
        "{bound}"
    );
    assert_eq!(bound["n"], 20);
    let bpd = bound["bits_per_dim"].as_f64().unwrap();
    assert!(bpd > 0.0 && bpd < 16.0, "{json}");
    assert!(
        json["sampler"]
            .as_str()
            .unwrap()
            .starts_with("DDIM, 3 steps"),
        "{json}"
    );
    // The exact sum over all T terms on a few rows.
    let exact = trainer_json(&[
        "eval",
        "--checkpoint",
        r,
        "--json",
        "--limit",
        "4",
        "--t-draws",
        "0",
        "--samples",
        "0",
    ]);
    assert_eq!(exact["bound"]["estimator"], "exact");
    assert!(exact["bound"]["nll"].as_f64().unwrap().is_finite());

    for (kind, sampler) in [("prior", "ddpm"), ("prior", "ddim"), ("trajectory", "ddim")] {
        let png = tmp.path().join(format!("{kind}-{sampler}.png"));
        let out = trainer(&[
            "sample",
            "--checkpoint",
            r,
            "--out",
            png.to_str().unwrap(),
            "--n",
            "4",
            "--kind",
            kind,
            "--sampler",
            sampler,
            "--steps",
            "2",
            "--threads",
            "1",
            "--device",
            "cpu",
        ]);
        assert_success(&out);
        assert!(
            std::fs::metadata(&png).unwrap().len() > 100,
            "{kind} {sampler}"
        );
    }
    // Sampler flags are checked against the model.
    let png = tmp.path().join("x.png");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        r,
        "--out",
        png.to_str().unwrap(),
        "--steps",
        "51",
    ]);
    assert_user_error(&out, "--steps");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        r,
        "--out",
        png.to_str().unwrap(),
        "--eta=-1",
    ]);
    assert_user_error(&out, "--eta");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        r,
        "--out",
        png.to_str().unwrap(),
        "--device",
        "tpu",
    ]);
    assert_user_error(&out, "unknown device");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        r,
        "--out",
        png.to_str().unwrap(),
        "--kind",
        "reconstructions",
    ]);
    assert_user_error(&out, "encoder");
}

#[test]
fn resume_is_exact_with_the_ema() {
    let (tmp, cfg) = tiny_setup("variance = \"learned\"\n");
    let straight = tmp.path().join("straight");
    train_ok(&cfg, &["--out", straight.to_str().unwrap(), "--json"]);
    let split = tmp.path().join("split");
    let s = split.to_str().unwrap();
    train_ok(&cfg, &["--out", s, "--max-steps", "3", "--json"]);
    train_ok(&cfg, &["--resume", s, "--json"]);
    let a = latest_model(&straight);
    let b = latest_model(&split);
    assert_eq!(tensors(&a), tensors(&b), "parameters or EMA differ");
    assert_eq!(
        tensors(&a.with_file_name("optim.safetensors")),
        tensors(&b.with_file_name("optim.safetensors"))
    );
    // The hybrid loss's terms are logged.
    let events = metrics_events(&straight);
    assert!(
        events.iter().any(|e| e.get("l_vlb").is_some()),
        "no l_vlb logged"
    );
}

#[test]
fn bad_diffusion_settings_get_one_line_and_exit_2() {
    let (_tmp, cfg) = tiny_setup("");
    for (set, needle) in [
        ("model.diffusion.beta_end=1.5", "beta_end"),
        ("model.diffusion.timesteps=0", "timesteps"),
        (
            "model.diffusion.channel_mult=[1,2,2,2,2]",
            "divisible by 16",
        ),
        ("data.binarize=\"dynamic\"", "binarize"),
        ("model.diffusion.groups=3", "groups"),
    ] {
        let out = train_cmd(&cfg, &["--set", set, "--epochs", "1"]);
        assert_user_error(&out, needle);
    }
}

#[test]
fn sampler_flags_on_another_family_are_refused() {
    let (tmp, _cfg, run) = small_trained_run(100, 20, &["--epochs", "1"]);
    let png = tmp.path().join("x.png");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--sampler",
        "ddim",
    ]);
    assert_user_error(&out, "diffusion models");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--kind",
        "trajectory",
    ]);
    assert_user_error(&out, "diffusion model");
}

#[test]
fn an_mlp_diffusion_model_learns_2d_points() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train_ok(
        std::path::Path::new("configs/ddpm-grid25.toml"),
        &[
            "--out",
            run.to_str().unwrap(),
            "--epochs",
            "1",
            "--set",
            "data.synthetic_size=2560",
            "--json",
        ],
    );
    let s = stdout_json(&out).to_string();
    assert!(
        s.contains("modes_covered") && s.contains("test_bound_nats"),
        "{s}"
    );
    let json = trainer_json(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--json",
        "--limit",
        "50",
        "--samples",
        "200",
    ]);
    assert!(
        json["bound"]["bits_per_dim"].is_null(),
        "points have no bits/dim: {json}"
    );
    assert!(json["bound"]["nll"].as_f64().unwrap().is_finite());
    assert!(
        json.get("modes_covered").is_some() || json.to_string().contains("modes_covered"),
        "{json}"
    );
}
