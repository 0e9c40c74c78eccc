//! Fuzzes the CIFAR-10 reader: `parse_cifar_bytes` on the raw input, and `load_cifar10` on a
//! directory whose `data_batch_1.bin` (or `test_batch.bin`) holds the same bytes.
//!
//! Input layout: byte 0 selects the mode (bit 0: the test split instead of the training
//! split; bit 1: also write a `batches.meta.txt` made of bytes 1..65 of the input), bytes 1..
//! are the batch.
//!
//! Besides "no panic, no abort, no timeout, no out-of-memory", the target checks that a parsed
//! batch is consistent (3x32x32 images, labels below 10, one record per 3073 bytes), that it
//! re-encodes to the exact input, and that the directory loader gives the same verdict and the
//! same images as the in-memory parser.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use gentrain::data::cifar::{encode_cifar, load_cifar10, parse_cifar_bytes, CIFAR_RECORD_BYTES};
use gentrain::data::images::Split;
use libfuzzer_sys::fuzz_target;

/// A scratch directory for this fuzzing process (left in the temp dir when libFuzzer exits).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("gentrain-fuzz-cifar-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, batch)) = data.split_first() else {
        return;
    };

    let in_memory = parse_cifar_bytes(batch);
    if let Ok(set) = &in_memory {
        set.check().expect("a parsed batch passes check()");
        assert_eq!((set.channels, set.height, set.width), (3, 32, 32));
        assert_eq!(set.n * CIFAR_RECORD_BYTES, batch.len());
        assert_eq!(
            encode_cifar(set).expect("re-encode"),
            batch,
            "re-encoding differs"
        );
    }

    let dir = scratch();
    let (split, file, other) = if mode & 1 == 1 {
        (Split::Test, "test_batch.bin", "data_batch_1.bin")
    } else {
        (Split::Train, "data_batch_1.bin", "test_batch.bin")
    };
    let _ = std::fs::remove_file(dir.join(other));
    std::fs::write(dir.join(file), batch).expect("write scratch file");
    let meta = dir.join("batches.meta.txt");
    let with_meta = mode & 2 == 2;
    if with_meta {
        std::fs::write(&meta, &batch[..batch.len().min(64)]).expect("write scratch file");
    } else {
        let _ = std::fs::remove_file(&meta);
    }
    let from_dir = load_cifar10(dir, split);
    match (&in_memory, &from_dir) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.pixels, b.pixels, "directory and memory parse differ");
            assert_eq!(a.labels, b.labels, "directory and memory labels differ");
            if !with_meta {
                assert_eq!(a.classes, b.classes);
            }
        }
        (Err(_), Err(_)) => {}
        // A meta file of the wrong shape fails the directory load alone.
        (Ok(_), Err(_)) if with_meta => {}
        (a, b) => panic!(
            "verdicts differ: memory {:?}, directory {:?}",
            a.is_ok(),
            b.is_ok()
        ),
    }
});
