//! TensorBoard event files, written by hand (no maintained crate writes them).
//!
//! A file is a sequence of TFRecords: `u64 length (LE)`, `u32 masked CRC-32C of the length bytes`,
//! `payload`, `u32 masked CRC-32C of the payload`, with `mask(c) = ((c >> 15) | (c << 17)) +
//! 0xa282ead8`. Each payload is a serialized `tensorflow.Event` protobuf:
//! `wall_time (1, double)`, `step (2, int64)`, and either `file_version (3, string)` for the first
//! record or `summary (5, Summary)` with `Summary.value (1) = { tag (1, string),
//! simple_value (2, float) }`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli), bitwise-reflected polynomial 0x82F63B78.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = Vec::new();
    e.push((1 << 3) | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3);
    varint(step as u64, &mut e);
    e
}

/// Encodes a scalar `Event` payload.
pub fn scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    field_bytes(1, tag.as_bytes(), &mut v);
    v.push((2 << 3) | 5);
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    field_bytes(1, &v, &mut summary);
    let mut e = event_header(wall_time, step);
    field_bytes(5, &summary, &mut e);
    e
}

/// Frames a payload as one TFRecord.
pub fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(payload.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(payload);
    r.extend_from_slice(&masked_crc(payload).to_le_bytes());
    r
}

/// Appends scalar summaries to an event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// Creates `events.out.tfevents.<time>.gentrain` in `dir` with the version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let t = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.gentrain.{}",
            t as u64,
            std::process::id()
        ));
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter {
            out: BufWriter::new(f),
            path,
        };
        let mut e = event_header(t, 0);
        field_bytes(3, b"brain.Event:2", &mut e);
        w.write(&e)?;
        Ok(w)
    }

    fn write(&mut self, payload: &[u8]) -> Result<()> {
        self.out
            .write_all(&record(payload))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes one scalar.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.write(&scalar_event(now(), step as i64, tag, value as f32))
    }

    /// Flushes buffered records.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn record_framing_round_trips() {
        let payload = scalar_event(1.5, 7, "loss", 0.25);
        let r = record(&payload);
        let len = u64::from_le_bytes(r[0..8].try_into().unwrap()) as usize;
        assert_eq!(len, payload.len());
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc(&r[0..8])
        );
        assert_eq!(&r[12..12 + len], &payload[..]);
        assert_eq!(
            u32::from_le_bytes(r[12 + len..].try_into().unwrap()),
            masked_crc(&payload)
        );
        // The tag and the float value appear verbatim in the protobuf.
        assert!(payload.windows(4).any(|w| w == b"loss"));
        assert!(payload.windows(4).any(|w| w == 0.25f32.to_le_bytes()));
    }
}
