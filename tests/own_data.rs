//! Your own data (issue 17): a `.npy` of colour images, a `.npz` of float rows with labels, a
//! CIFAR-10 layout and a folder of colour PNGs in class folders, each written here into a
//! temporary directory. Every family that supports a source trains one epoch of two steps on it
//! and evaluates; a colour sample grid is an RGB PNG; bad input through `trainer train` exits
//! with code 2 and one line on stderr.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use gentrain::config::Config;
use gentrain::data::cifar::encode_cifar;
use gentrain::data::npy::encode_npy;
use gentrain::data::RawImages;

/// Colour shapes: image `i` is a filled square or a cross in one of three colours, on a dark
/// background, `(n, 3, s, s)` planar, with labels `i % 3`.
fn shapes(n: usize, s: usize, seed: usize) -> RawImages {
    let colours = [[230u8, 40, 40], [40, 200, 60], [50, 80, 240]];
    let mut pixels = vec![0u8; n * 3 * s * s];
    for i in 0..n {
        let label = i % 3;
        let k = (i * 7 + seed) % 5;
        let (lo, hi) = (1 + k % 3, s - 1 - (k % 2));
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let inside = if i % 2 == 0 {
                        (lo..hi).contains(&y) && (lo..hi).contains(&x)
                    } else {
                        y == s / 2 || x == s / 2
                    };
                    let v = if inside {
                        colours[label][c]
                    } else {
                        10 + (k as u8) * 3
                    };
                    pixels[((i * 3 + c) * s + y) * s + x] = v;
                }
            }
        }
    }
    RawImages {
        pixels,
        n,
        channels: 3,
        height: s,
        width: s,
        labels: Some((0..n as u32).map(|i| i % 3).collect()),
        classes: Vec::new(),
    }
}

/// `images` as `(N, H, W, C)` bytes (NumPy's image layout).
fn hwc(images: &RawImages) -> Vec<u8> {
    let (c, h, w) = (images.channels, images.height, images.width);
    let mut out = Vec::with_capacity(images.pixels.len());
    for i in 0..images.n {
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    out.push(images.pixel(i, k, y, x));
                }
            }
        }
    }
    out
}

fn write_npy_images(path: &Path, images: &RawImages) {
    let shape = [images.n, images.height, images.width, images.channels];
    std::fs::write(path, encode_npy("|u1", &shape, false, &hwc(images))).unwrap();
}

/// A `.npz` holding `x`, float32 rows `(n, 4)` from two clusters, and `y`, their labels.
fn write_npz_rows(path: &Path, n: usize) {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..n {
        let label = (i % 2) as i64;
        for j in 0..4 {
            let v = (label as f32) * 3.0 + ((i * 13 + j * 7) % 11) as f32 * 0.1 + j as f32;
            x.extend_from_slice(&v.to_le_bytes());
        }
        y.extend_from_slice(&label.to_le_bytes());
    }
    let options = zip::write::SimpleFileOptions::default();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in [
        ("x.npy", encode_npy("<f4", &[n, 4], false, &x)),
        ("y.npy", encode_npy("<i8", &[n], false, &y)),
    ] {
        w.start_file(name, options).unwrap();
        std::io::Write::write_all(&mut w, &bytes).unwrap();
    }
    std::fs::write(path, w.finish().unwrap().into_inner()).unwrap();
}

/// A CIFAR-10 layout: two training batches, `data_batch_1.bin` and `data_batch_2.bin` (32 images
/// each), and `test_batch.bin` (32), 32x32 as the format requires.
fn write_cifar(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, seed) in [(1, 0), (2, 3)] {
        std::fs::write(
            dir.join(format!("data_batch_{i}.bin")),
            encode_cifar(&shapes(32, 32, seed)).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("test_batch.bin"),
        encode_cifar(&shapes(32, 32, 1)).unwrap(),
    )
    .unwrap();
}

/// A folder of colour PNGs in class folders `a`, `b`, `c`.
fn write_folder(dir: &Path, n: usize, s: usize) {
    let set = shapes(n, s, 2);
    for i in 0..n {
        let class = ["a", "b", "c"][i % 3];
        std::fs::create_dir_all(dir.join(class)).unwrap();
        let img = image::RgbImage::from_fn(s as u32, s as u32, |x, y| {
            image::Rgb([0, 1, 2].map(|c| set.pixel(i, c, y as usize, x as usize)))
        });
        img.save(dir.join(class).join(format!("{i:03}.png")))
            .unwrap();
    }
}

/// The model section of each family, for data of kind `images` (else rows).
fn family(name: &str, images: bool) -> (&'static str, &'static str) {
    match (name, images) {
        ("vae", true) => ("", "binarize = \"dequantize\"\n"),
        ("vae", false) => ("", ""),
        ("flow", _) => (
            "family = \"flow\"\n[model.flow]\ncoupling_layers = 2\nhidden = [16]\n",
            "binarize = \"dequantize\"\n",
        ),
        ("dcgan", _) => (
            "family = \"gan\"\n[model.gan]\narchitecture = \"dcgan\"\nlatent = 8\nconv_channels = [4, 8]\n",
            "binarize = \"none\"\n",
        ),
        ("gan", _) => (
            "family = \"gan\"\n[model.gan]\nlatent = 4\ngen_hidden = [16]\ndisc_hidden = [16]\n",
            "binarize = \"none\"\n",
        ),
        ("unet", _) => (
            "family = \"diffusion\"\n[model.diffusion]\ndenoiser = \"unet\"\nchannels = 8\nchannel_mult = [1, 2]\ngroups = 4\ntime_embedding = 8\ntimesteps = 20\nsample_steps = 2\n",
            "binarize = \"none\"\n",
        ),
        ("diffusion", _) => (
            "family = \"diffusion\"\n[model.diffusion]\nhidden = [16]\ntimesteps = 20\nsample_steps = 2\n",
            "binarize = \"none\"\n",
        ),
        _ => unreachable!("{name}"),
    }
}

/// A config for `family` on `dataset` at `dir` with extra `[data]` lines.
fn config(tmp: &Path, dataset: &str, dir: &Path, name: &str, images: bool, data: &str) -> Config {
    let (model, binarize) = family(name, images);
    let decoder = if name == "vae" {
        "decoder = \"gaussian\"\n"
    } else {
        ""
    };
    let samples = if images { 1 } else { 0 };
    let text = format!(
        "[model]\nactivation = \"relu\"\n{decoder}{model}\n[[model.layers]]\nhidden = [16]\nlatent = 4\n\
         [data]\ndataset = \"{dataset}\"\ndir = \"{}\"\n{binarize}{data}\n\
         [train]\nepochs = 1\nbatch_size = 32\nthreads = 1\nlog_every = 1\neval_every = 0\nsample_every = {samples}\n\
         [eval]\nk = 2\nfinal_k = 2\nfinal_limit = 8\nepoch_samples = 0\n",
        dir.display()
    );
    let path = tmp.join(format!("{dataset}-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{dataset}/{name}: {e}"))
}

/// Trains `cfg` (one epoch) into `tmp/<label>` and checks the steps, the checkpoint and, for
/// images, the RGB sample grid; returns the run directory.
fn train(tmp: &Path, label: &str, cfg: &Config, steps: u64, colour: bool) -> PathBuf {
    let opts = gentrain::train::TrainOptions {
        out: tmp.join(label),
        resume: None,
        progress: false,
        max_steps: None,
        handle_signals: false,
        parallel: None,
    };
    let s = gentrain::train::train(cfg, &opts).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(s.steps, steps, "{label}");
    // A GAN has no likelihood; its quick figures are sample metrics, skipped here
    // (`eval.epoch_samples = 0`), so its evaluation is `trainer eval`: the sample metrics on
    // data of its own (precision, recall, MMD^2).
    if cfg.model.family != gentrain::config::ModelFamily::Gan {
        assert!(
            !s.final_figures.is_empty() || s.final_eval.is_some(),
            "{label}: no final evaluation"
        );
    } else {
        let out = opts.out.to_str().unwrap();
        let json = trainer_json(&["eval", "--checkpoint", out, "--json", "--samples", "16"]);
        for key in ["precision", "recall", "mmd2"] {
            assert!(json[key].as_f64().is_some(), "{label} {key}: {json}");
        }
    }
    let ck = gentrain::session::load_checkpoint(&opts.out, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    if colour {
        assert_eq!(ck.image_shape.0, 3, "{label}");
        let grid = opts.out.join("samples-epoch-0001.png");
        let img = image::open(&grid).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(img.color(), image::ColorType::Rgb8, "{label}");
    }
    opts.out
}

#[test]
fn colour_npy_images_train_every_image_family() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images.npy");
    // 71 images: 64 train, 7 test (test_fraction 0.1, drawn with the seed).
    write_npy_images(&data, &shapes(71, 8, 0));
    for name in ["vae", "flow", "gan", "dcgan", "diffusion", "unet"] {
        let cfg = config(tmp.path(), "npy", &data, name, true, "flip = true\n");
        let run = train(tmp.path(), &format!("npy-{name}"), &cfg, 2, true);
        let meta = checkpoint_metadata(&latest_model(&run));
        assert_eq!(meta["image_shape"], "3,8,8", "{name}");
        let split: serde_json::Value = serde_json::from_str(&meta["data_split"]).unwrap();
        assert_eq!(
            (split["train"].as_u64(), split["test"].as_u64()),
            (Some(64), Some(7))
        );
    }
}

#[test]
fn npz_rows_with_labels_train_the_row_families() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rows");
    std::fs::create_dir_all(&dir).unwrap();
    write_npz_rows(&dir.join("train.npz"), 64);
    write_npz_rows(&dir.join("test.npz"), 16);
    for name in ["vae", "flow", "gan", "diffusion"] {
        let cfg = config(tmp.path(), "npy", &dir, name, false, "");
        let run = train(tmp.path(), &format!("npz-{name}"), &cfg, 2, false);
        let meta = checkpoint_metadata(&latest_model(&run));
        assert_eq!(meta["image_shape"], "1,1,4", "{name}");
        assert!(!meta.contains_key("data_split"), "{name}");
    }
    // `trainer eval` of a GAN on rows: precision, recall and MMD^2 on the standardized rows.
    let run = tmp.path().join("npz-gan");
    let json = trainer_json(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--json",
        "--samples",
        "32",
    ]);
    assert_eq!(
        json["feature_space"], "standardized rows, 4 values, no projection",
        "{json}"
    );
    assert_eq!(json["metric_rows_real"], 16, "{json}");
    assert!(json["precision"].as_f64().is_some() && json["mmd2"].as_f64().is_some());
    // A conditional VAE uses the labels.
    let mut cfg = config(tmp.path(), "npy", &dir, "vae", false, "");
    cfg.model.classes = 2;
    train(tmp.path(), "npz-cvae", &cfg, 2, false);
    the_training_standardization_is_stored_and_applied(tmp.path(), &dir);
}

/// The rows' standardization is written into the checkpoint and evaluation applies it: after
/// the training file changes (other column statistics), `trainer eval` of the VAE trained on
/// `dir` gives the same figures; a corrupt stored standardization is refused (exit 2).
fn the_training_standardization_is_stored_and_applied(tmp: &Path, dir: &Path) {
    let run = tmp.join("npz-vae");
    let meta = checkpoint_metadata(&latest_model(&run));
    let st: serde_json::Value = serde_json::from_str(&meta["standardization"]).unwrap();
    assert_eq!(st["mean"].as_array().unwrap().len(), 4, "{st}");
    assert!(st["std"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_f64().unwrap() > 0.0));
    let eval = || {
        let args = ["eval", "--checkpoint", run.to_str().unwrap(), "--json"];
        let j = trainer_json(&[&args[..], &["--k", "5", "--seed", "3"]].concat());
        (j["test_elbo"].clone(), j["nll"].clone())
    };
    let before = eval();
    assert!(before.0.as_f64().is_some(), "{before:?}");
    // Other training rows (twice as many, other statistics); the test rows are unchanged.
    write_npz_rows(&dir.join("train.npz"), 128);
    assert_eq!(eval(), before);
    let model = latest_model(&run);
    let bytes = std::fs::read(&model).unwrap();
    let bad = r#"{"mean": [0, 0, 0], "std": [1, 1, 1]}"#;
    std::fs::write(&model, with_metadata(&bytes, "standardization", bad)).unwrap();
    let out = trainer(&["eval", "--checkpoint", run.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`mean` has 3 values for input_dim 4"), "{err}");
    std::fs::write(&model, bytes).unwrap();
}

#[test]
fn cifar_layout_and_image_folder_train() {
    let tmp = tempfile::tempdir().unwrap();
    let cifar = tmp.path().join("cifar");
    write_cifar(&cifar);
    for name in ["vae", "flow", "gan", "dcgan", "diffusion", "unet"] {
        let cfg = config(tmp.path(), "cifar10", &cifar, name, true, "");
        let run = train(tmp.path(), &format!("cifar-{name}"), &cfg, 2, true);
        let meta = checkpoint_metadata(&latest_model(&run));
        assert_eq!(meta["image_shape"], "3,32,32", "{name}");
        assert_eq!(meta["num_classes"], "10", "{name}");
    }
    let folder = tmp.path().join("folder");
    write_folder(&folder.join("train"), 64, 12);
    write_folder(&folder.join("test"), 12, 12);
    for name in ["vae", "flow", "gan", "dcgan", "diffusion", "unet"] {
        let cfg = config(tmp.path(), "folder", &folder, name, true, "crop = [8, 8]\n");
        let run = train(tmp.path(), &format!("folder-{name}"), &cfg, 2, true);
        let meta = checkpoint_metadata(&latest_model(&run));
        assert_eq!(meta["image_shape"], "3,8,8", "{name}");
        assert_eq!(meta["num_classes"], "3", "{name}");
    }
    // Each split's decoded images were cached on the first load and read back since.
    for split in ["train", "test"] {
        let cache = folder
            .join(split)
            .join(".gentrain-cache/decoded-crop-8x8.bin");
        assert!(cache.is_file(), "{}", cache.display());
    }
    // With epoch samples, a colour GAN's epoch-end figures are precision, recall and MMD^2.
    let mut cfg = config(
        tmp.path(),
        "folder",
        &folder,
        "gan",
        true,
        "crop = [8, 8]\n",
    );
    cfg.eval.epoch_samples = 16;
    let opts = gentrain::train::TrainOptions {
        out: tmp.path().join("folder-gan-figures"),
        resume: None,
        progress: false,
        max_steps: None,
        handle_signals: false,
        parallel: None,
    };
    let s = gentrain::train::train(&cfg, &opts).unwrap();
    for key in ["precision_quick", "recall_quick", "mmd2_quick"] {
        let v = s.final_figures.get(key).copied();
        assert!(
            v.is_some_and(f64::is_finite),
            "{key}: {:?}",
            s.final_figures
        );
    }
    // `trainer eval` of a colour GAN: the sample metrics that need no classifier.
    let run = tmp.path().join("folder-gan");
    let json = trainer_json(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--json",
        "--samples",
        "16",
    ]);
    assert!(json.to_string().contains("duplicate"), "{json}");
    // Improved precision / recall and MMD^2 in pixel space (12 test images, 16 samples).
    for key in ["precision", "recall", "mmd2"] {
        let v = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"));
        assert!(v.is_finite(), "{key}: {json}");
    }
    assert_eq!(json["pr_k"], 3, "{json}");
    assert_eq!(json["metric_rows_real"], 12, "{json}");
    let space = json["feature_space"].as_str().unwrap();
    assert!(
        space.starts_with("pixels in [0, 1], 3x8x8 = 192 values"),
        "{space}"
    );
    assert!(json.get("fid_mnist").is_none(), "{json}");
    let out = trainer(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--samples",
        "16",
    ]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("improved precision / recall (k = 3)"),
        "{text}"
    );
    assert!(text.contains("MMD^2 (unbiased, Gaussian kernel"), "{text}");
    assert!(text.contains("feature space: pixels in [0, 1]"), "{text}");
    // The colour sample grid of `trainer sample` is RGB too.
    let png = tmp.path().join("grid.png");
    let out = trainer(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n",
        "9",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_eq!(image::open(&png).unwrap().color(), image::ColorType::Rgb8);
}

#[test]
fn a_bernoulli_decoder_on_colour_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images.npy");
    write_npy_images(&data, &shapes(40, 8, 0));
    let mut cfg = config(tmp.path(), "npy", &data, "vae", true, "");
    cfg.model.decoder = gentrain::config::DecoderKind::Bernoulli;
    cfg.data.binarize = gentrain::config::Binarization::Dynamic;
    let opts = gentrain::train::TrainOptions {
        out: tmp.path().join("run"),
        resume: None,
        progress: false,
        max_steps: None,
        handle_signals: false,
        parallel: None,
    };
    let e = gentrain::train::train(&cfg, &opts).unwrap_err().to_string();
    assert!(e.contains("colour images") && e.contains("gaussian"), "{e}");
}

/// `trainer train` on a config for `dataset` at `path`.
fn train_on(tmp: &Path, dataset: &str, path: &Path) -> std::process::Output {
    let cfg = config(tmp, dataset, path, "vae", true, "");
    let file = tmp.join(format!("bad-{dataset}.toml"));
    std::fs::write(&file, cfg.to_toml()).unwrap();
    let run = tmp.join("bad-run");
    trainer(&[
        "train",
        "--config",
        file.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ])
}

#[test]
fn bad_own_data_gets_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Not a NumPy file.
    let junk = t.join("junk.npy");
    std::fs::write(&junk, b"this is not numpy").unwrap();
    assert_user_error(&train_on(t, "npy", &junk), "junk.npy");
    // An empty folder.
    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_user_error(&train_on(t, "folder", &empty), "no images");
    // More labels than images.
    let dir = t.join("mismatch");
    std::fs::create_dir_all(&dir).unwrap();
    write_npy_images(&dir.join("train.npy"), &shapes(10, 8, 0));
    let labels: Vec<u8> = (0..12i64).flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(
        dir.join("train_labels.npy"),
        encode_npy("<i8", &[12], false, &labels),
    )
    .unwrap();
    assert_user_error(&train_on(t, "npy", &dir), "train_labels.npy");
    // A directory without train.npy.
    assert_user_error(&train_on(t, "npy", &empty), "no train.npy");
    // No CIFAR batch.
    assert_user_error(&train_on(t, "cifar10", &empty), "CIFAR-10");
    // A data.dir that does not exist: the source says what it reads (it was the bare OS error).
    let missing = t.join("missing");
    for (dataset, what) in [
        ("folder", "an image folder"),
        ("cifar10", "CIFAR-10 binary"),
    ] {
        assert_user_error(&train_on(t, dataset, &missing), what);
    }
}

/// `bytes` of a safetensors file with the metadata `key` set to `value`.
fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
    safetensors_with_header(bytes, |h| h["__metadata__"][key] = serde_json::json!(value))
}

#[test]
fn an_old_checkpoint_with_a_two_number_image_shape_still_loads() {
    // Grey MNIST now writes "1,28,28"; checkpoints written before colour data hold "28,28".
    let (_tmp, cfg, run) = small_trained_run(100, 20, &["--epochs", "1"]);
    let model = latest_model(&run);
    assert_eq!(checkpoint_metadata(&model)["image_shape"], "1,28,28");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, with_metadata(&bytes, "image_shape", "28,28")).unwrap();
    let ck = gentrain::session::load_checkpoint(&run, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ck.image_shape, (1, 28, 28));
    let cfg = Config::load(&cfg).unwrap();
    ck.check_data(&gentrain::session::load_datasets(&cfg).unwrap())
        .unwrap();
    let r = run.to_str().unwrap();
    assert_success(&trainer(&[
        "eval",
        "--checkpoint",
        r,
        "--k",
        "2",
        "--limit",
        "5",
    ]));
}
