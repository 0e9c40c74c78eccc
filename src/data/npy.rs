//! Reader for NumPy's `.npy` files and `.npz` archives
//! (<https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>).
//!
//! What is accepted:
//! - **images**: `uint8` arrays `(N, H, W)` (one grey channel) or `(N, H, W, C)` with `C` 1 or 3
//!   (channels last, RGB), returned as planar [`RawImages`] `(N, C, H, W)`;
//! - **rows**: `float32` arrays `(N, D)` (also `float16` and `float64`, converted to `float32`),
//!   returned as [`RealRows`]; every value must be finite (a `float64` beyond the `float32`
//!   range becomes infinite and is refused too);
//! - **labels**: 1-D integer arrays `(N,)` of any integer type (`int8` .. `int64`, `uint8` ..
//!   `uint64`); values must lie in `0 ..= u32::MAX`.
//!
//! Both byte orders and both memory orders (C and Fortran, `fortran_order: True`, which
//! `np.save` writes for a transposed array) are read; a Fortran-ordered array is transposed
//! into C order after reading, which holds the data twice for a moment. Versions 1.0, 2.0 and
//! 3.0 of the format are read. Structured, object (pickled), string, bool and complex arrays
//! are refused.
//!
//! In a `.npz` archive (a zip of `.npy` files, as written by `np.savez` or
//! `np.savez_compressed`), the data is the array named [`NPZ_DATA_KEY`] (`x`), else `arr_0`
//! (the first positional array of `np.savez(path, images, labels)`), else the archive's only
//! array; the labels are the array named [`NPZ_LABEL_KEY`] (`y`), else `arr_1` when the data is
//! `arr_0`. Other arrays are ignored. Entries may be stored or deflated.
//!
//! The reader never allocates more than the input holds: the header length and the data size
//! the header claims are checked against the file length before anything is allocated for
//! them, and `.npz` entries (whose sizes are only claimed) are read with a limit of the claimed
//! size plus one byte into buffers that grow as data arrives.
//!
//! Every error names the file (and the array, inside an archive) and says what is wrong in one
//! line.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use super::raw::{in_file, RawImages, RealRows};
use crate::error::{Error, Result};

/// The key (`np.savez(path, x=...)`) of the data array in a `.npz` archive.
pub const NPZ_DATA_KEY: &str = "x";
/// The key (`np.savez(path, y=...)`) of the label array in a `.npz` archive.
pub const NPZ_LABEL_KEY: &str = "y";

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Longest header accepted (NumPy itself refuses headers over 10,000 bytes by default).
const MAX_HEADER: usize = 1 << 20;
/// Bytes converted per read (a multiple of every item size).
const CHUNK: usize = 1 << 16;
const MEMORY: &str = "<memory>";

/// What a `.npy` file or `.npz` archive holds, told apart by its element type: `uint8` arrays
/// are images, floating-point arrays are rows.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `uint8` images, planar `(N, C, H, W)`.
    Images(RawImages),
    /// Floating-point rows `(N, D)`.
    Rows(RealRows),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unsigned,
    Signed,
    Float,
}

/// A plain numeric element type.
#[derive(Debug, Clone, Copy)]
struct Dtype {
    kind: Kind,
    size: usize,
    big_endian: bool,
}

/// A parsed header: the raw `descr` text, the memory order and the shape.
#[derive(Debug)]
struct Header {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
    /// Bytes before the data (magic, version, length field and header text).
    offset: u64,
}

/// How much input there is: a file or slice of known length, or a stream whose length is
/// only claimed (an `.npz` entry).
#[derive(Debug, Clone, Copy)]
enum Avail {
    Exact(u64),
    Stream,
}

fn bad(name: &str, reason: impl std::fmt::Display) -> Error {
    Error::Data(format!("{name}: {reason}"))
}

/// The message of an error from another crate, on one line.
fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// `(2, 3)` as NumPy prints shapes.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

/// Reads `uint8` images from a `.npy` file: `(N, H, W)` (1 channel) or `(N, H, W, C)` with `C`
/// 1 or 3, returned planar `(N, C, H, W)` without labels.
///
/// # Errors
/// [`Error::Io`] when the file cannot be opened; [`Error::Data`] naming the file for a bad
/// magic or header, another element type than `uint8`, another rank or channel count, a
/// zero-sized dimension, or a data size that does not match the header.
pub fn read_npy_images(path: &Path) -> Result<RawImages> {
    with_file(path, images_from)
}

/// Reads floating-point rows `(N, D)` (`float32`, or `float16`/`float64` converted) from a
/// `.npy` file, without labels.
///
/// # Errors
/// As [`read_npy_images`], and for a non-finite value (the message names its row).
pub fn read_npy_rows(path: &Path) -> Result<RealRows> {
    with_file(path, rows_from)
}

/// Reads integer labels `(N,)` from a `.npy` file (e.g. the `y.npy` beside an `x.npy`).
///
/// # Errors
/// As [`read_npy_images`], for a non-integer element type, another rank than 1, and a label
/// that is negative or above `u32::MAX` (the message names its index).
pub fn read_npy_labels(path: &Path) -> Result<Vec<u32>> {
    with_file(path, labels_from)
}

/// Reads a `.npy` file as images (`uint8`) or rows (floating point), chosen by its element
/// type.
///
/// # Errors
/// As [`read_npy_images`] or [`read_npy_rows`], and for any other element type.
pub fn read_npy(path: &Path) -> Result<NpyData> {
    with_file(path, any_from)
}

/// Reads a `.npz` archive: the data array `x` (or `arr_0`, or the only array) as images or
/// rows by its element type, with labels from `y` (or `arr_1` beside `arr_0`) when present.
///
/// # Errors
/// [`Error::Io`] when the file cannot be opened; [`Error::Data`] naming the file when it is not
/// a readable zip archive, holds no data array (the message lists the arrays found), an array
/// is invalid as for [`read_npy`] and [`read_npy_labels`], or the label count differs from the
/// number of images or rows.
pub fn read_npz(path: &Path) -> Result<NpyData> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    npz_from(BufReader::new(file), &path.display().to_string())
}

/// Reads a `.npy` file or a `.npz` archive, told apart by their first bytes (`\x93NUMPY` or
/// the zip signature `PK`), as [`read_npy`] or [`read_npz`].
///
/// # Errors
/// As [`read_npy`] and [`read_npz`].
pub fn read_numpy(path: &Path) -> Result<NpyData> {
    let mut first = [0u8; 2];
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let got = read_up_to(&mut file, &mut first).map_err(|e| Error::io(path, e))?;
    if got == 2 && &first == b"PK" {
        read_npz(path)
    } else {
        read_npy(path)
    }
}

/// [`read_npy_images`] on bytes in memory (tests and fuzzing); errors name `<memory>`.
///
/// # Errors
/// As [`read_npy_images`], without [`Error::Io`].
pub fn parse_npy_images_bytes(bytes: &[u8]) -> Result<RawImages> {
    images_from(&mut &bytes[..], MEMORY, Avail::Exact(bytes.len() as u64))
}

/// [`read_npy_rows`] on bytes in memory.
///
/// # Errors
/// As [`read_npy_rows`], without [`Error::Io`].
pub fn parse_npy_rows_bytes(bytes: &[u8]) -> Result<RealRows> {
    rows_from(&mut &bytes[..], MEMORY, Avail::Exact(bytes.len() as u64))
}

/// [`read_npy_labels`] on bytes in memory.
///
/// # Errors
/// As [`read_npy_labels`], without [`Error::Io`].
pub fn parse_npy_labels_bytes(bytes: &[u8]) -> Result<Vec<u32>> {
    labels_from(&mut &bytes[..], MEMORY, Avail::Exact(bytes.len() as u64))
}

/// [`read_npy`] on bytes in memory.
///
/// # Errors
/// As [`read_npy`], without [`Error::Io`].
pub fn parse_npy_bytes(bytes: &[u8]) -> Result<NpyData> {
    any_from(&mut &bytes[..], MEMORY, Avail::Exact(bytes.len() as u64))
}

/// [`read_npz`] on bytes in memory.
///
/// # Errors
/// As [`read_npz`], without [`Error::Io`].
pub fn parse_npz_bytes(bytes: &[u8]) -> Result<NpyData> {
    npz_from(Cursor::new(bytes), MEMORY)
}

/// Encodes an array as a version 1.0 `.npy` file exactly as `np.save` does (the header padded
/// with spaces to a multiple of 64 bytes); `descr` is NumPy's type string (`|u1`, `<f4`, ...)
/// and `data` the raw element bytes in the given memory order. Used by tests and fuzzing; the
/// data is not checked against the shape. A header over 65,535 bytes is written as version 2.0.
pub fn encode_npy(descr: &str, shape: &[usize], fortran_order: bool, data: &[u8]) -> Vec<u8> {
    let order = if fortran_order { "True" } else { "False" };
    let shape = shape_text(shape);
    let mut text = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let v1 = text.len() + 11 <= usize::from(u16::MAX);
    let prefix = if v1 { 10 } else { 12 };
    let pad = (64 - (prefix + text.len() + 1) % 64) % 64;
    text.push_str(&" ".repeat(pad));
    text.push('\n');
    let mut out = MAGIC.to_vec();
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

fn with_file<T>(
    path: &Path,
    read: impl FnOnce(&mut BufReader<File>, &str, Avail) -> Result<T>,
) -> Result<T> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read(
        &mut BufReader::new(file),
        &path.display().to_string(),
        Avail::Exact(len),
    )
}

fn images_from(r: &mut impl Read, name: &str, avail: Avail) -> Result<RawImages> {
    let h = read_header(r, name, avail)?;
    decode_images(r, &h, name, avail)
}

fn rows_from(r: &mut impl Read, name: &str, avail: Avail) -> Result<RealRows> {
    let h = read_header(r, name, avail)?;
    decode_rows(r, &h, name, avail)
}

fn labels_from(r: &mut impl Read, name: &str, avail: Avail) -> Result<Vec<u32>> {
    let h = read_header(r, name, avail)?;
    decode_labels(r, &h, name, avail)
}

fn any_from(r: &mut impl Read, name: &str, avail: Avail) -> Result<NpyData> {
    let h = read_header(r, name, avail)?;
    match parse_descr(&h.descr) {
        Some(Dtype {
            kind: Kind::Unsigned,
            size: 1,
            ..
        }) => Ok(NpyData::Images(decode_images(r, &h, name, avail)?)),
        Some(Dtype {
            kind: Kind::Float, ..
        }) => Ok(NpyData::Rows(decode_rows(r, &h, name, avail)?)),
        _ => Err(bad(
            name,
            format!(
                "element type '{}' is neither uint8 ('|u1', images) nor floating point \
                 ('<f4' or '<f8', rows)",
                h.descr
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------------

/// Reads up to `buf.len()` bytes, fewer only at the end of the input.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_full(r: &mut impl Read, buf: &mut [u8], name: &str, short: &str) -> Result<()> {
    match read_up_to(r, buf) {
        Ok(k) if k == buf.len() => Ok(()),
        Ok(_) => Err(bad(name, short)),
        Err(e) => Err(bad(name, format!("read failed: {}", one_line(e)))),
    }
}

/// Reads the magic, version, header length and header text; leaves `r` at the data.
fn read_header(r: &mut impl Read, name: &str, avail: Avail) -> Result<Header> {
    const SHORT: &str = "file is shorter than the NPY header";
    let mut pre = [0u8; 10];
    read_full(r, &mut pre, name, SHORT)?;
    if &pre[..6] != MAGIC {
        let hint = if pre.starts_with(b"PK") {
            " (this is a zip archive: read it as .npz)"
        } else {
            ""
        };
        return Err(bad(
            name,
            format!("not an NPY file: bad magic {:02x?}{hint}", &pre[..6]),
        ));
    }
    let (len, prefix) = match (pre[6], pre[7]) {
        (1, 0) => (usize::from(u16::from_le_bytes([pre[8], pre[9]])), 10u64),
        (2, 0) | (3, 0) => {
            let mut more = [0u8; 2];
            read_full(r, &mut more, name, SHORT)?;
            let len = u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]);
            (usize::try_from(len).unwrap_or(usize::MAX), 12u64)
        }
        (major, minor) => {
            return Err(bad(
                name,
                format!(
                    "unsupported NPY format version {major}.{minor} (1.0, 2.0 and 3.0 are read)"
                ),
            ))
        }
    };
    if len > MAX_HEADER {
        return Err(bad(
            name,
            format!("NPY header of {len} bytes is longer than the {MAX_HEADER} accepted"),
        ));
    }
    let offset = prefix + len as u64;
    if let Avail::Exact(total) = avail {
        if offset > total {
            return Err(bad(
                name,
                format!("truncated: the NPY header claims {len} bytes but the file holds {total} bytes in all"),
            ));
        }
    }
    let mut raw = Vec::new();
    r.take(len as u64)
        .read_to_end(&mut raw)
        .map_err(|e| bad(name, format!("read failed: {}", one_line(e))))?;
    if raw.len() < len {
        return Err(bad(
            name,
            format!(
                "truncated in the NPY header ({} of its {len} bytes)",
                raw.len()
            ),
        ));
    }
    let text = if pre[6] == 3 {
        String::from_utf8(raw).map_err(|_| bad(name, "NPY header is not UTF-8"))?
    } else {
        raw.iter().map(|&b| char::from(b)).collect()
    };
    let (descr, fortran, shape) =
        parse_dict(&text).map_err(|reason| bad(name, format!("invalid NPY header: {reason}")))?;
    Ok(Header {
        descr,
        fortran,
        shape,
        offset,
    })
}

/// Parses the header dictionary `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`
/// (keys in any order, a trailing comma optional, whitespace anywhere) into its three values.
/// Only these three keys are allowed, as in NumPy.
fn parse_dict(text: &str) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let mut p = Lexer {
        s: text.as_bytes(),
        at: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        match key.as_str() {
            "descr" if descr.is_none() => descr = Some(p.descr()?),
            "fortran_order" if fortran.is_none() => fortran = Some(p.boolean()?),
            "shape" if shape.is_none() => shape = Some(p.shape()?),
            "descr" | "fortran_order" | "shape" => return Err(format!("key '{key}' twice")),
            _ => return Err(format!("unexpected key {key:?}")),
        }
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_ws();
    if p.at < p.s.len() {
        return Err(format!(
            "unexpected text after the dictionary: {}",
            p.snippet()
        ));
    }
    Ok((
        descr.ok_or("missing key 'descr'")?,
        fortran.ok_or("missing key 'fortran_order'")?,
        shape.ok_or("missing key 'shape'")?,
    ))
}

/// The small lexer of [`parse_dict`] over the header bytes; `at` is the next byte.
struct Lexer<'a> {
    s: &'a [u8],
    at: usize,
}

type Parsed<T> = std::result::Result<T, String>;

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Up to 24 bytes from here, quoted, for messages.
    fn snippet(&self) -> String {
        let rest = self.s.get(self.at..).unwrap_or_default();
        if rest.is_empty() {
            return "end of header".to_string();
        }
        format!("{:?}", String::from_utf8_lossy(&rest[..rest.len().min(24)]))
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let hit = self.peek() == Some(c);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn expect(&mut self, c: u8) -> Parsed<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at {}",
                char::from(c),
                self.snippet()
            ))
        }
    }

    /// A quoted string without escapes.
    fn string(&mut self) -> Parsed<String> {
        self.skip_ws();
        let Some(quote @ (b'\'' | b'"')) = self.peek() else {
            return Err(format!("expected a quoted string at {}", self.snippet()));
        };
        let start = self.at + 1;
        let Some(len) = self.s[start..].iter().position(|&b| b == quote) else {
            return Err("unterminated string".to_string());
        };
        let s = &self.s[start..start + len];
        if s.contains(&b'\\') {
            return Err("escapes in strings are not supported".to_string());
        }
        self.at = start + len + 1;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn descr(&mut self) -> Parsed<String> {
        self.skip_ws();
        if self.peek() == Some(b'[') {
            return Err("structured element types (field lists) are not supported".to_string());
        }
        self.string()
    }

    fn boolean(&mut self) -> Parsed<bool> {
        self.skip_ws();
        let rest = &self.s[self.at..];
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err(format!(
            "expected True or False for 'fortran_order' at {}",
            self.snippet()
        ))
    }

    /// A non-negative decimal integer (with Python 2's optional `L`).
    fn integer(&mut self) -> Parsed<usize> {
        self.skip_ws();
        let start = self.at;
        let mut value = 0usize;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(usize::from(d - b'0')))
                .ok_or("a dimension does not fit in 64 bits")?;
            self.at += 1;
        }
        if self.at == start {
            return Err(format!(
                "expected a non-negative integer dimension at {}",
                self.snippet()
            ));
        }
        if self.peek() == Some(b'L') {
            self.at += 1;
        }
        Ok(value)
    }

    /// `(d0, d1, ...)` or `[d0, d1, ...]`, a trailing comma allowed.
    fn shape(&mut self) -> Parsed<Vec<usize>> {
        let close = if self.eat(b'(') {
            b')'
        } else if self.eat(b'[') {
            b']'
        } else {
            return Err(format!(
                "expected a tuple for 'shape' at {}",
                self.snippet()
            ));
        };
        let mut dims = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(dims);
            }
            if dims.len() == 32 {
                return Err("more than 32 dimensions".to_string());
            }
            dims.push(self.integer()?);
            if !self.eat(b',') {
                self.expect(close)?;
                return Ok(dims);
            }
        }
    }
}

/// `<f4`, `|u1`, `>i8`, `=u2`, `f8`, ... as a plain numeric type; `None` for anything else.
fn parse_descr(descr: &str) -> Option<Dtype> {
    let (big_endian, rest) = match descr.as_bytes().first()? {
        b'<' => (false, &descr[1..]),
        b'>' => (true, &descr[1..]),
        b'|' | b'=' => (cfg!(target_endian = "big"), &descr[1..]),
        _ => (cfg!(target_endian = "big"), descr),
    };
    let kind = match rest.as_bytes().first()? {
        b'u' => Kind::Unsigned,
        b'i' => Kind::Signed,
        b'f' => Kind::Float,
        _ => return None,
    };
    let size = match (kind, &rest[1..]) {
        (Kind::Float, "2") => 2,
        (_, "1") if kind != Kind::Float => 1,
        (_, "2") => 2,
        (_, "4") => 4,
        (_, "8") => 8,
        _ => return None,
    };
    Some(Dtype {
        kind,
        size,
        big_endian,
    })
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Refuses a zero-sized dimension; returns the element count (checked).
fn element_count(h: &Header, name: &str) -> Result<usize> {
    if h.shape.contains(&0) {
        return Err(bad(
            name,
            format!("zero-sized dimension in shape {}", shape_text(&h.shape)),
        ));
    }
    h.shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(name, format!("shape {} overflows", shape_text(&h.shape))))
}

/// Reads the `count` elements of `dt` that follow the header, converting each with `conv`
/// (given its index in file order), and checks that exactly that much data follows.
fn read_values<T>(
    r: &mut impl Read,
    h: &Header,
    dt: Dtype,
    name: &str,
    avail: Avail,
    mut conv: impl FnMut(usize, &[u8]) -> Result<T>,
) -> Result<Vec<T>> {
    let count = element_count(h, name)?;
    let claim = || format!("shape {} of '{}'", shape_text(&h.shape), h.descr);
    let bytes = count
        .checked_mul(dt.size)
        .ok_or_else(|| bad(name, format!("{} overflows", claim())))?;
    if let Avail::Exact(total) = avail {
        let have = total.saturating_sub(h.offset);
        if have != bytes as u64 {
            return Err(bad(
                name,
                format!(
                    "header claims {} = {bytes} bytes of data but the file holds {have}",
                    claim()
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(match avail {
        Avail::Exact(_) => count,
        Avail::Stream => count.min(CHUNK),
    });
    let mut buf = vec![0u8; CHUNK.min(bytes)];
    let mut done = 0;
    while done < bytes {
        let want = (bytes - done).min(buf.len());
        let got = read_up_to(r, &mut buf[..want])
            .map_err(|e| bad(name, format!("read failed: {}", one_line(e))))?;
        if got < want {
            return Err(bad(
                name,
                format!(
                    "truncated: header claims {} = {bytes} bytes of data, found {}",
                    claim(),
                    done + got
                ),
            ));
        }
        for item in buf[..want].chunks_exact(dt.size) {
            out.push(conv(out.len(), item)?);
        }
        done += want;
    }
    let mut extra = [0u8; 1];
    match read_up_to(r, &mut extra) {
        Ok(0) => Ok(out),
        Ok(_) => Err(bad(
            name,
            format!("trailing data after the {bytes} bytes the header claims"),
        )),
        Err(e) => Err(bad(name, format!("read failed: {}", one_line(e)))),
    }
}

/// The `N` bytes of `b` in little-endian order.
fn le<const N: usize>(b: &[u8], big_endian: bool) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    if big_endian {
        a.reverse();
    }
    a
}

fn float_value(dt: Dtype, b: &[u8]) -> f32 {
    match dt.size {
        2 => half::f16::from_le_bytes(le(b, dt.big_endian)).to_f32(),
        4 => f32::from_le_bytes(le(b, dt.big_endian)),
        _ => f64::from_le_bytes(le(b, dt.big_endian)) as f32,
    }
}

fn int_value(dt: Dtype, b: &[u8]) -> i128 {
    let e = dt.big_endian;
    match (dt.kind, dt.size) {
        (Kind::Unsigned, 1) => i128::from(b[0]),
        (Kind::Unsigned, 2) => i128::from(u16::from_le_bytes(le(b, e))),
        (Kind::Unsigned, 4) => i128::from(u32::from_le_bytes(le(b, e))),
        (Kind::Unsigned, _) => i128::from(u64::from_le_bytes(le(b, e))),
        (_, 1) => i128::from(b[0] as i8),
        (_, 2) => i128::from(i16::from_le_bytes(le(b, e))),
        (_, 4) => i128::from(i32::from_le_bytes(le(b, e))),
        (_, _) => i128::from(i64::from_le_bytes(le(b, e))),
    }
}

/// Reorders a Fortran-ordered array (first index fastest) into C order (last index fastest).
fn fortran_to_c<T: Copy>(values: &[T], shape: &[usize]) -> Vec<T> {
    let rank = shape.len();
    let mut stride = vec![1usize; rank];
    for k in 1..rank {
        stride[k] = stride[k - 1] * shape[k - 1];
    }
    let mut index = vec![0usize; rank];
    let mut at = 0usize;
    let mut out = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        out.push(values[at]);
        for k in (0..rank).rev() {
            index[k] += 1;
            at += stride[k];
            if index[k] < shape[k] {
                break;
            }
            at -= stride[k] * shape[k];
            index[k] = 0;
        }
    }
    out
}

/// Rewrites each image of `pixels` from `(H, W, 3)` to `(3, H, W)` in place.
fn hwc_to_chw(pixels: &mut [u8], hw: usize) {
    let mut scratch = vec![0u8; 3 * hw];
    for image in pixels.chunks_exact_mut(3 * hw) {
        scratch.copy_from_slice(image);
        for (p, rgb) in scratch.chunks_exact(3).enumerate() {
            for (c, &v) in rgb.iter().enumerate() {
                image[c * hw + p] = v;
            }
        }
    }
}

/// `(N, H, W)` or `(N, H, W, C)` as `(n, channels, height, width)`.
fn image_shape(shape: &[usize], name: &str) -> Result<(usize, usize, usize, usize)> {
    let text = shape_text(shape);
    match *shape {
        [n, h, w] => Ok((n, 1, h, w)),
        [n, h, w, c] if c == 1 || c == 3 => Ok((n, c, h, w)),
        [_, c, _, _] if c == 1 || c == 3 => Err(bad(
            name,
            format!(
                "images of shape {text} look channels-first (N, C, H, W); save them channels-last \
                 (N, H, W, C), e.g. x.transpose(0, 2, 3, 1)"
            ),
        )),
        [_, _, _, 4] => Err(bad(
            name,
            format!("images of shape {text} have 4 channels (RGBA?); only 1 or 3 are supported: drop alpha with x[..., :3]"),
        )),
        [_, _, _, c] => Err(bad(
            name,
            format!("images of shape {text} have {c} channels; only 1 (grey) or 3 (RGB) are supported"),
        )),
        _ => Err(bad(
            name,
            format!("images must have shape (N, H, W) or (N, H, W, C), found {text}"),
        )),
    }
}

fn decode_images(r: &mut impl Read, h: &Header, name: &str, avail: Avail) -> Result<RawImages> {
    let dt = match parse_descr(&h.descr) {
        Some(
            dt @ Dtype {
                kind: Kind::Unsigned,
                size: 1,
                ..
            },
        ) => dt,
        _ => {
            return Err(bad(
                name,
                format!(
                    "images must be uint8 ('|u1'), found '{}' (convert e.g. with \
                     (x * 255).round().astype(np.uint8))",
                    h.descr
                ),
            ))
        }
    };
    let (n, channels, height, width) = image_shape(&h.shape, name)?;
    let mut pixels = read_values(r, h, dt, name, avail, |_, b| Ok(b[0]))?;
    if h.fortran {
        pixels = fortran_to_c(&pixels, &h.shape);
    }
    if channels == 3 {
        hwc_to_chw(&mut pixels, height * width);
    }
    let images = RawImages {
        pixels,
        n,
        channels,
        height,
        width,
        labels: None,
        classes: Vec::new(),
    };
    images.check().map_err(|e| in_file(name, e))?;
    Ok(images)
}

fn decode_rows(r: &mut impl Read, h: &Header, name: &str, avail: Avail) -> Result<RealRows> {
    let dt = match parse_descr(&h.descr) {
        Some(
            dt @ Dtype {
                kind: Kind::Float, ..
            },
        ) => dt,
        _ => {
            return Err(bad(
                name,
                format!(
                    "rows must be floating point ('<f4' float32, or '<f2'/'<f8'), found '{}'",
                    h.descr
                ),
            ))
        }
    };
    let [n, dim] = h.shape[..] else {
        return Err(bad(
            name,
            format!(
                "rows must have shape (N, D), found {} (reshape 1-D data with x.reshape(-1, 1))",
                shape_text(&h.shape)
            ),
        ));
    };
    let mut values = read_values(r, h, dt, name, avail, |_, b| Ok(float_value(dt, b)))?;
    if h.fortran {
        values = fortran_to_c(&values, &h.shape);
    }
    let rows = RealRows {
        values,
        n,
        dim,
        labels: None,
    };
    rows.check().map_err(|e| in_file(name, e))?;
    Ok(rows)
}

fn decode_labels(r: &mut impl Read, h: &Header, name: &str, avail: Avail) -> Result<Vec<u32>> {
    let dt = match parse_descr(&h.descr) {
        Some(
            dt @ Dtype {
                kind: Kind::Unsigned | Kind::Signed,
                ..
            },
        ) => dt,
        _ => {
            return Err(bad(
                name,
                format!(
                    "labels must be integers ('<i8', '|u1', ...), found '{}'",
                    h.descr
                ),
            ))
        }
    };
    if h.shape.len() != 1 {
        return Err(bad(
            name,
            format!(
                "labels must have shape (N,), found {} (flatten with y.ravel())",
                shape_text(&h.shape)
            ),
        ));
    }
    read_values(r, h, dt, name, avail, |i, b| {
        let v = int_value(dt, b);
        u32::try_from(v).map_err(|_| {
            let what = if v < 0 {
                "is negative"
            } else {
                "does not fit in 32 bits"
            };
            bad(name, format!("label {v} at index {i} {what}"))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// .npz
// ---------------------------------------------------------------------------------------------

/// Picks the data and label arrays among `keys` (sorted), as the module documentation says.
fn choose_keys(keys: &[String]) -> std::result::Result<(String, Option<String>), String> {
    let has = |k: &str| keys.iter().any(|x| x == k);
    let data = if has(NPZ_DATA_KEY) {
        NPZ_DATA_KEY.to_string()
    } else if has("arr_0") {
        "arr_0".to_string()
    } else if let [only] = keys {
        only.clone()
    } else if keys.is_empty() {
        return Err("the archive holds no .npy arrays".to_string());
    } else {
        return Err(format!(
            "no data array '{NPZ_DATA_KEY}' (nor 'arr_0') among the arrays {} \
             (save with np.savez(path, x=data, y=labels))",
            keys.join(", ")
        ));
    };
    let labels = if has(NPZ_LABEL_KEY) && data != NPZ_LABEL_KEY {
        Some(NPZ_LABEL_KEY.to_string())
    } else if data == "arr_0" && has("arr_1") {
        Some("arr_1".to_string())
    } else {
        None
    };
    Ok((data, labels))
}

fn npz_from<R: Read + Seek>(reader: R, name: &str) -> Result<NpyData> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        bad(
            name,
            format!("not a readable .npz (zip) archive: {}", one_line(e)),
        )
    })?;
    let mut keys: Vec<String> = zip
        .file_names()
        .filter_map(|f| f.ok()?.strip_suffix(".npy").map(str::to_string))
        .collect();
    keys.sort();
    let (data_key, label_key) = choose_keys(&keys).map_err(|m| bad(name, m))?;
    let entry = format!("{name}: array '{data_key}'");
    let mut data = any_from(
        &mut open_entry(&mut zip, &entry, &data_key)?,
        &entry,
        Avail::Stream,
    )?;
    let Some(label_key) = label_key else {
        return Ok(data);
    };
    let entry = format!("{name}: array '{label_key}'");
    let labels = labels_from(
        &mut open_entry(&mut zip, &entry, &label_key)?,
        &entry,
        Avail::Stream,
    )?;
    let (n, items, slot) = match &mut data {
        NpyData::Images(x) => (x.n, "images", &mut x.labels),
        NpyData::Rows(x) => (x.n, "rows", &mut x.labels),
    };
    if labels.len() != n {
        return Err(bad(
            name,
            format!(
                "array '{label_key}' holds {} labels but array '{data_key}' holds {n} {items}",
                labels.len()
            ),
        ));
    }
    *slot = Some(labels);
    Ok(data)
}

/// Opens the `.npy` entry of array `key`; `entry` is its name for messages.
fn open_entry<'a, R: Read + Seek>(
    zip: &'a mut zip::ZipArchive<R>,
    entry: &str,
    key: &str,
) -> Result<zip::read::ZipFile<'a, R>> {
    zip.by_name(&format!("{key}.npy"))
        .map_err(|e| bad(entry, format!("cannot open: {}", one_line(e))))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    // Written by NumPy 2.4 (`np.save` / `np.savez[_compressed]` into io.BytesIO, hex-dumped):
    // np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    const NUMPY_U8_2X2X3: &str = "\
934e554d5059010076007b276465736372273a20277c7531272c2027666f727472616e5f6f72646572273a2046616c73\
652c20277368617065273a2028322c20322c2033292c207d202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a000102030405060708090a0b";
    // np.asfortranarray(np.array([[0.5, -1], [2, 3.25], [4, 5]], dtype=np.float32))
    const NUMPY_F4_FORTRAN_3X2: &str = "\
934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2054727565\
2c20277368617065273a2028332c2032292c207d20202020202020202020202020202020202020202020202020202020\
202020202020202020202020202020202020202020202020202020202020200a0000003f0000004000008040000080bf\
000050400000a040";
    // np.savez_compressed(f, x=np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
    //                     y=np.array([1, 0], dtype=np.int64))  (zip64 entries, deflated)
    const NUMPY_NPZ_COMPRESSED_XY: &str = "\
504b03042d000000080000002100853a8f53ffffffffffffffff05001400782e6e707901001000980000000000000060\
000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a05e536aa8aea3a09e965f54529498179f5f94920a\
12774bcc294e058a17672416a402f91a463a0a1064aca9a350ab4006e06260646266616563e7e0e4e2e6e1e5e3171014\
12161115130700504b03042d00000008000000210071fb39abffffffffffffffff05001400792e6e7079010010009000\
00000000000048000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9369a1aea3a09e965f545294\
98179f5f94920a12774bcc294e058a17672416a402f91a463a9a3a0ab50a14002e4606540000504b01022d032d000000\
080000002100853a8f536000000098000000050000000000000000000000800100000000782e6e7079504b01022d032d\
00000008000000210071fb39ab4800000090000000050000000000000000000000800197000000792e6e7079504b0506\
000000000200020066000000160100000000";
    // np.savez(f, x, y) with the same x and y: positional arrays arr_0 and arr_1, stored.
    const NUMPY_NPZ_POSITIONAL: &str = "\
504b03042d000000000000002100853a8f53ffffffffffffffff090014006172725f302e6e7079010010009800000000\
0000009800000000000000934e554d5059010076007b276465736372273a20277c7531272c2027666f727472616e5f6f\
72646572273a2046616c73652c20277368617065273a2028322c20322c20322c2033292c207d20202020202020202020\
2020202020202020202020202020202020202020202020202020202020202020202020202020202020200a0001020304\
05060708090a0b0c0d0e0f1011121314151617504b03042d00000000000000210071fb39abffffffffffffffff090014\
006172725f312e6e70790100100090000000000000009000000000000000934e554d5059010076007b27646573637227\
3a20273c6938272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028322c292c20\
7d2020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020\
202020202020202020202020200a01000000000000000000000000000000504b01022d032d000000000000002100853a\
8f5398000000980000000900000000000000000000008001000000006172725f302e6e7079504b01022d032d00000000\
000000210071fb39ab90000000900000000900000000000000000000008001d30000006172725f312e6e7079504b0506\
00000000020002006e0000009e0100000000";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    fn assert_err<T: std::fmt::Debug>(r: Result<T>, want: &str) {
        let e = err(r);
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
        assert!(!e.contains('\n'), "{e:?} is not one line");
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A zip of `(name, bytes)` entries, deflated or stored.
    fn zip_of(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            w.start_file(*name, options).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// Images `(n, h, w, c)` whose value at (i, y, x, c) is `i * 50 + y * 20 + x * 5 + c`.
    fn hwc_values(n: usize, h: usize, w: usize, c: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..n {
            for y in 0..h {
                for x in 0..w {
                    for k in 0..c {
                        v.push((i * 50 + y * 20 + x * 5 + k) as u8);
                    }
                }
            }
        }
        v
    }

    #[test]
    fn reads_numpy_written_images_and_encodes_like_numpy() {
        let bytes = hex(NUMPY_U8_2X2X3);
        let data: Vec<u8> = (0..12).collect();
        assert_eq!(encode_npy("|u1", &[2, 2, 3], false, &data), bytes);
        let x = parse_npy_images_bytes(&bytes).unwrap();
        assert_eq!((x.n, x.channels, x.height, x.width), (2, 1, 2, 3));
        assert_eq!(x.pixel(1, 0, 1, 2), 11);
        assert_eq!(x.pixel(0, 0, 1, 0), 3);
        assert!(x.labels.is_none() && x.classes.is_empty());
        assert_eq!(parse_npy_bytes(&bytes).unwrap(), NpyData::Images(x));
    }

    #[test]
    fn reads_numpy_written_fortran_rows() {
        let rows = parse_npy_rows_bytes(&hex(NUMPY_F4_FORTRAN_3X2)).unwrap();
        assert_eq!((rows.n, rows.dim), (3, 2));
        assert_eq!(rows.values, vec![0.5, -1.0, 2.0, 3.25, 4.0, 5.0]);
    }

    #[test]
    fn reads_numpy_written_npz_compressed_and_positional() {
        for fixture in [NUMPY_NPZ_COMPRESSED_XY, NUMPY_NPZ_POSITIONAL] {
            let NpyData::Images(x) = parse_npz_bytes(&hex(fixture)).unwrap() else {
                panic!("not images");
            };
            assert_eq!((x.n, x.channels, x.height, x.width), (2, 3, 2, 2));
            assert_eq!(x.labels, Some(vec![1, 0]));
            // x[i, y, x, c] = ((i * 2 + y) * 2 + x) * 3 + c
            for (i, y, xx, c) in [(0, 0, 0, 0), (0, 1, 0, 2), (1, 0, 1, 1), (1, 1, 1, 2)] {
                assert_eq!(
                    x.pixel(i, c, y, xx) as usize,
                    ((i * 2 + y) * 2 + xx) * 3 + c
                );
            }
        }
    }

    #[test]
    fn grey_images_nhw_and_nhw1() {
        let v = hwc_values(2, 3, 4, 1);
        for shape in [&[2, 3, 4][..], &[2, 3, 4, 1]] {
            let x = parse_npy_images_bytes(&encode_npy("|u1", shape, false, &v)).unwrap();
            assert_eq!((x.n, x.channels, x.height, x.width), (2, 1, 3, 4));
            assert_eq!(x.pixels, v);
            assert_eq!(x.pixel(1, 0, 2, 3), 50 + 40 + 15);
        }
    }

    #[test]
    fn rgb_images_become_planar() {
        let v = hwc_values(2, 3, 4, 3);
        let x = parse_npy_images_bytes(&encode_npy("|u1", &[2, 3, 4, 3], false, &v)).unwrap();
        assert_eq!((x.n, x.channels, x.height, x.width), (2, 3, 3, 4));
        for i in 0..2 {
            for c in 0..3 {
                for y in 0..3 {
                    for xx in 0..4 {
                        let want = (i * 50 + y * 20 + xx * 5 + c) as u8;
                        assert_eq!(x.pixel(i, c, y, xx), want, "({i}, {c}, {y}, {xx})");
                    }
                }
            }
        }
    }

    #[test]
    fn fortran_ordered_rgb_images() {
        let (n, h, w, c) = (2, 3, 4, 3);
        let c_order = hwc_values(n, h, w, c);
        // Fortran order: the first index varies fastest.
        let mut f_order = vec![0u8; c_order.len()];
        for i in 0..n {
            for y in 0..h {
                for x in 0..w {
                    for k in 0..c {
                        let f = i + n * (y + h * (x + w * k));
                        f_order[f] = c_order[((i * h + y) * w + x) * c + k];
                    }
                }
            }
        }
        let from_f = parse_npy_images_bytes(&encode_npy("|u1", &[n, h, w, c], true, &f_order));
        let from_c = parse_npy_images_bytes(&encode_npy("|u1", &[n, h, w, c], false, &c_order));
        assert_eq!(from_f.unwrap(), from_c.unwrap());
    }

    #[test]
    fn rows_in_every_float_type_and_byte_order() {
        let want = vec![0.5f32, -1.0, 2.0, 3.25, 4.0, 1e-3];
        let f4 = f32_bytes(&want);
        let f4_be: Vec<u8> = want.iter().flat_map(|v| v.to_be_bytes()).collect();
        let f8: Vec<u8> = want
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect();
        let f8_be: Vec<u8> = want
            .iter()
            .flat_map(|&v| f64::from(v).to_be_bytes())
            .collect();
        let f2: Vec<u8> = [0.5f32, -1.0, 2.0, 3.25, 4.0, 0.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        for (descr, data) in [("<f4", &f4), (">f4", &f4_be), ("<f8", &f8), (">f8", &f8_be)] {
            let rows = parse_npy_rows_bytes(&encode_npy(descr, &[3, 2], false, data)).unwrap();
            assert_eq!((rows.n, rows.dim), (3, 2), "{descr}");
            assert_eq!(rows.values, want, "{descr}");
            assert_eq!(rows.row(1), &[2.0, 3.25]);
        }
        let rows = parse_npy_rows_bytes(&encode_npy("<f2", &[2, 3], false, &f2)).unwrap();
        assert_eq!(rows.values, vec![0.5, -1.0, 2.0, 3.25, 4.0, 0.0]);
        let NpyData::Rows(r) = parse_npy_bytes(&encode_npy("<f8", &[3, 2], false, &f8)).unwrap()
        else {
            panic!("not rows");
        };
        assert_eq!(r.values, want);
    }

    #[test]
    fn non_finite_rows_are_refused_naming_the_row() {
        let mut v = vec![0.0f32; 8];
        v[5] = f32::INFINITY;
        let bytes = encode_npy("<f4", &[4, 2], false, &f32_bytes(&v));
        assert_err(
            parse_npy_rows_bytes(&bytes),
            "<memory>: row 2 holds a non-finite value (inf) in column 1",
        );
        // A float64 beyond the float32 range becomes infinite and is refused as well.
        let big: Vec<u8> = [1.0f64, 1e300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_err(
            parse_npy_rows_bytes(&encode_npy("<f8", &[1, 2], false, &big)),
            "row 0 holds a non-finite value (inf) in column 1",
        );
        let nan = f32_bytes(&[f32::NAN]);
        assert_err(
            parse_npy_rows_bytes(&encode_npy("<f4", &[1, 1], false, &nan)),
            "row 0 holds a non-finite value (NaN)",
        );
    }

    #[test]
    fn labels_of_every_integer_type() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("|u1", vec![3, 0, 2]),
            ("|i1", vec![3, 0, 2]),
            (
                "<i4",
                [3i32, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                ">i4",
                [3i32, 0, 2].iter().flat_map(|v| v.to_be_bytes()).collect(),
            ),
            (
                "<i8",
                [3i64, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "<u2",
                [3u16, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "<u4",
                [3u32, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                ">u8",
                [3u64, 0, 2].iter().flat_map(|v| v.to_be_bytes()).collect(),
            ),
        ];
        for (descr, data) in cases {
            let labels = parse_npy_labels_bytes(&encode_npy(descr, &[3], false, &data));
            assert_eq!(labels.unwrap(), vec![3, 0, 2], "{descr}");
        }
    }

    #[test]
    fn bad_labels_are_refused() {
        let neg: Vec<u8> = [0i64, 1, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_err(
            parse_npy_labels_bytes(&encode_npy("<i8", &[3], false, &neg)),
            "<memory>: label -1 at index 2 is negative",
        );
        let big: Vec<u8> = [1u64 << 40].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_err(
            parse_npy_labels_bytes(&encode_npy("<u8", &[1], false, &big)),
            "label 1099511627776 at index 0 does not fit in 32 bits",
        );
        assert_err(
            parse_npy_labels_bytes(&encode_npy("<f4", &[1], false, &[0; 4])),
            "labels must be integers ('<i8', '|u1', ...), found '<f4'",
        );
        assert_err(
            parse_npy_labels_bytes(&encode_npy("|u1", &[2, 1], false, &[0; 2])),
            "labels must have shape (N,), found (2, 1)",
        );
        assert_err(
            parse_npy_labels_bytes(&encode_npy("|u1", &[0], false, &[])),
            "zero-sized dimension in shape (0,)",
        );
    }

    #[test]
    fn wrong_types_ranks_and_channels_are_refused() {
        type Parse = fn(&[u8]) -> String;
        let cases: Vec<(Vec<u8>, Parse, &str)> = vec![
            (
                encode_npy("<f4", &[1, 2, 2], false, &[0; 16]),
                |b| err(parse_npy_images_bytes(b)),
                "images must be uint8 ('|u1'), found '<f4'",
            ),
            (
                encode_npy("|u1", &[2, 3], false, &[0; 6]),
                |b| err(parse_npy_images_bytes(b)),
                "images must have shape (N, H, W) or (N, H, W, C), found (2, 3)",
            ),
            (
                encode_npy("|u1", &[2, 3, 4, 5], false, &[0; 120]),
                |b| err(parse_npy_images_bytes(b)),
                "look channels-first (N, C, H, W)",
            ),
            (
                encode_npy("|u1", &[1, 2, 2, 4], false, &[0; 16]),
                |b| err(parse_npy_images_bytes(b)),
                "have 4 channels (RGBA?)",
            ),
            (
                encode_npy("|u1", &[1, 2, 2, 2], false, &[0; 8]),
                |b| err(parse_npy_images_bytes(b)),
                "have 2 channels; only 1 (grey) or 3 (RGB)",
            ),
            (
                encode_npy("|u1", &[0, 5, 5], false, &[]),
                |b| err(parse_npy_images_bytes(b)),
                "zero-sized dimension in shape (0, 5, 5)",
            ),
            (
                encode_npy("|u1", &[2, 2], false, &[0; 4]),
                |b| err(parse_npy_rows_bytes(b)),
                "rows must be floating point ('<f4' float32, or '<f2'/'<f8'), found '|u1'",
            ),
            (
                encode_npy("<f4", &[3], false, &[0; 12]),
                |b| err(parse_npy_rows_bytes(b)),
                "rows must have shape (N, D), found (3,)",
            ),
            (
                encode_npy("<i4", &[2, 2], false, &[0; 16]),
                |b| err(parse_npy_bytes(b)),
                "element type '<i4' is neither uint8 ('|u1', images) nor floating point",
            ),
            (
                encode_npy("|b1", &[2, 2], false, &[0; 4]),
                |b| err(parse_npy_bytes(b)),
                "element type '|b1' is neither",
            ),
            (
                encode_npy("<U3", &[2], false, &[0; 24]),
                |b| err(parse_npy_labels_bytes(b)),
                "labels must be integers",
            ),
        ];
        for (bytes, parse, want) in cases {
            let e = parse(&bytes);
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
            assert!(e.starts_with("data: <memory>: "), "{e}");
        }
    }

    #[test]
    fn sizes_that_disagree_with_the_header_are_refused() {
        let good = encode_npy("|u1", &[2, 2, 3], false, &[7; 12]);
        assert_err(
            parse_npy_images_bytes(&good[..good.len() - 1]),
            "header claims shape (2, 2, 3) of '|u1' = 12 bytes of data but the file holds 11",
        );
        let mut long = good.clone();
        long.push(0);
        assert_err(parse_npy_images_bytes(&long), "but the file holds 13");
        assert_err(
            parse_npy_images_bytes(&good[..8]),
            "shorter than the NPY header",
        );
        assert_err(
            parse_npy_images_bytes(&good[..100]),
            "truncated: the NPY header claims 118 bytes",
        );
        // A lying header: 2^40 images of 2^10 x 2^10 with 4 bytes of data (nothing is
        // allocated for them), then one whose size overflows.
        let huge = encode_npy("|u1", &[1 << 40, 1 << 10, 1 << 10], false, &[1, 2, 3, 4]);
        assert_err(
            parse_npy_images_bytes(&huge),
            "of data but the file holds 4",
        );
        let overflow = encode_npy("|u1", &[1 << 40, 1 << 40, 1 << 40], false, &[]);
        assert_err(
            parse_npy_images_bytes(&overflow),
            "shape (1099511627776, 1099511627776, 1099511627776) overflows",
        );
        let wide = encode_npy("<f8", &[1 << 32, 1 << 30], false, &[]);
        assert_err(parse_npy_rows_bytes(&wide), "of '<f8' overflows");
    }

    /// `good` with its header text replaced by `text` (length field updated).
    fn with_header(text: &str) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&[0; 4]);
        out
    }

    /// Header texts NumPy would refuse, with a part of the message each gets.
    const BAD_HEADERS: [(&str, &str); 17] = [
        (
            "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (4,), }",
            "structured element types",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), 'x': 1}",
            "unexpected key \"x\"",
        ),
        (
            "{'descr': '|u1', 'shape': (1, 2, 2), }",
            "missing key 'fortran_order'",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, }",
            "missing key 'shape'",
        ),
        (
            "{'fortran_order': False, 'shape': (1, 2, 2), }",
            "missing key 'descr'",
        ),
        (
            "{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (4,)}",
            "key 'descr' twice",
        ),
        (
            "{'descr': '|u1', 'fortran_order': 0, 'shape': (1, 2, 2), }",
            "expected True or False",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1, -2, 2), }",
            "non-negative integer",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': 4, }",
            "expected a tuple",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999999999,)}",
            "does not fit in 64 bits",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2 2), }",
            "expected ')'",
        ),
        (
            "{'descr': '|u1, 'fortran_order': False, 'shape': (1, 2, 2), }",
            "expected '}' at \"fortran_order",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2)} extra",
            "unexpected text after the dictionary",
        ),
        (
            "{'descr': 'a\\b', 'fortran_order': False, 'shape': (4,)}",
            "escapes",
        ),
        ("{'descr': '|u1", "unterminated string"),
        ("['descr', '|u1']", "expected '{'"),
        ("", "expected '{' at end of header"),
    ];

    #[test]
    fn bad_headers_are_refused() {
        let ok = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), }\n";
        parse_npy_images_bytes(&with_header(ok)).unwrap();
        // Other spellings NumPy reads: double quotes, other key order, lists, Python 2 longs.
        let alt = "{\"shape\": [1L, 2L, 2L], \"fortran_order\": True, \"descr\": \"u1\"}";
        parse_npy_images_bytes(&with_header(alt)).unwrap();
        for (text, want) in BAD_HEADERS {
            let e = err(parse_npy_images_bytes(&with_header(text)));
            assert!(
                e.contains("invalid NPY header") && e.contains(want),
                "{text}: {e}"
            );
        }
        let many = format!(
            "{{'descr': '|u1', 'fortran_order': False, 'shape': ({}), }}",
            "1, ".repeat(40)
        );
        assert_err(
            parse_npy_images_bytes(&with_header(&many)),
            "more than 32 dimensions",
        );
    }

    #[test]
    fn bad_magic_versions_and_header_lengths_are_refused() {
        let good = encode_npy("|u1", &[1, 2, 2], false, &[0; 4]);
        let mut b = good.clone();
        b[1] = b'X';
        assert_err(parse_npy_images_bytes(&b), "not an NPY file: bad magic");
        let zip = hex(NUMPY_NPZ_POSITIONAL);
        assert_err(
            parse_npy_bytes(&zip),
            "this is a zip archive: read it as .npz",
        );
        let mut b = good.clone();
        b[6] = 4;
        assert_err(
            parse_npy_images_bytes(&b),
            "unsupported NPY format version 4.0",
        );
        // Version 2.0 with a 4 GiB header length: refused before allocating.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[2, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_err(
            parse_npy_images_bytes(&b),
            "header of 4294967295 bytes is longer than",
        );
        // Version 3.0 (UTF-8 header) with a header that fits; and one that is not UTF-8.
        let mut b = good.clone();
        b[6] = 3;
        let text = &good[10..good.len() - 4];
        let mut v3 = MAGIC.to_vec();
        v3.extend_from_slice(&[3, 0]);
        v3.extend_from_slice(&(text.len() as u32).to_le_bytes());
        v3.extend_from_slice(text);
        v3.extend_from_slice(&[0; 4]);
        parse_npy_images_bytes(&v3).unwrap();
        let mut bad_utf8 = v3.clone();
        bad_utf8[13] = 0xff;
        assert_err(parse_npy_images_bytes(&bad_utf8), "NPY header is not UTF-8");
    }

    #[test]
    fn files_are_read_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("x.npy");
        let rows = dir.path().join("rows.npy");
        let labels = dir.path().join("y.npy");
        std::fs::write(
            &images,
            encode_npy("|u1", &[2, 2, 2, 3], false, &hwc_values(2, 2, 2, 3)),
        )
        .unwrap();
        std::fs::write(
            &rows,
            encode_npy("<f4", &[2, 1], false, &f32_bytes(&[1.0, 2.0])),
        )
        .unwrap();
        std::fs::write(&labels, encode_npy("|u1", &[2], false, &[1, 1])).unwrap();
        let x = read_npy_images(&images).unwrap();
        assert_eq!(x.pixel(1, 2, 1, 0), 50 + 20 + 2);
        assert_eq!(read_npy(&images).unwrap(), NpyData::Images(x.clone()));
        assert_eq!(read_numpy(&images).unwrap(), NpyData::Images(x));
        assert_eq!(read_npy_rows(&rows).unwrap().values, vec![1.0, 2.0]);
        assert_eq!(read_npy_labels(&labels).unwrap(), vec![1, 1]);
        let e = err(read_npy_rows(&images));
        assert!(
            e.contains(&format!(
                "{}: rows must be floating point",
                images.display()
            )),
            "{e}"
        );
        let e = err(read_npy_images(&dir.path().join("missing.npy")));
        assert!(e.contains("missing.npy"), "{e}");
        let npz = dir.path().join("d.npz");
        std::fs::write(&npz, hex(NUMPY_NPZ_COMPRESSED_XY)).unwrap();
        let NpyData::Images(x) = read_numpy(&npz).unwrap() else {
            panic!("not images")
        };
        assert_eq!(read_npz(&npz).unwrap(), NpyData::Images(x));
        std::fs::write(&npz, b"PK not really").unwrap();
        let e = err(read_npz(&npz));
        assert!(
            e.contains(&format!(
                "{}: not a readable .npz (zip) archive",
                npz.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn npz_keys_labels_and_entry_errors() {
        let x = encode_npy("|u1", &[2, 2, 2], false, &[5; 8]);
        let y = encode_npy(
            "<i8",
            &[2],
            false,
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let y3 = encode_npy("|u1", &[3], false, &[0, 1, 2]);
        let rows = encode_npy("<f4", &[2, 1], false, &f32_bytes(&[1.0, 2.0]));
        for deflate in [false, true] {
            let z = zip_of(
                &[("x.npy", &x), ("y.npy", &y), ("notes.txt", b"hi")],
                deflate,
            );
            let NpyData::Images(got) = parse_npz_bytes(&z).unwrap() else {
                panic!()
            };
            assert_eq!(got.labels, Some(vec![1, 0]));
            let z = zip_of(&[("y.npy", &y), ("x.npy", &rows)], deflate);
            let NpyData::Rows(got) = parse_npz_bytes(&z).unwrap() else {
                panic!()
            };
            assert_eq!(
                (got.values.clone(), got.labels),
                (vec![1.0, 2.0], Some(vec![1, 0]))
            );
            // The only array, whatever its name, without labels.
            let z = zip_of(&[("images.npy", &x)], deflate);
            let NpyData::Images(got) = parse_npz_bytes(&z).unwrap() else {
                panic!()
            };
            assert_eq!((got.n, got.labels), (2, None));
        }
        let z = zip_of(&[("a.npy", &x), ("b.npy", &y)], true);
        assert_err(
            parse_npz_bytes(&z),
            "<memory>: no data array 'x' (nor 'arr_0') among the arrays a, b",
        );
        assert_err(
            parse_npz_bytes(&zip_of(&[("readme.txt", b"")], false)),
            "holds no .npy arrays",
        );
        let z = zip_of(&[("x.npy", &x), ("y.npy", &y3)], false);
        assert_err(
            parse_npz_bytes(&z),
            "array 'y' holds 3 labels but array 'x' holds 2 images",
        );
        let z = zip_of(&[("x.npy", &x), ("y.npy", &rows)], false);
        assert_err(
            parse_npz_bytes(&z),
            "<memory>: array 'y': labels must be integers",
        );
        let z = zip_of(&[("x.npy", &y)], false);
        assert_err(
            parse_npz_bytes(&z),
            "<memory>: array 'x': element type '<i8' is neither",
        );
        // Entries whose data is cut short or runs on (stream checks, not file lengths).
        for deflate in [false, true] {
            let z = zip_of(&[("x.npy", &x[..x.len() - 1])], deflate);
            assert_err(parse_npz_bytes(&z), "array 'x': truncated: header claims shape (2, 2, 2) of '|u1' = 8 bytes of data, found 7");
            let mut long = x.clone();
            long.push(9);
            let z = zip_of(&[("x.npy", &long)], deflate);
            assert_err(
                parse_npz_bytes(&z),
                "array 'x': trailing data after the 8 bytes",
            );
            let huge = encode_npy("|u1", &[1 << 40, 1 << 10, 1 << 10], false, &[1; 64]);
            let z = zip_of(&[("x.npy", &huge)], deflate);
            assert_err(parse_npz_bytes(&z), "array 'x': truncated");
        }
    }

    #[test]
    fn corrupt_npz_data_is_an_error() {
        // A flipped data byte in a stored entry fails the CRC check.
        let x = encode_npy("|u1", &[2, 2, 2], false, &[5; 8]);
        let mut z = zip_of(&[("x.npy", &x)], false);
        let at = z.windows(8).position(|w| w == [5; 8]).unwrap();
        z[at] = 6;
        let e = err(parse_npz_bytes(&z));
        assert!(
            e.contains("array 'x': read failed") || e.contains("checksum"),
            "{e}"
        );
    }

    /// No input makes the parsers panic: every prefix and every single-byte change of valid
    /// files is an `Ok` or an `Err`.
    #[test]
    fn truncations_and_byte_flips_never_panic() {
        let inputs = [
            hex(NUMPY_U8_2X2X3),
            hex(NUMPY_F4_FORTRAN_3X2),
            hex(NUMPY_NPZ_COMPRESSED_XY),
            hex(NUMPY_NPZ_POSITIONAL),
        ];
        for input in &inputs {
            let run = |b: &[u8]| {
                let _ = parse_npy_images_bytes(b);
                let _ = parse_npy_rows_bytes(b);
                let _ = parse_npy_labels_bytes(b);
                let _ = parse_npy_bytes(b);
                let _ = parse_npz_bytes(b);
            };
            for cut in 0..input.len() {
                run(&input[..cut]);
            }
            for at in 0..input.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut b = input.clone();
                    b[at] ^= flip;
                    run(&b);
                }
            }
        }
    }
}
