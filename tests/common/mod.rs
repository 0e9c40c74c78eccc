//! Shared helpers of the CLI-level tests: run the `trainer` binary, write small data sets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `trainer` with `args` in the repository root.
pub fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("trainer runs")
}

/// Asserts a clean user-facing failure: exit code 2, one line on stderr containing `needle`,
/// and no panic.
pub fn assert_user_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() <= 1 || stderr.contains("Usage"),
        "more than one line: {stderr}"
    );
}

/// Writes an IDX file.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) {
    std::fs::write(path, gentrain::data::idx::encode_idx(dims, data)).unwrap();
}

/// A small MNIST-layout data set (`n` train and `n_test` test images of `rows x cols`) in `dir`,
/// made of the first images of the real MNIST so that models have something to learn.
pub fn small_mnist(dir: &Path, n: usize, n_test: usize) -> PathBuf {
    use gentrain::data::images::{ImageSet, Split};
    std::fs::create_dir_all(dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    for (split, prefix, count) in [(Split::Train, "train", n), (Split::Test, "t10k", n_test)] {
        let mut set = ImageSet::load(&root, split).unwrap();
        set.truncate(count);
        write_idx(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &[count, 28, 28],
            &set.pixels,
        );
        write_idx(
            &dir.join(format!("{prefix}-labels-idx1-ubyte")),
            &[count],
            set.labels.as_ref().unwrap(),
        );
    }
    dir.to_path_buf()
}

/// A small, fast config for CLI tests.
pub fn small_config(dir: &Path, data_dir: &Path, extra: &str) -> PathBuf {
    small_config_with(dir, data_dir, "", "", extra)
}

/// [`small_config`] with extra lines in its `[model]` and `[data]` sections.
pub fn small_config_with(
    dir: &Path,
    data_dir: &Path,
    model: &str,
    data: &str,
    extra: &str,
) -> PathBuf {
    let p = dir.join("small.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[model]
activation = "relu"
{model}
[[model.layers]]
hidden = [64]
latent = 8
[data]
dir = "{}"
{data}
[train]
epochs = 2
batch_size = 50
threads = 1
log_every = 5
[eval]
final_k = 20
final_limit = 50
{extra}
"#,
            data_dir.display()
        ),
    )
    .unwrap();
    p
}

/// Asserts that a `trainer` run succeeded, showing its stderr otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `trainer train --config cfg --out run --json`: asserts success and returns the summary.
pub fn train_json(cfg: &Path, run: &Path) -> serde_json::Value {
    let out = trainer(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--json",
    ]);
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The raw tensor bytes of a safetensors file (metadata excluded), by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
