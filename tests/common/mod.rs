//! Shared helpers of the integration tests: run the `trainer` binary and read what its runs leave
//! behind (checkpoints, metrics), write small data sets and configs, and finite differences.
//!
//! Every test file that needs one of these includes this module (`mod common;`) instead of
//! keeping a private copy.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Running the `trainer` binary.

/// Runs `trainer` with `args` in the repository root.
pub fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("trainer runs")
}

/// Starts `trainer` with `args` in the repository root, with the extra environment `env`,
/// stdout discarded and stderr piped (for `wait_with_output`), and returns at once.
pub fn spawn_trainer(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trainer starts")
}

/// Sends `sig` (as `kill` spells it: `-INT`, `-TERM`) to `child`, asserting that it was
/// delivered.
pub fn send_signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {}", child.id());
}

/// `trainer train --config cfg ARGS`, whatever its outcome.
pub fn train_cmd(cfg: impl AsRef<Path>, args: &[&str]) -> Output {
    let cfg = cfg.as_ref().to_str().unwrap();
    let mut all = vec!["train", "--config", cfg];
    all.extend_from_slice(args);
    trainer(&all)
}

/// [`train_cmd`], asserting success (showing stderr otherwise); returns the output.
pub fn train_ok(cfg: impl AsRef<Path>, args: &[&str]) -> Output {
    let out = train_cmd(cfg, args);
    assert_success(&out);
    out
}

/// `trainer train --config cfg --out run --json`: asserts success and returns the summary.
pub fn train_json(cfg: &Path, run: &Path) -> serde_json::Value {
    stdout_json(&train_ok(cfg, &["--out", run.to_str().unwrap(), "--json"]))
}

/// Runs `trainer` with `args` (which ask for `--json`), asserts success and returns the JSON
/// it printed.
pub fn trainer_json(args: &[&str]) -> serde_json::Value {
    let out = trainer(args);
    assert_success(&out);
    stdout_json(&out)
}

/// The JSON document a command printed on stdout.
pub fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a `trainer` run succeeded, showing its stderr otherwise.
pub fn assert_success(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
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

// ---------------------------------------------------------------------------------------------
// Small data sets, configs and runs.

/// Writes an IDX file.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) {
    std::fs::write(path, gentrain::data::idx::encode_idx(dims, data)).unwrap();
}

/// A small MNIST-layout data set (`n` train and `n_test` test images of 28 x 28) in `dir`,
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

/// A fresh temporary directory holding [`small_mnist`] (`n` train and `n_test` test images) in
/// `data/` and the [`small_config`] for it: `(directory, config path)`. Keep the directory
/// alive as long as the files are used.
pub fn small_setup(n: usize, n_test: usize) -> (tempfile::TempDir, PathBuf) {
    small_setup_with(n, n_test, "", "", "")
}

/// [`small_setup`] with the config of [`small_config_with`]`(.., model, data, extra)`.
pub fn small_setup_with(
    n: usize,
    n_test: usize,
    model: &str,
    data: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = small_mnist(&tmp.path().join("data"), n, n_test);
    let cfg = small_config_with(tmp.path(), &dir, model, data, extra);
    (tmp, cfg)
}

/// [`small_setup`], then `trainer train --config cfg --out <dir>/run ARGS`, asserted to
/// succeed: `(directory, config path, run directory)`.
pub fn small_trained_run(
    n: usize,
    n_test: usize,
    args: &[&str],
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (tmp, cfg) = small_setup(n, n_test);
    let run = tmp.path().join("run");
    let mut all = vec!["--out", run.to_str().unwrap()];
    all.extend_from_slice(args);
    train_ok(&cfg, &all);
    (tmp, cfg, run)
}

// ---------------------------------------------------------------------------------------------
// What a run leaves behind.

/// The checkpoint directory that a run's `latest` names.
pub fn latest_checkpoint(run: &Path) -> PathBuf {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    run.join(latest.trim())
}

/// The `model.safetensors` of a run's latest checkpoint.
pub fn latest_model(run: &Path) -> PathBuf {
    latest_checkpoint(run).join("model.safetensors")
}

/// Every event of a run's `metrics.jsonl`, in order.
pub fn metrics_events(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until a run's `metrics.jsonl` has at least `lines` lines (training is under way),
/// failing after `timeout`.
pub fn wait_for_metrics(run: &Path, lines: usize, timeout: Duration) {
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
        < lines
    {
        assert!(t0.elapsed() < timeout, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `__metadata__` of a safetensors file.
pub fn checkpoint_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().expect("the file has metadata")
}

/// `f(name, tensor)` of every tensor of a safetensors file, sorted by name.
pub fn map_tensors<T>(
    path: &Path,
    f: impl Fn(&str, &safetensors::tensor::TensorView) -> T,
) -> Vec<(String, T)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, T)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let value = f(&n, &t);
            (n, value)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The raw tensor bytes of a safetensors file (metadata excluded), by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    map_tensors(path, |_, t| t.data().to_vec())
}

/// The tensors of a safetensors file of f32 tensors, flattened, by name (a tensor of another
/// dtype fails the test).
pub fn tensors_f32(path: &Path) -> Vec<(String, Vec<f32>)> {
    map_tensors(path, |n, t| {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n} is not f32");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Tensors and finite differences.

/// A seeded tensor of uniform values in `[lo, hi)` on the CPU.
pub fn seeded_uniform(seed: u64, shape: &[usize], lo: f32, hi: f32) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// `max_i |a_i - b_i| / (1e-2 max |b| + |b_i| + floor)`: relative error, with a floor at 1% of
/// the largest reference value for entries that cancel to about zero, and an absolute `floor`
/// for references that are zero in exact arithmetic.
pub fn rel_err_floored(a: &[f32], b: &[f32], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / (1e-2 * scale + (*y as f64).abs() + floor))
        .fold(0.0, f64::max)
}

/// The entries of an f32 tensor of any shape, in row-major order.
pub fn flat_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The element type of a flat vector that finite differences perturb: `f32` (parameters
/// perturbed in the model's own precision) or `f64`.
pub trait FdScalar: Copy + std::ops::Add<Output = Self> + std::ops::Neg<Output = Self> {
    /// The value in f64, where the differences are taken.
    fn to_f64(self) -> f64;
}

impl FdScalar for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl FdScalar for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}

/// Central differences `(f(x + h e_i) - f(x - h e_i)) / 2h` of the scalar function `f` of the
/// flat vector `x`, one for each entry `i` of `indices` (in that order). The step is added in
/// `x`'s own precision; `f` must not depend on anything else that the calls change.
pub fn central_differences<T: FdScalar>(
    f: impl Fn(&[T]) -> f64,
    x: &[T],
    indices: &[usize],
    h: T,
) -> Vec<f64> {
    indices
        .iter()
        .map(|&i| {
            let at = |delta: T| {
                let mut v = x.to_vec();
                v[i] = v[i] + delta;
                f(&v)
            };
            (at(h) - at(-h)) / (2.0 * h.to_f64())
        })
        .collect()
}

/// [`central_differences`] that a kink of a piecewise-smooth `f` (ReLU, LeakyReLU) cannot
/// fake: for each index the differences with steps `coarse` and `fine` must agree within 2%
/// (relative, with a floor of 1e-3), and then the `fine` one is returned; `None` says that a
/// kink lies within the step there.
pub fn kink_checked_differences<T: FdScalar>(
    f: impl Fn(&[T]) -> f64,
    x: &[T],
    indices: &[usize],
    coarse: T,
    fine: T,
) -> Vec<Option<f64>> {
    let c = central_differences(&f, x, indices, coarse);
    let d = central_differences(&f, x, indices, fine);
    c.into_iter()
        .zip(d)
        .map(|(coarse, fine)| {
            ((coarse - fine).abs() <= 2e-2 * (1e-3 + coarse.abs().max(fine.abs()))).then_some(fine)
        })
        .collect()
}

/// `value` as a function of the flat entries of `var`, for the finite-difference helpers:
/// `(var's current entries, f)` where `f(v)` sets `var` to `v`, evaluates `value` and puts the
/// current entries back.
pub fn var_function<'a>(
    var: &'a candle_core::Var,
    value: impl Fn() -> f64 + 'a,
) -> (Vec<f32>, impl Fn(&[f32]) -> f64 + 'a) {
    let entries = flat_f32(var.as_tensor());
    let tensor =
        |v: &[f32]| candle_core::Tensor::from_vec(v.to_vec(), var.shape(), var.device()).unwrap();
    // A copy, not a view of the variable's storage (which `set` overwrites).
    let original = tensor(&entries);
    let f = move |v: &[f32]| {
        var.set(&tensor(v)).unwrap();
        let y = value();
        var.set(&original).unwrap();
        y
    };
    (entries, f)
}

/// The JSON header of safetensors `bytes` and its length in bytes.
pub fn safetensors_header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

/// Safetensors `bytes` with their JSON header edited by `f` (padded to 8 bytes, data unchanged).
pub fn safetensors_with_header(bytes: &[u8], f: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let (n, mut h) = safetensors_header(bytes);
    f(&mut h);
    let mut text = serde_json::to_vec(&h).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}
