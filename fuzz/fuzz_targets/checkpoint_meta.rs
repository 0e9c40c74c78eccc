//! Structure-aware companion of the `checkpoint` target: the input is the `__metadata__` of an
//! otherwise valid `model.safetensors`, so the fuzzer spends its time on what
//! `session::load_checkpoint` does with the metadata (format version, model family, the JSON
//! `config` and its validation, `input_dim`, `image_shape`, `step`, `epoch`, building the model
//! the config describes, matching its parameters against the file's tensors) instead of on
//! keeping the safetensors header length and offsets consistent.
//!
//! Input: text (lossy UTF-8), one `key=value` per line, applied over the metadata of the seed
//! checkpoint `seeds/checkpoint/moons-1layer.safetensors` (a line `key` without `=` removes the
//! key). The tensors are always those of that seed checkpoint.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use gentrain::checkpoint::MODEL_FILE;
use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

const BASE: &[u8] = include_bytes!("../seeds/checkpoint/moons-1layer.safetensors");

/// A scratch checkpoint directory for this fuzzing process (left in the temp dir when libFuzzer
/// exits).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("gentrain-fuzz-meta-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, base_meta) = SafeTensors::read_metadata(BASE).expect("seed checkpoint is valid");
    let mut metadata: HashMap<String, String> = base_meta.metadata().clone().unwrap_or_default();
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        match line.split_once('=') {
            Some((k, v)) => {
                metadata.insert(k.to_string(), v.to_string());
            }
            None => {
                metadata.remove(line);
            }
        }
    }
    let st = SafeTensors::deserialize(BASE).expect("seed checkpoint is valid");
    let tensors: Vec<(String, TensorView<'_>)> = st.tensors();
    let bytes = safetensors::serialize(tensors, Some(metadata)).expect("serializes");

    let dir = scratch();
    std::fs::write(dir.join(MODEL_FILE), &bytes).expect("write scratch file");
    let _ = gentrain::session::load_checkpoint(dir, &Device::Cpu);
});
