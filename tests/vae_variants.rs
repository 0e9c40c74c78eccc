//! VAE variants end to end: the conditional VAE (one-hot labels into the bottom encoder and the
//! likelihood, class-conditional sample grids) and the Gaussian decoder on dequantized pixels
//! (bits/dim on the 8-bit scale).

mod common;
use common::*;

use candle_core::{Device, Tensor};
use gentrain::config::ModelConfig;
use gentrain::models::Vae;
use gentrain::rng::{stream_rng, Stream};

#[test]
fn conditional_vae_uses_its_labels() {
    let cfg = ModelConfig {
        classes: 10,
        ..Default::default()
    };
    let vae = Vae::new(&cfg, 12, &Device::Cpu, &mut stream_rng(1, Stream::Init, 0)).unwrap();
    let z = Tensor::zeros((2, 20), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = gentrain::data::one_hot(&[3, 7], 10, &Device::Cpu).unwrap();
    let out = vae
        .decode_mean(&z, Some(&y))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(out[0], out[1], "the label must change the decoded mean");
    assert!(
        vae.decode_mean(&z, None).is_err(),
        "decoding without labels must fail"
    );
    // Rows without the label part are refused with a message, not a shape panic.
    let x = Tensor::zeros((2, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
    let eps = vae
        .draw_noise(1, 2, &mut stream_rng(1, Stream::Noise, 0))
        .unwrap();
    let err = vae.pass(&x, 1, &eps, false).unwrap_err().to_string();
    assert!(err.contains("one-hot label of 10 classes"), "{err}");
    // With labels the pass runs and the encoder sees them: q(z|x,y) differs between labels.
    let with = |label: u32| {
        let y = gentrain::data::one_hot(&[label, label], 10, &Device::Cpu).unwrap();
        let input = Tensor::cat(&[&x, &y], 1).unwrap();
        vae.encode(&input).unwrap().0.to_vec2::<f32>().unwrap()
    };
    assert_ne!(with(0), with(5));
    assert_eq!(cfg.vae_parameter_count(12).unwrap(), vae.store.numel());
}

#[test]
fn conditional_vae_trains_and_draws_a_grid_per_class() {
    let (tmp, cfg) = small_setup_with(200, 50, "classes = 10", "", "");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let summary = train_json(&cfg, &run);
    let nll = summary["final_eval"]["nll"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 50.0, "nll {nll}");
    // 64 samples over 10 classes: 7 per class, one grid row per class (cells 28 + 2 pixels,
    // drawn at scale 2).
    let img = image::open(run.join("samples-epoch-0002.png")).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (2 * (7 * 30 + 2), 2 * (10 * 30 + 2))
    );
    // eval and sample read the conditional checkpoint back.
    assert_success(&trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--k",
        "5",
        "--limit",
        "20",
        "--json",
    ]));
    let grid = tmp.path().join("grid.png");
    let g = grid.to_str().unwrap();
    assert_success(&trainer(&[
        "sample",
        "--checkpoint",
        r,
        "--out",
        g,
        "--n",
        "20",
    ]));
    assert_eq!(image::open(&grid).unwrap().height(), 2 * (10 * 30 + 2));
    // Resuming as an unconditional model names the field.
    let plain = small_config(tmp.path(), &tmp.path().join("data"), "");
    let out = train_cmd(&plain, &["--resume", r, "--epochs", "3"]);
    assert_user_error(&out, "model.classes");
}

#[test]
fn gaussian_decoder_on_dequantized_pixels_reports_pixel_scale_bits_per_dim() {
    let (tmp, cfg) = small_setup_with(
        200,
        50,
        "decoder = \"gaussian\"",
        "binarize = \"dequantize\"",
        "",
    );
    let run = tmp.path().join("run");
    let summary = train_json(&cfg, &run);
    let r = &summary["final_eval"];
    let (nll, bpd) = (
        r["nll"].as_f64().unwrap(),
        r["bits_per_dim"].as_f64().unwrap(),
    );
    let d = 784.0;
    let expected = (nll + d * 256f64.ln()) / (d * std::f64::consts::LN_2);
    assert!((bpd - expected).abs() < 1e-9, "{bpd} vs {expected}");
    // A density on [0, 1)^D bounds a discrete model: at most 8 bits per pixel plus what the
    // model loses, and never negative.
    assert!(bpd > 0.0 && bpd < 16.0, "bits/dim {bpd}");
    // A Bernoulli decoder on dequantized data is refused.
    let bad = small_config_with(
        tmp.path(),
        &tmp.path().join("data"),
        "decoder = \"bernoulli\"",
        "binarize = \"dequantize\"",
        "",
    );
    let out = train_cmd(&bad, &["--out", tmp.path().join("bad").to_str().unwrap()]);
    assert_user_error(&out, "continuous data");
}
