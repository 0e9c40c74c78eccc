//! Reader for the IDX format of the MNIST database (LeCun et al.): a 4-byte magic
//! `0x00 0x00 <type> <ndims>`, `ndims` big-endian u32 dimensions, then the row-major data.
//! Only unsigned bytes (`type = 0x08`) are accepted, which is what every MNIST-style image and
//! label file uses. Files may be gzipped (detected by the gzip magic, not by the name).
//!
//! The reader never allocates more than the file actually holds: the claimed size is checked
//! against the file length before any allocation (raw files), or the decompressed stream is read
//! with a limit of the claimed size plus one byte and grows only as data arrives (gzip files).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An n-dimensional array of unsigned bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

const UBYTE: u8 = 0x08;
const MAX_DIMS: usize = 4;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Idx {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads an IDX file (raw or gzipped).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut magic2 = [0u8; 2];
    read_exact(
        &mut reader,
        &mut magic2,
        path,
        "file is shorter than the IDX header",
    )?;
    let chained = std::io::Cursor::new(magic2).chain(reader);
    if magic2 == [0x1f, 0x8b] {
        parse(flate2::read::GzDecoder::new(chained), path, None)
    } else {
        parse(chained, path, Some(file_len))
    }
}

/// Parses IDX bytes from memory (raw, not gzipped). Used by tests and fuzzing.
pub fn parse_idx_bytes(bytes: &[u8]) -> Result<IdxArray> {
    parse(bytes, &PathBuf::from("<memory>"), Some(bytes.len() as u64))
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad(path, what),
        _ => bad(path, format!("read failed: {e}")),
    })
}

fn parse(mut r: impl Read, path: &Path, raw_len: Option<u64>) -> Result<IdxArray> {
    let mut magic = [0u8; 4];
    read_exact(
        &mut r,
        &mut magic,
        path,
        "file is shorter than the IDX header",
    )?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(bad(
            path,
            format!(
                "bad magic {:02x}{:02x}{:02x}{:02x}",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != UBYTE {
        return Err(bad(
            path,
            format!(
                "unsupported element type 0x{:02x} (only unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    let ndims = magic[3] as usize;
    if ndims == 0 || ndims > MAX_DIMS {
        return Err(bad(
            path,
            format!("unsupported number of dimensions {ndims}"),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        let mut b = [0u8; 4];
        read_exact(&mut r, &mut b, path, "header truncated in the dimensions")?;
        dims.push(u32::from_be_bytes(b) as usize);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("dimensions {dims:?} overflow")))?;
    let header = 4 + 4 * ndims as u64;
    if let Some(len) = raw_len {
        let have = len.saturating_sub(header);
        if have != expected as u64 {
            return Err(bad(
                path,
                format!(
                    "header claims {dims:?} = {expected} bytes of data but the file holds {have}"
                ),
            ));
        }
    }
    let mut data = Vec::with_capacity(if raw_len.is_some() {
        expected
    } else {
        expected.min(1 << 20)
    });
    (&mut r)
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| bad(path, format!("read failed: {e}")))?;
    if data.len() != expected {
        return Err(bad(
            path,
            if data.len() < expected {
                format!(
                    "truncated: header claims {dims:?} = {expected} bytes of data, found {}",
                    data.len()
                )
            } else {
                format!("trailing data after the {expected} bytes the header claims")
            },
        ));
    }
    Ok(IdxArray { dims, data })
}

/// Encodes an unsigned-byte IDX array (used to export evaluation data and in tests).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, UBYTE, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_round_trip() {
        let bytes = encode_idx(&[2, 3, 2], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let a = parse_idx_bytes(&bytes).unwrap();
        assert_eq!(a.dims, vec![2, 3, 2]);
        assert_eq!(a.data[11], 12);
    }

    #[test]
    fn truncated_header_and_data() {
        let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        for cut in [0, 3, 6, bytes.len() - 1] {
            let err = parse_idx_bytes(&bytes[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("shorter") || err.contains("truncated") || err.contains("holds"),
                "{cut}: {err}"
            );
        }
    }

    #[test]
    fn bad_magic_and_type() {
        let mut bytes = encode_idx(&[1], &[7]);
        bytes[0] = 1;
        assert!(parse_idx_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let mut bytes = encode_idx(&[1], &[7]);
        bytes[2] = 0x0d;
        assert!(parse_idx_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("element type"));
    }

    #[test]
    fn lying_header_does_not_allocate() {
        // Claims 4G x 4G bytes (overflows) and then 2^32-1 x 255 bytes with only 4 present.
        let mut bytes = encode_idx(&[1, 1], &[0]);
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        bytes[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = parse_idx_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("holds") || e.contains("overflow"), "{e}");
    }

    #[test]
    fn gzip_with_lying_header_is_rejected_without_huge_allocation() {
        use std::io::Write;
        let mut raw = encode_idx(&[1, 1], &[0]);
        raw[4..8].copy_from_slice(&60000u32.to_be_bytes());
        raw[8..12].copy_from_slice(&(1u32 << 30).to_be_bytes());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap();
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
