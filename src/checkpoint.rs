//! Checkpoints: safetensors files a PyTorch user can open (`docs/checkpoints.md` is the contract),
//! written crash-safely: each checkpoint is written into a temporary directory, every file and the
//! directory are fsynced, the directory is renamed into place, the result is re-read and verified,
//! and only then is the `latest` pointer replaced (write, fsync, rename, fsync the run directory).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Format version written into `__metadata__`.
pub const FORMAT_VERSION: &str = "1";
/// Name of the parameter file inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Name of the optimizer-state file inside a checkpoint directory.
pub const OPTIM_FILE: &str = "optim.safetensors";
/// Name of the pointer file in a run directory.
pub const LATEST: &str = "latest";
/// Name of the file naming the best checkpoint (by validation bound) and its score.
pub const BEST: &str = "best";
/// Test-only failpoint: milliseconds to sleep after a checkpoint's files are written and before
/// the directory is renamed into place, to widen the window in which crash tests kill a write.
pub const FAILPOINT_SLEEP_ENV: &str = "GENTRAIN_FAILPOINT_CHECKPOINT_SLEEP_MS";

/// Tensors and string metadata to write as one safetensors file.
pub struct FileContents {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: HashMap<String, String>,
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Serializes tensors (as F32) with metadata in the safetensors format.
pub fn serialize(contents: &FileContents) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = contents
        .tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), to_bytes(t)?)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::checkpoint(n, e.to_string()))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, Some(contents.metadata.clone()))
        .map_err(|e| Error::checkpoint("<memory>", e.to_string()))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// The directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

/// Writes a checkpoint directory atomically and points `latest` at it. Returns its path.
/// Keeps the newest `keep` checkpoints (0 keeps all) and never deletes the one `latest` names.
pub fn save(
    run_dir: &Path,
    step: u64,
    files: &[(&str, FileContents)],
    keep: usize,
) -> Result<PathBuf> {
    fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let name = checkpoint_name(step);
    let final_dir = run_dir.join(&name);
    let tmp_dir = run_dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    let mut serialized = Vec::new();
    for (file, contents) in files {
        let bytes = serialize(contents)?;
        write_synced(&tmp_dir.join(file), &bytes)?;
        serialized.push((file.to_string(), bytes));
    }
    fsync_dir(&tmp_dir)?;
    if let Some(ms) = std::env::var(FAILPOINT_SLEEP_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if final_dir.exists() {
        // A checkpoint of the same step from an earlier, interrupted attempt: replace it, unless
        // it is the one `latest` names (then keep it and drop ours: same step, same contents).
        if read_latest(run_dir).ok().as_deref() == Some(name.as_str()) {
            fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
            return Ok(final_dir);
        }
        fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    fsync_dir(run_dir)?;
    // Verify what landed on disk before publishing it.
    for (file, bytes) in &serialized {
        let p = final_dir.join(file);
        let on_disk = fs::read(&p).map_err(|e| Error::io(&p, e))?;
        if &on_disk != bytes {
            return Err(Error::checkpoint(
                &p,
                "verification failed: file on disk differs from what was written",
            ));
        }
        SafeTensors::deserialize(&on_disk)
            .map_err(|e| Error::checkpoint(&p, format!("verification failed: {e}")))?;
    }
    replace_file(run_dir, LATEST, &format!("{name}\n"))?;
    if keep > 0 {
        prune(run_dir, keep, &name)?;
    }
    Ok(final_dir)
}

/// Atomically replaces `run_dir/file` with `text` (write a temporary, fsync, rename, fsync the
/// directory).
fn replace_file(run_dir: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = run_dir.join(format!("{file}.tmp"));
    write_synced(&tmp, text.as_bytes())?;
    let dest = run_dir.join(file);
    fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    fsync_dir(run_dir)
}

/// Records checkpoint `name` as the best so far with validation score `score` (lower is better).
pub fn mark_best(run_dir: &Path, name: &str, score: f64) -> Result<()> {
    replace_file(run_dir, BEST, &format!("{name}\n{score}\n"))
}

/// The best checkpoint's name and score, if one was recorded.
pub fn read_best(run_dir: &Path) -> Option<(String, f64)> {
    let text = fs::read_to_string(run_dir.join(BEST)).ok()?;
    let mut lines = text.lines();
    let name = lines.next()?.trim().to_string();
    let score = lines.next()?.trim().parse().ok()?;
    Some((name, score))
}

/// Removes temporary checkpoint directories left by processes that died while writing.
/// Call only when no other process writes into `run_dir`.
pub fn remove_stale_temporaries(run_dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(".tmp-ckpt-") {
            fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Deletes all but the newest `keep` checkpoints, never the current one or the best one.
fn prune(run_dir: &Path, keep: usize, current: &str) -> Result<()> {
    let best = read_best(run_dir).map(|(n, _)| n);
    let mut names: Vec<String> = fs::read_dir(run_dir)
        .map_err(|e| Error::io(run_dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-") && n.len() == 13)
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for n in names.into_iter().take(excess) {
        if n != current && Some(&n) != best.as_ref() {
            let p = run_dir.join(&n);
            fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn read_latest(run_dir: &Path) -> Result<String> {
    let p = run_dir.join(LATEST);
    let s = fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let name = s.trim().to_string();
    if !name.starts_with("ckpt-") || name.contains('/') || name.contains("..") {
        return Err(Error::checkpoint(
            &p,
            format!("`latest` names {name:?}, not a checkpoint directory"),
        ));
    }
    Ok(name)
}

/// Resolves a run directory (through `latest`) or a checkpoint directory to the checkpoint
/// directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if path.join(LATEST).is_file() {
        let dir = path.join(read_latest(path)?);
        if dir.join(MODEL_FILE).is_file() {
            return Ok(dir);
        }
        return Err(Error::checkpoint(
            &dir,
            "named by `latest` but has no model.safetensors",
        ));
    }
    if !path.exists() {
        return Err(Error::checkpoint(path, "does not exist"));
    }
    Err(Error::checkpoint(
        path,
        "neither a checkpoint directory (no model.safetensors) nor a run directory (no `latest`)",
    ))
}

/// A safetensors file read into memory and validated.
pub struct LoadedFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// The `__metadata__` map (empty if absent).
    pub metadata: HashMap<String, String>,
}

impl LoadedFile {
    /// Reads and validates the header (length, JSON, offsets) of a safetensors file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(LoadedFile {
            path: path.to_path_buf(),
            bytes,
            metadata,
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(|s| s.as_str())
            .ok_or_else(|| Error::checkpoint(&self.path, format!("metadata has no `{key}`")))
    }

    /// The F32 tensor `name`, which must have shape `dims` and hold only finite values.
    pub fn tensor(
        &self,
        name: &str,
        dims: &[usize],
        device: &Device,
    ) -> std::result::Result<Tensor, String> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| e.to_string())?;
        let view = st
            .tensor(name)
            .map_err(|_| format!("tensor `{name}` is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor `{name}` has dtype {:?}, expected F32",
                view.dtype()
            ));
        }
        if view.shape() != dims {
            return Err(format!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                view.shape(),
                dims
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // A trained run never saves a non-finite value (a diverging run stops at the last finite
        // checkpoint), so one here is corruption: refuse it by name rather than evaluate NaN.
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(format!(
                "tensor `{name}` holds a non-finite value ({v}) at element {i}"
            ));
        }
        Tensor::from_vec(data, dims, device).map_err(|e| e.to_string())
    }

    /// Total number of 4-byte values in the file's tensors (an upper bound on its f32 elements).
    pub fn f32_elements(&self) -> usize {
        SafeTensors::deserialize(&self.bytes)
            .map(|st| st.tensors().iter().map(|(_, t)| t.data().len() / 4).sum())
            .unwrap_or(0)
    }

    /// Wraps a message about this file as an error.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::checkpoint(&self.path, reason)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
