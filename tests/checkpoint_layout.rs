//! The checkpoint layout of `docs/checkpoints.md`: PyTorch names and (out, in) shapes, the
//! metadata keys, the optimizer file, `latest`, and the artifacts a run leaves behind.

mod common;
use common::*;

#[test]
fn run_directory_and_checkpoint_follow_the_documented_layout() {
    let (tmp, cfg) = small_setup(100, 20);
    let run = tmp.path().join("run");
    let summary = train_json(&cfg, &run);
    assert!(summary["final_eval"]["nll"].as_f64().unwrap() > 50.0);

    for f in [
        "config.toml",
        "metrics.jsonl",
        "latest",
        "samples-epoch-0001.png",
        "samples-epoch-0002.png",
        "reconstructions.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read_dir(&run).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let ck = latest_checkpoint(&run);
    assert_eq!(ck, run.join("ckpt-00000004"));

    let names = map_tensors(&ck.join("model.safetensors"), |_, t| t.shape().to_vec());
    let expect: Vec<(&str, Vec<usize>)> = vec![
        ("decoders.0.net.0.bias", vec![64]),
        ("decoders.0.net.0.weight", vec![64, 8]),
        ("decoders.0.out.bias", vec![784]),
        ("decoders.0.out.weight", vec![784, 64]),
        ("encoders.0.logvar.bias", vec![8]),
        ("encoders.0.logvar.weight", vec![8, 64]),
        ("encoders.0.mu.bias", vec![8]),
        ("encoders.0.mu.weight", vec![8, 64]),
        ("encoders.0.net.0.bias", vec![64]),
        ("encoders.0.net.0.weight", vec![64, 784]),
    ];
    assert_eq!(
        names,
        expect
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect::<Vec<_>>()
    );
    let meta = checkpoint_metadata(&ck.join("model.safetensors"));
    for key in [
        "format",
        "gentrain_format_version",
        "model_family",
        "input_dim",
        "image_shape",
        "config",
        "step",
        "epoch",
        "rng_state",
    ] {
        assert!(meta.contains_key(key), "metadata lacks {key}");
    }
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["step"], "4");
    assert_eq!(meta["epoch"], "2");
    let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    assert_eq!(cfg["model"]["layers"][0]["latent"], 8);

    let obytes = std::fs::read(ck.join("optim.safetensors")).unwrap();
    let ost = safetensors::SafeTensors::deserialize(&obytes).unwrap();
    assert_eq!(ost.tensors().len(), 20);
    assert_eq!(
        ost.tensor("encoders.0.net.0.weight.exp_avg_sq")
            .unwrap()
            .shape(),
        &[64, 784]
    );
    assert_eq!(
        checkpoint_metadata(&ck.join("optim.safetensors"))["step"],
        "4"
    );

    // metrics.jsonl: train, eval and final_eval events with the documented fields.
    let events = metrics_events(&run);
    let train = events.iter().find(|e| e["event"] == "train").unwrap();
    for k in ["step", "epoch", "bound", "samples_per_s", "wall_s"] {
        assert!(train.get(k).is_some(), "train event lacks {k}");
    }
    assert!(events
        .iter()
        .any(|e| e["event"] == "eval" && e["test_elbo"].as_f64().unwrap() > 0.0));
    assert!(events.iter().any(|e| e["event"] == "final_eval"));

    // eval --json gives the contract's keys as positive nats, and sample writes a PNG.
    let r = trainer_json(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--k",
        "10",
        "--limit",
        "20",
        "--json",
    ]);
    let (nll, neg_elbo) = (r["nll"].as_f64().unwrap(), r["test_elbo"].as_f64().unwrap());
    assert!(nll > 0.0 && neg_elbo > 0.0, "positive nats: {r}");
    // -ELBO bounds the NLL from above (up to Monte-Carlo noise of a 10-sample estimate).
    assert!(neg_elbo > nll - 1.0, "{r}");
    assert_eq!((r["k"].as_u64(), r["n"].as_u64()), (Some(10), Some(20)));
    // The sample metrics of labelled images (the classifier is trained on the small set).
    for key in [
        "fid_mnist",
        "inception_score_mnist",
        "min_class_fraction",
        "duplicate_pairs",
    ] {
        assert!(r[key].as_f64().is_some(), "eval --json lacks {key}: {r}");
    }
    assert_eq!(r["class_histogram"].as_array().map(|h| h.len()), Some(10));
    for kind in ["prior", "reconstructions", "interpolation"] {
        let png = tmp.path().join(format!("{kind}.png"));
        let out = trainer(&[
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--n",
            "8",
            "--kind",
            kind,
            "--out",
            png.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    }
}

#[test]
fn keeps_the_last_n_and_the_best_checkpoint() {
    let (_tmp, _, run) = small_trained_run(
        300,
        20,
        &[
            "--epochs",
            "6",
            "--set",
            "data.validation=100",
            "--set",
            "train.keep_checkpoints=2",
            "--json",
        ],
    );
    let (best, score) =
        gentrain::checkpoint::read_best(&run).expect("a best checkpoint is recorded");
    assert!(
        run.join(&best).join("model.safetensors").is_file(),
        "best checkpoint {best} was pruned"
    );
    // The score is the lowest validation -ELBO among the epochs' evaluations.
    let scores: Vec<f64> = metrics_events(&run)
        .iter()
        .filter_map(|e| e["valid_elbo"].as_f64())
        .collect();
    assert_eq!(scores.len(), 6);
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    assert!((score - min).abs() < 1e-9, "{score} vs {scores:?}");
    let kept: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    assert!(
        kept.len() <= 3 && kept.contains(&"ckpt-00000024".to_string()),
        "{kept:?}"
    );
}
