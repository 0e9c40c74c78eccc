//! A cache of decoded image folders ([`super::folder`]): decoding tens of thousands of small
//! PNG or JPEG files takes far longer than reading their pixels back, so the first load of a
//! folder writes the decoded set to a cache file and later loads read it.
//!
//! - **Where**: `<folder>/.gentrain-cache/decoded-<fit>.bin` (the folder reader ignores names
//!   starting with a dot, so the cache is never read as data), one file per [`Fit`] setting
//!   (`decoded-exact.bin`, `decoded-crop-HxW.bin`, `decoded-resize-HxW.bin`). When that folder
//!   cannot be written, `<temp>/gentrain-cache/<hash of the folder's canonical path>/` is used
//!   instead (`<temp>` is `std::env::temp_dir()`, `$TMPDIR` or `/tmp`); when neither can be
//!   written the set is decoded every time, with a warning.
//! - **Key**: a fingerprint of the source, stored whole in the file and compared byte for byte:
//!   the [`Fit`] setting and, for every image file in load order, its path relative to the
//!   folder, its size in bytes and its modification time (nanoseconds). Adding, removing,
//!   renaming, rewriting or touching a file, or another crop or resize, makes it differ: the
//!   images are decoded again and the cache file replaced.
//! - **Validation**: the file is checked like any input: a magic and version, a CRC-32 of
//!   everything before its last 4 bytes, sizes that must agree, and [`RawImages::check`]. A
//!   truncated, corrupt or unreadable cache file is ignored with a warning and rebuilt.
//! - **Clearing**: delete the `.gentrain-cache` folder (`rm -r DIR/.gentrain-cache`).
//!
//! Layout (integers little-endian): `b"GTFLDC01"`, `u64` key length, key, `u64` n, channels,
//! height, width, `u8` 1 with labels else 0, `u64` class count, each class name as `u64`
//! length + UTF-8 bytes, `n` `u32` labels when present, `n * channels * height * width` pixel
//! bytes (planar, as [`RawImages::pixels`]), `u32` CRC-32.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::folder::{check_fit, decode_listing, list_folder, Fit, Listing};
use super::raw::RawImages;
use crate::error::{Error, Result};

/// The name of the cache folder inside an image folder.
pub const CACHE_DIR: &str = ".gentrain-cache";

/// Magic and format version of a cache file.
const MAGIC: &[u8; 8] = b"GTFLDC01";

/// How a load used the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// The set was read from this cache file.
    Hit(PathBuf),
    /// The images were decoded and written to this cache file.
    Written(PathBuf),
    /// The images were decoded; no cache file could be written (why).
    Unwritable(String),
}

/// [`super::folder::load_image_folder`] through the cache: the set of `root` under `fit`,
/// read from a valid cache file with the same fingerprint, else decoded and cached.
///
/// # Errors
/// As [`super::folder::load_image_folder`]; a cache that cannot be read or written is never an
/// error (it is warned about).
pub fn load_image_folder_cached(root: &Path, fit: Fit) -> Result<(RawImages, CacheUse)> {
    check_fit(fit)?;
    let listing = list_folder(root)?;
    let key = fingerprint(root, &listing, fit);
    let name = cache_name(fit);
    let dirs = cache_dirs(root);
    for dir in &dirs {
        let path = dir.join(&name);
        match read_cache(&path, &key) {
            Ok(Some(images)) => {
                tracing::info!(
                    "{}: read the decoded images from {}",
                    root.display(),
                    path.display()
                );
                return Ok((images, CacheUse::Hit(path)));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "{}: ignoring the folder cache ({e}); decoding the images again",
                path.display()
            ),
        }
    }
    let images = decode_listing(root, listing, fit)?;
    let mut reasons = Vec::new();
    for dir in &dirs {
        match write_cache(dir, &name, &key, &images) {
            Ok(path) => return Ok((images, CacheUse::Written(path))),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    let why = reasons.join("; ");
    tracing::warn!(
        "{}: could not cache the decoded images: {why}",
        root.display()
    );
    Ok((images, CacheUse::Unwritable(why)))
}

/// The cache file name of `fit`.
pub fn cache_name(fit: Fit) -> String {
    match fit {
        Fit::Exact => "decoded-exact.bin".into(),
        Fit::CenterCrop(h, w) => format!("decoded-crop-{h}x{w}.bin"),
        Fit::Resize(h, w) => format!("decoded-resize-{h}x{w}.bin"),
    }
}

/// The cache folders to try, in order: `root/.gentrain-cache`, then one under the temporary
/// directory named by a 64-bit FNV-1a hash of `root`'s canonical path.
pub fn cache_dirs(root: &Path) -> Vec<PathBuf> {
    let real = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let hash = real
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
    vec![
        root.join(CACHE_DIR),
        std::env::temp_dir()
            .join("gentrain-cache")
            .join(format!("{hash:016x}")),
    ]
}

/// The fingerprint of the source: the fit, then per file its relative path, size and
/// modification time (nanoseconds since the epoch; `u64::MAX` pairs when unavailable). The
/// files are examined in parallel (many `stat` calls on a network file system), in order.
fn fingerprint(root: &Path, listing: &Listing, fit: Fit) -> Vec<u8> {
    let entries: Vec<Vec<u8>> = listing
        .files
        .par_iter()
        .map(|f| file_key(root, f))
        .collect();
    let mut key = format!("{fit:?}\n").into_bytes();
    for e in entries {
        key.extend(e);
    }
    key
}

/// The fingerprint bytes of one file: its relative path (length-prefixed), size and time.
fn file_key(root: &Path, file: &Path) -> Vec<u8> {
    let rel = file.strip_prefix(root).unwrap_or(file);
    let rel = rel.as_os_str().as_encoded_bytes();
    let mut key = Vec::with_capacity(rel.len() + 28);
    key.extend((rel.len() as u64).to_le_bytes());
    key.extend(rel);
    let meta = std::fs::metadata(file).ok();
    let size = meta.as_ref().map_or(u64::MAX, |m| m.len());
    let time = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or((u64::MAX, u32::MAX), |d| (d.as_secs(), d.subsec_nanos()));
    key.extend(size.to_le_bytes());
    key.extend(time.0.to_le_bytes());
    key.extend(time.1.to_le_bytes());
    key
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = flate2::Crc::new();
    for p in parts {
        crc.update(p);
    }
    crc.sum()
}

/// Everything of a cache file before the pixels.
fn header(key: &[u8], images: &RawImages) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    let u64s = |h: &mut Vec<u8>, v: usize| h.extend((v as u64).to_le_bytes());
    u64s(&mut h, key.len());
    h.extend(key);
    for v in [images.n, images.channels, images.height, images.width] {
        u64s(&mut h, v);
    }
    h.push(u8::from(images.labels.is_some()));
    u64s(&mut h, images.classes.len());
    for c in &images.classes {
        u64s(&mut h, c.len());
        h.extend(c.as_bytes());
    }
    for l in images.labels.iter().flatten() {
        h.extend(l.to_le_bytes());
    }
    h
}

/// Writes the cache file `dir/name` through a temporary file renamed into place.
fn write_cache(dir: &Path, name: &str, key: &[u8], images: &RawImages) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let head = header(key, images);
    let crc = crc32(&[&head, &images.pixels]);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&head)?;
        f.write_all(&images.pixels)?;
        f.write_all(&crc.to_le_bytes())?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&path, e)
    })?;
    Ok(path)
}

/// A reader over the bytes of a cache file that fails on truncation.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| Error::Data("truncated".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<usize> {
        let b: [u8; 8] = self.take(8)?.try_into().unwrap_or_default();
        usize::try_from(u64::from_le_bytes(b)).map_err(|_| Error::Data("size overflow".into()))
    }
}

/// The set in the cache file `path` if it holds `key`: `Ok(None)` when there is no file or it
/// holds another fingerprint, an error when it cannot be read or is invalid.
fn read_cache(path: &Path, key: &[u8]) -> Result<Option<RawImages>> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    if bytes.len() < MAGIC.len() + 4 || !bytes.starts_with(MAGIC) {
        return Err(Error::Data(
            "not a gentrain folder cache (bad magic)".into(),
        ));
    }
    let body = bytes.len() - 4;
    let stored = u32::from_le_bytes(bytes[body..].try_into().unwrap_or_default());
    if crc32(&[&bytes[..body]]) != stored {
        return Err(Error::Data(
            "checksum mismatch (truncated or corrupt)".into(),
        ));
    }
    let mut c = Cursor {
        bytes: &bytes[..body],
        at: MAGIC.len(),
    };
    let len = c.u64()?;
    if c.take(len)? != key {
        tracing::info!(
            "{}: the images changed; decoding them again",
            path.display()
        );
        return Ok(None);
    }
    let mut images = parse_header(&mut c)?;
    let start = c.at;
    let size = [images.n, images.channels, images.height]
        .iter()
        .try_fold(images.width, |acc, &d| acc.checked_mul(d));
    if size != Some(body - start) {
        return Err(Error::Data("pixel data of the wrong size".into()));
    }
    bytes.truncate(body);
    bytes.drain(..start);
    images.pixels = bytes;
    images.check()?;
    Ok(Some(images))
}

/// The sizes, class names and labels after the key (pixels left empty).
fn parse_header(c: &mut Cursor) -> Result<RawImages> {
    let (n, channels, height, width) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
    let has_labels = match c.take(1)? {
        [0] => false,
        [1] => true,
        _ => return Err(Error::Data("bad label flag".into())),
    };
    let count = c.u64()?;
    let mut classes = Vec::new();
    for _ in 0..count {
        let len = c.u64()?;
        let name = std::str::from_utf8(c.take(len)?)
            .map_err(|_| Error::Data("a class name is not UTF-8".into()))?;
        classes.push(name.to_string());
    }
    let labels = if has_labels {
        let raw = c.take(
            n.checked_mul(4)
                .ok_or_else(|| Error::Data("size overflow".into()))?,
        )?;
        Some(
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect(),
        )
    } else {
        None
    };
    Ok(RawImages {
        pixels: Vec::new(),
        n,
        channels,
        height,
        width,
        labels,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::load_image_folder;
    use image::{Rgb, RgbImage};

    /// Class folders `a/` and `b/` with `n` 6x5 RGB images each.
    fn write_folder(root: &Path, n: u8) {
        for (k, class) in ["a", "b"].iter().enumerate() {
            std::fs::create_dir_all(root.join(class)).unwrap();
            for i in 0..n {
                let img = RgbImage::from_fn(5, 6, |x, y| {
                    Rgb([i * 20 + x as u8, k as u8 * 100 + y as u8, 7])
                });
                img.save(root.join(class).join(format!("{i}.png"))).unwrap();
            }
        }
    }

    fn load(root: &Path, fit: Fit) -> (RawImages, CacheUse) {
        load_image_folder_cached(root, fit).unwrap()
    }

    fn is_hit(u: &CacheUse) -> bool {
        matches!(u, CacheUse::Hit(_))
    }

    #[test]
    fn the_second_load_reads_the_cache_and_equals_a_fresh_decode() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 3);
        let (first, used) = load(dir.path(), Fit::Exact);
        let want = dir.path().join(CACHE_DIR).join("decoded-exact.bin");
        assert_eq!(used, CacheUse::Written(want.clone()));
        let (second, used) = load(dir.path(), Fit::Exact);
        assert_eq!(used, CacheUse::Hit(want));
        assert_eq!(first, second);
        assert_eq!(second, load_image_folder(dir.path(), Fit::Exact).unwrap());
        assert_eq!(second.classes, vec!["a", "b"]);
        // The cache folder is not read as a class folder.
        assert_eq!(second.n, 6);
    }

    #[test]
    fn touching_adding_removing_a_file_or_another_fit_invalidates_it() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 3);
        load(dir.path(), Fit::Exact);
        let file = dir.path().join("a").join("0.png");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(!is_hit(&load(dir.path(), Fit::Exact).1), "touched");
        assert!(is_hit(&load(dir.path(), Fit::Exact).1));
        std::fs::copy(&file, dir.path().join("b").join("9.png")).unwrap();
        let (added, used) = load(dir.path(), Fit::Exact);
        assert!(!is_hit(&used) && added.n == 7, "added");
        std::fs::remove_file(&file).unwrap();
        let (removed, used) = load(dir.path(), Fit::Exact);
        assert!(!is_hit(&used) && removed.n == 6, "removed");
        let (crop, used) = load(dir.path(), Fit::CenterCrop(4, 4));
        assert!(!is_hit(&used) && crop.height == 4, "crop");
        assert!(is_hit(&load(dir.path(), Fit::CenterCrop(4, 4)).1));
        assert!(!is_hit(&load(dir.path(), Fit::CenterCrop(4, 3)).1));
        assert!(!is_hit(&load(dir.path(), Fit::Resize(4, 4)).1));
        // Each fit keeps its own file.
        assert!(is_hit(&load(dir.path(), Fit::Exact).1));
    }

    #[test]
    fn a_corrupt_or_truncated_cache_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 2);
        let (want, _) = load(dir.path(), Fit::Exact);
        let path = dir.path().join(CACHE_DIR).join("decoded-exact.bin");
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 10;
        flipped[last] ^= 1; // a pixel byte
        let bad_inputs = [
            flipped,
            good[..good.len() / 2].to_vec(),
            good[..5].to_vec(),
            Vec::new(),
            b"GTFLDC01garbage-garbage".to_vec(),
        ];
        for (i, bad) in bad_inputs.into_iter().enumerate() {
            std::fs::write(&path, bad).unwrap();
            let (got, used) = load(dir.path(), Fit::Exact);
            assert_eq!(used, CacheUse::Written(path.clone()), "case {i}");
            assert_eq!(got, want, "case {i}");
            assert_eq!(std::fs::read(&path).unwrap(), good, "case {i}");
        }
        // A valid CRC over a header whose sizes disagree is refused too.
        let key = b"k".to_vec();
        let mut images = want.clone();
        images.n += 1;
        let head = header(&key, &images);
        let mut bytes = head.clone();
        bytes.extend(&want.pixels);
        bytes.extend(crc32(&[&bytes]).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_cache(&path, &key).is_err());
        // Sizes whose product overflows are refused, not multiplied.
        images.n = usize::MAX / 2;
        images.labels = None;
        let mut bytes = header(&key, &images);
        bytes.extend(&want.pixels);
        bytes.extend(crc32(&[&bytes]).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_cache(&path, &key).is_err());
    }

    #[test]
    fn an_unwritable_folder_uses_the_temporary_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 2);
        // A file where the cache folder would go blocks it.
        std::fs::write(dir.path().join(CACHE_DIR), b"in the way").unwrap();
        let (_, used) = load(dir.path(), Fit::Resize(3, 3));
        let fallback = cache_dirs(dir.path())[1].join("decoded-resize-3x3.bin");
        assert_eq!(used, CacheUse::Written(fallback.clone()));
        assert_eq!(
            load(dir.path(), Fit::Resize(3, 3)).1,
            CacheUse::Hit(fallback.clone())
        );
        std::fs::remove_dir_all(fallback.parent().unwrap()).unwrap();
    }
}
