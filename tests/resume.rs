//! Exact resume on the CPU: 2 epochs straight and 1 epoch + resume + 1 epoch give bit-identical
//! parameters and optimizer state; so does resuming from a checkpoint in the middle of an epoch.

mod common;
use common::*;

#[test]
fn two_epochs_equal_one_plus_resume_plus_one() {
    let (tmp, cfg, straight) = small_trained_run(500, 100, &["--json"]);
    let split = tmp.path().join("split");
    let s = split.to_str().unwrap();
    train_ok(&cfg, &["--epochs", "1", "--out", s, "--json"]);
    train_ok(&cfg, &["--epochs", "2", "--resume", s, "--json"]);
    let a = latest_model(&straight);
    let b = latest_model(&split);
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
    let (tmp, cfg, straight) = small_trained_run(300, 60, &["--json"]);
    let split = tmp.path().join("split");
    let s = split.to_str().unwrap();
    // Stop after 4 of the 6 steps of the first epoch; `--max-steps` writes a checkpoint there.
    train_ok(&cfg, &["--out", s, "--max-steps", "4", "--json"]);
    assert!(split.join("ckpt-00000004").is_dir());
    train_ok(&cfg, &["--resume", s, "--json"]);
    assert_eq!(
        tensors(&latest_model(&straight)),
        tensors(&latest_model(&split))
    );
}
