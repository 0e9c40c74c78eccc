//! Fuzzes the NumPy reader: the `.npy` parsers (`parse_npy_bytes` and the images, rows and
//! labels variants) and `parse_npz_bytes` on the raw input, the same payload stored as the
//! array `x` of a zip archive (stored or deflated), and `read_numpy` on a file holding either.
//!
//! Input layout: byte 0 selects the mode (bit 0: deflate the archive entry; bit 1: write the
//! archive, not the bare payload, to the file read by `read_numpy`), bytes 1.. are the payload.
//!
//! Besides "no panic, no abort, no timeout, no out-of-memory", the target checks that what a
//! parser returns passes its own `check()`, that `parse_npy_bytes` agrees with the images or
//! rows parser its element type selects, and that the payload read as an archive entry (a
//! stream of claimed length) or from a file gives the same verdict and value as in memory.
#![no_main]

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use gentrain::data::npy::{
    parse_npy_bytes, parse_npy_images_bytes, parse_npy_labels_bytes, parse_npy_rows_bytes,
    parse_npz_bytes, read_numpy, NpyData,
};
use libfuzzer_sys::fuzz_target;

/// A scratch directory for this fuzzing process (left in the temp dir when libFuzzer exits).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("gentrain-fuzz-npy-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

/// The payload as the only entry, `x.npy`, of a zip archive.
fn archive(payload: &[u8], deflate: bool) -> Vec<u8> {
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file("x.npy", options).expect("zip to memory");
    w.write_all(payload).expect("zip to memory");
    w.finish().expect("zip to memory").into_inner()
}

fn checked(data: &NpyData) {
    match data {
        NpyData::Images(x) => x.check().expect("images from the parser pass check()"),
        NpyData::Rows(x) => x.check().expect("rows from the parser pass check()"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };

    let any = parse_npy_bytes(payload);
    let images = parse_npy_images_bytes(payload);
    let rows = parse_npy_rows_bytes(payload);
    if let Ok(labels) = parse_npy_labels_bytes(payload) {
        assert!(!labels.is_empty());
    }
    let _ = parse_npz_bytes(payload);
    match &any {
        Ok(d @ NpyData::Images(x)) => {
            checked(d);
            assert_eq!(images.as_ref().ok(), Some(x), "images parser disagrees");
        }
        Ok(d @ NpyData::Rows(x)) => {
            checked(d);
            assert_eq!(rows.as_ref().ok(), Some(x), "rows parser disagrees");
        }
        Err(_) => assert!(
            images.is_err() && rows.is_err(),
            "only a typed parser accepted"
        ),
    }

    let zipped = archive(payload, mode & 1 == 1);
    let from_zip = parse_npz_bytes(&zipped);
    match (&any, &from_zip) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "archive entry and memory parse differ"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "verdicts differ: memory {:?}, archive {:?}",
            a.is_ok(),
            b.is_ok()
        ),
    }

    let (file_bytes, expected) = if mode & 2 == 2 {
        (&zipped[..], &from_zip)
    } else {
        (payload, &any)
    };
    let path = scratch().join("input");
    std::fs::write(&path, file_bytes).expect("write scratch file");
    let from_file = read_numpy(&path);
    // A bare payload starting with "PK" is read as an archive by `read_numpy`.
    if mode & 2 == 2 || !payload.starts_with(b"PK") {
        match (expected, &from_file) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "file and memory parse differ"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!(
                "verdicts differ: memory {:?}, file {:?}",
                a.is_ok(),
                b.is_ok()
            ),
        }
    }
});
