//! Fuzzes the IDX reader: `parse_idx_bytes` on the raw input, and `read_idx` on a file holding
//! either those bytes as they are (which also feeds arbitrary, mostly corrupt, gzip streams to
//! the reader whenever they start with the gzip magic 1f 8b) or the bytes gzipped with flate2.
//!
//! Input layout: byte 0 selects the mode (bit 0: gzip the rest; bits 1..: compression level),
//! bytes 1.. are the IDX payload.
//!
//! Besides "no panic, no abort, no timeout, no out-of-memory", the target checks that a parsed
//! array is consistent (1..=4 dimensions, data length = product of the dimensions, re-encodes
//! to the exact input) and that reading the payload from a file, raw or gzipped, gives the same
//! verdict and the same array as parsing it in memory.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use gentrain::data::idx::{encode_idx, parse_idx_bytes, read_idx};
use libfuzzer_sys::fuzz_target;

/// A scratch directory for this fuzzing process (left in the temp dir when libFuzzer exits).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("gentrain-fuzz-idx-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    gz.write_all(bytes).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };

    let in_memory = parse_idx_bytes(payload);
    if let Ok(a) = &in_memory {
        assert!((1..=4).contains(&a.dims.len()), "dims {:?}", a.dims);
        assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
        assert_eq!(encode_idx(&a.dims, &a.data), payload, "re-encoding differs");
    }

    let gzipped = mode & 1 == 1;
    let file_bytes = if gzipped {
        gzip(payload, u32::from(mode >> 1) % 10)
    } else {
        payload.to_vec()
    };
    let path = scratch().join("input-idx");
    std::fs::write(&path, &file_bytes).expect("write scratch file");
    let from_file = read_idx(&path);

    // A raw payload that starts with the gzip magic is read as gzip by `read_idx` but rejected
    // (bad magic) by `parse_idx_bytes`: only compare the other cases.
    if gzipped || !payload.starts_with(&[0x1f, 0x8b]) {
        match (&in_memory, &from_file) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "file and memory parse differ"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!(
                "verdicts differ (gzipped = {gzipped}): memory {:?}, file {:?}",
                a.as_ref().map(|a| &a.dims),
                b.as_ref().map(|b| &b.dims)
            ),
        }
    }
});
