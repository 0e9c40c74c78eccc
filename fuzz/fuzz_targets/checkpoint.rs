//! Fuzzes the checkpoint loader with arbitrary bytes as `model.safetensors`:
//! `checkpoint::LoadedFile::read` (header length, JSON, offsets), `LoadedFile::tensor` (for every
//! tensor the header names, with the shape it claims, and for a few fixed names and shapes), and
//! `session::load_checkpoint` on the directory holding the file (metadata checks, config parsing
//! and validation, model construction, tensor lookup and shape checks), all on `Device::Cpu`.
//!
//! Besides "no panic, no abort, no timeout, no out-of-memory", the target checks that every F32
//! tensor of a file `LoadedFile::read` accepts loads with the shape its header claims.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use gentrain::checkpoint::{LoadedFile, MODEL_FILE};
use libfuzzer_sys::fuzz_target;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// A scratch checkpoint directory for this fuzzing process (left in the temp dir when libFuzzer
/// exits).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("gentrain-fuzz-ckpt-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

/// Names and shapes the seed checkpoints use (moons 2-4-2 VAE, MNIST 784-2-2 VAE).
const FIXED: &[(&str, &[usize])] = &[
    ("encoders.0.net.0.weight", &[4, 2]),
    ("encoders.0.mu.bias", &[2]),
    ("decoders.0.out.weight", &[784, 2]),
    ("decoders.1.logvar.weight", &[2, 2]),
    ("", &[]),
];

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let path = dir.join(MODEL_FILE);
    std::fs::write(&path, data).expect("write scratch file");

    if let Ok(file) = LoadedFile::read(&path) {
        let _ = file.meta("config");
        let st = SafeTensors::deserialize(data).expect("LoadedFile::read accepted it");
        for (name, view) in st.tensors().into_iter().take(32) {
            let shape = view.shape().to_vec();
            let r = file.tensor(&name, &shape, &Device::Cpu);
            if view.dtype() == Dtype::F32 {
                let t = r.unwrap_or_else(|e| panic!("valid F32 tensor {name:?} {shape:?}: {e}"));
                assert_eq!(t.dims(), &shape[..]);
            } else {
                assert!(r.is_err(), "non-F32 tensor {name:?} loaded");
            }
        }
        for (name, dims) in FIXED {
            let _ = file.tensor(name, dims, &Device::Cpu);
        }
    }

    let _ = gentrain::session::load_checkpoint(dir, &Device::Cpu);
});
