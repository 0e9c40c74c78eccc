//! Exact resume on the CPU: 2 epochs straight and 1 epoch + resume + 1 epoch give bit-identical
//! parameters and optimizer state; so does resuming from a checkpoint in the middle of an epoch.

mod common;
use common::*;

fn model_file(run: &std::path::Path) -> std::path::PathBuf {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    run.join(latest.trim()).join("model.safetensors")
}

#[test]
fn two_epochs_equal_one_plus_resume_plus_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_mnist(&tmp.path().join("data"), 500, 100);
    let cfg = small_config(tmp.path(), &data, "");
    let cfg = cfg.to_str().unwrap();
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        straight.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--epochs",
        "1",
        "--out",
        split.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--epochs",
        "2",
        "--resume",
        split.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = model_file(&straight);
    let b = model_file(&split);
    assert_eq!(
        a.parent().unwrap().file_name(),
        b.parent().unwrap().file_name()
    );
    assert_eq!(tensors(&a), tensors(&b), "parameters differ");
    assert_eq!(
        tensors(&a.with_file_name("optim.safetensors")),
        tensors(&b.with_file_name("optim.safetensors")),
        "optimizer state differs"
    );
}

#[test]
fn resume_from_mid_epoch_checkpoint_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_mnist(&tmp.path().join("data"), 300, 60);
    let cfg = small_config(tmp.path(), &data, "");
    let cfg = cfg.to_str().unwrap();
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    assert!(trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        straight.to_str().unwrap(),
        "--json"
    ])
    .status
    .success());
    // Stop after 4 of the 6 steps of the first epoch; `--max-steps` writes a checkpoint there.
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--out",
        split.to_str().unwrap(),
        "--max-steps",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(split.join("ckpt-00000004").is_dir());
    let out = trainer(&[
        "train",
        "--config",
        cfg,
        "--resume",
        split.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tensors(&model_file(&straight)),
        tensors(&model_file(&split))
    );
}
