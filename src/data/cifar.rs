//! Reader for the binary version of CIFAR-10 (Krizhevsky 2009,
//! <https://www.cs.toronto.edu/~kriz/cifar.html>): files of 3073-byte records, each one label
//! byte (0..=9) and 3072 pixel bytes, the 1024 red values of a 32x32 image row-major, then the
//! 1024 green, then the 1024 blue, i.e. already planar `(3, 32, 32)`.
//!
//! A CIFAR-10 directory (the `cifar-10-batches-bin` folder of `cifar-10-binary.tar.gz`, or a
//! folder holding it) has the training batches `data_batch_1.bin` .. `data_batch_5.bin`, the
//! test batch `test_batch.bin`, and optionally `batches.meta.txt`, the ten class names one per
//! line. The training split is every training batch present, in order (a partial download
//! loads; none at all is an error that lists the names looked for).
//!
//! Nothing is allocated past what the files hold: their lengths are checked first.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::images::Split;
use super::raw::{in_file, RawImages};
use crate::error::{Error, Result};

/// The class names of CIFAR-10, indexed by label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Bytes per record: one label byte and a `(3, 32, 32)` image.
pub const CIFAR_RECORD_BYTES: usize = 1 + CIFAR_IMAGE_BYTES;
const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;

/// The training batch files, in the order they are read.
pub const CIFAR10_TRAIN_BATCHES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const CIFAR10_TEST_BATCH: &str = "test_batch.bin";
/// The optional file of class names, one per line.
pub const CIFAR10_META: &str = "batches.meta.txt";
/// The folder the official archive unpacks to; [`load_cifar10`] looks into it when the given
/// directory holds no batch itself.
pub const CIFAR10_FOLDER: &str = "cifar-10-batches-bin";

/// Longest `batches.meta.txt` read (the real one is 61 bytes).
const MAX_META: u64 = 1 << 16;

/// Loads one split of CIFAR-10 from `dir` (or from `dir/cifar-10-batches-bin`): all training
/// batches present, in order, or the test batch. Images are `(n, 3, 32, 32)` with labels; the
/// class names come from `batches.meta.txt` when present, else [`CIFAR10_CLASSES`].
///
/// # Errors
/// [`Error::Data`] when no batch of the split is there (naming the files looked for), a batch
/// length is not a positive multiple of 3073 bytes (naming the file and its length), a label is
/// 10 or more (naming the file and record), or `batches.meta.txt` does not hold exactly ten
/// names; [`Error::Io`] when a file cannot be read.
pub fn load_cifar10(dir: &Path, split: Split) -> Result<RawImages> {
    let names: &[&str] = match split {
        Split::Train => &CIFAR10_TRAIN_BATCHES,
        Split::Test => std::slice::from_ref(&CIFAR10_TEST_BATCH),
    };
    let present = |d: &Path| -> Vec<PathBuf> {
        names
            .iter()
            .map(|f| d.join(f))
            .filter(|p| p.is_file())
            .collect()
    };
    let mut root = dir.to_path_buf();
    let mut files = present(&root);
    if files.is_empty() && dir.join(CIFAR10_FOLDER).is_dir() {
        root = dir.join(CIFAR10_FOLDER);
        files = present(&root);
    }
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no CIFAR-10 {} batch here (looked for {} in it and in {CIFAR10_FOLDER}/)",
            dir.display(),
            match split {
                Split::Train => "training",
                Split::Test => "test",
            },
            names.join(", ")
        )));
    }
    let classes = read_meta(&root.join(CIFAR10_META))?;
    let mut images = empty_set(classes);
    for path in &files {
        read_batch_into(path, &mut images)?;
    }
    let name = root.display().to_string();
    images.check().map_err(|e| in_file(&name, e))?;
    Ok(images)
}

/// Reads one CIFAR-10 batch file; the class names are [`CIFAR10_CLASSES`].
///
/// # Errors
/// As [`load_cifar10`] for one file.
pub fn read_cifar_batch(path: &Path) -> Result<RawImages> {
    let mut images = empty_set(default_classes());
    read_batch_into(path, &mut images)?;
    Ok(images)
}

/// Parses CIFAR-10 records from memory (tests and fuzzing); errors name `<memory>`.
///
/// # Errors
/// As [`read_cifar_batch`], without [`Error::Io`].
pub fn parse_cifar_bytes(bytes: &[u8]) -> Result<RawImages> {
    let mut images = empty_set(default_classes());
    read_records(bytes, "<memory>", bytes.len() as u64, &mut images)?;
    Ok(images)
}

/// Encodes images as CIFAR-10 records (for tests and for writing small CIFAR-layout sets).
///
/// # Errors
/// [`Error::Data`] unless the images are `(n, 3, 32, 32)` with one label below 10 each.
pub fn encode_cifar(images: &RawImages) -> Result<Vec<u8>> {
    images.check()?;
    if (images.channels, images.height, images.width) != (3, 32, 32) {
        return Err(Error::Data(format!(
            "CIFAR-10 records hold 3x32x32 images, not {}x{}x{}",
            images.channels, images.height, images.width
        )));
    }
    let Some(labels) = &images.labels else {
        return Err(Error::Data(
            "CIFAR-10 records need labels; the images have none".to_string(),
        ));
    };
    let mut out = Vec::with_capacity(images.n * CIFAR_RECORD_BYTES);
    for (i, &label) in labels.iter().enumerate() {
        let byte = u8::try_from(label)
            .ok()
            .filter(|&b| usize::from(b) < CIFAR10_CLASSES.len())
            .ok_or_else(|| {
                Error::Data(format!(
                    "label {label} of image {i} is not a CIFAR-10 label (0..=9)"
                ))
            })?;
        out.push(byte);
        out.extend_from_slice(images.image(i));
    }
    Ok(out)
}

fn default_classes() -> Vec<String> {
    CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
}

fn empty_set(classes: Vec<String>) -> RawImages {
    RawImages {
        pixels: Vec::new(),
        n: 0,
        channels: 3,
        height: 32,
        width: 32,
        labels: Some(Vec::new()),
        classes,
    }
}

/// The class names of `batches.meta.txt` (non-empty lines, trimmed), or the standard ones when
/// the file does not exist.
fn read_meta(path: &Path) -> Result<Vec<String>> {
    if !path.is_file() {
        return Ok(default_classes());
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_META + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_META {
        return Err(Error::Data(format!(
            "{}: longer than {MAX_META} bytes; expected ten class names, one per line",
            path.display()
        )));
    }
    let names: Vec<String> = String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != CIFAR10_CLASSES.len() {
        return Err(Error::Data(format!(
            "{}: holds {} class names, CIFAR-10 has {} (one per line)",
            path.display(),
            names.len(),
            CIFAR10_CLASSES.len()
        )));
    }
    Ok(names)
}

fn read_batch_into(path: &Path, images: &mut RawImages) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let name = path.display().to_string();
    read_records(BufReader::new(file), &name, len, images)
}

/// Appends the records of a batch of `len` bytes to `images`.
fn read_records(mut r: impl Read, name: &str, len: u64, images: &mut RawImages) -> Result<()> {
    let record = CIFAR_RECORD_BYTES as u64;
    if len == 0 || len % record != 0 {
        let hint = if len > 0 && len % (record + 1) == 0 {
            " (records of 3074 bytes are CIFAR-100, which is not supported)"
        } else {
            ""
        };
        return Err(Error::Data(format!(
            "{name}: {len} bytes is not a positive multiple of the {record}-byte CIFAR-10 \
             record{hint}"
        )));
    }
    let count = usize::try_from(len / record)
        .map_err(|_| Error::Data(format!("{name}: {len} bytes is too large")))?;
    let labels = images.labels.get_or_insert_with(Vec::new);
    labels.reserve(count);
    images
        .pixels
        .reserve(count.saturating_mul(CIFAR_IMAGE_BYTES));
    let mut buf = [0u8; CIFAR_RECORD_BYTES];
    for i in 0..count {
        r.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Data(format!(
                "{name}: truncated in record {i} of the {count} its length promised"
            )),
            _ => Error::Data(format!("{name}: read failed: {e}")),
        })?;
        if usize::from(buf[0]) >= CIFAR10_CLASSES.len() {
            return Err(Error::Data(format!(
                "{name}: record {i} has label {}; CIFAR-10 labels are 0..=9",
                buf[0]
            )));
        }
        labels.push(u32::from(buf[0]));
        images.pixels.extend_from_slice(&buf[1..]);
    }
    images.n += count;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` images whose value at (image i, channel c, row y, column x) is
    /// `(seed + 3 * i + 101 * c + 7 * y + 5 * x) % 256`, labels `(seed + i) % 10`.
    fn images(n: usize, seed: usize) -> RawImages {
        let mut pixels = Vec::new();
        for i in 0..n {
            for c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        pixels.push(((seed + 3 * i + 101 * c + 7 * y + 5 * x) % 256) as u8);
                    }
                }
            }
        }
        RawImages {
            pixels,
            n,
            channels: 3,
            height: 32,
            width: 32,
            labels: Some((0..n).map(|i| ((seed + i) % 10) as u32).collect()),
            classes: default_classes(),
        }
    }

    fn assert_err<T: std::fmt::Debug>(r: Result<T>, want: &str) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
        assert!(!e.contains('\n'), "{e:?} is not one line");
    }

    #[test]
    fn record_layout_is_label_then_planar_rgb() {
        // One record written by hand: label 7, R = 10, G = 20, B = 30 except one pixel per
        // channel at (y, x) = (2, 5), (31, 0), (0, 31).
        let mut rec = vec![7u8];
        for (c, base) in [10u8, 20, 30].into_iter().enumerate() {
            let mut plane = vec![base; 1024];
            let (y, x) = [(2, 5), (31, 0), (0, 31)][c];
            plane[y * 32 + x] = 200 + c as u8;
            rec.extend(plane);
        }
        let set = parse_cifar_bytes(&rec).unwrap();
        assert_eq!((set.n, set.channels, set.height, set.width), (1, 3, 32, 32));
        assert_eq!(set.labels, Some(vec![7]));
        assert_eq!(set.classes[7], "horse");
        assert_eq!(set.pixel(0, 0, 2, 5), 200);
        assert_eq!(set.pixel(0, 1, 31, 0), 201);
        assert_eq!(set.pixel(0, 2, 0, 31), 202);
        assert_eq!(set.pixel(0, 0, 5, 2), 10);
        assert_eq!(set.pixel(0, 2, 31, 0), 30);
        assert_eq!(encode_cifar(&set).unwrap(), rec);
    }

    #[test]
    fn encode_and_parse_round_trip() {
        let set = images(3, 4);
        let bytes = encode_cifar(&set).unwrap();
        assert_eq!(bytes.len(), 3 * CIFAR_RECORD_BYTES);
        assert_eq!(parse_cifar_bytes(&bytes).unwrap(), set);
    }

    #[test]
    fn a_directory_loads_train_batches_in_order_and_the_test_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (b1, b2, test) = (images(2, 0), images(1, 9), images(2, 50));
        std::fs::write(
            dir.path().join("data_batch_1.bin"),
            encode_cifar(&b1).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("data_batch_2.bin"),
            encode_cifar(&b2).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("test_batch.bin"),
            encode_cifar(&test).unwrap(),
        )
        .unwrap();
        let train = load_cifar10(dir.path(), Split::Train).unwrap();
        assert_eq!(train.n, 3);
        assert_eq!(train.labels, Some(vec![0, 1, 9]));
        assert_eq!(train.image(2), b2.image(0));
        // 3 * 1 + 101 * 2 + 7 * 3 + 5 * 4
        assert_eq!(train.pixel(1, 2, 3, 4), 246);
        assert_eq!(train.classes, default_classes());
        assert_eq!(train.num_classes(), 10);
        assert_eq!(load_cifar10(dir.path(), Split::Test).unwrap(), test);
        // Class names from batches.meta.txt (blank lines and spaces ignored).
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let meta = format!("{}\n\n", names.join(" \n"));
        std::fs::write(dir.path().join(CIFAR10_META), meta).unwrap();
        assert_eq!(
            load_cifar10(dir.path(), Split::Train).unwrap().classes,
            names
        );
        std::fs::write(dir.path().join(CIFAR10_META), "a\nb\n").unwrap();
        assert_err(
            load_cifar10(dir.path(), Split::Train),
            "batches.meta.txt: holds 2 class names, CIFAR-10 has 10",
        );
    }

    #[test]
    fn missing_batches_and_the_archive_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_err(
            load_cifar10(dir.path(), Split::Train),
            "no CIFAR-10 training batch here (looked for data_batch_1.bin, data_batch_2.bin, \
             data_batch_3.bin, data_batch_4.bin, data_batch_5.bin in it and in \
             cifar-10-batches-bin/)",
        );
        assert_err(
            load_cifar10(dir.path(), Split::Test),
            "no CIFAR-10 test batch here (looked for test_batch.bin",
        );
        // Only batch 3 of the unpacked archive folder: it loads.
        let inner = dir.path().join(CIFAR10_FOLDER);
        std::fs::create_dir(&inner).unwrap();
        std::fs::write(
            inner.join("data_batch_3.bin"),
            encode_cifar(&images(2, 1)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            load_cifar10(dir.path(), Split::Train).unwrap(),
            images(2, 1)
        );
    }

    #[test]
    fn bad_lengths_and_labels_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        let good = encode_cifar(&images(2, 0)).unwrap();
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert_err(
            load_cifar10(dir.path(), Split::Train),
            &format!(
                "{}: 6145 bytes is not a positive multiple of the 3073-byte",
                p.display()
            ),
        );
        std::fs::write(&p, b"").unwrap();
        assert_err(read_cifar_batch(&p), "0 bytes is not a positive multiple");
        std::fs::write(&p, vec![0u8; 2 * 3074]).unwrap();
        assert_err(read_cifar_batch(&p), "records of 3074 bytes are CIFAR-100");
        let mut bad = good.clone();
        bad[CIFAR_RECORD_BYTES] = 10;
        std::fs::write(&p, &bad).unwrap();
        assert_err(
            load_cifar10(dir.path(), Split::Train),
            &format!(
                "{}: record 1 has label 10; CIFAR-10 labels are 0..=9",
                p.display()
            ),
        );
        assert_err(parse_cifar_bytes(&bad), "<memory>: record 1 has label 10");
    }

    #[test]
    fn encode_refuses_what_the_format_cannot_hold() {
        let mut grey = images(1, 0);
        grey.channels = 1;
        grey.pixels.truncate(1024);
        assert_err(encode_cifar(&grey), "hold 3x32x32 images, not 1x32x32");
        let mut unlabelled = images(1, 0);
        unlabelled.labels = None;
        assert_err(encode_cifar(&unlabelled), "need labels");
        let mut big = images(1, 0);
        big.labels = Some(vec![10]);
        big.classes.clear();
        assert_err(
            encode_cifar(&big),
            "label 10 of image 0 is not a CIFAR-10 label",
        );
    }

    #[test]
    fn truncations_and_byte_flips_never_panic() {
        let good = encode_cifar(&images(2, 0)).unwrap();
        for cut in (0..good.len()).step_by(97) {
            assert!(parse_cifar_bytes(&good[..cut]).is_err());
        }
        for at in [0, 1, 3072, 3073, 3074, 6145] {
            let mut b = good.clone();
            b[at] ^= 0xff;
            let _ = parse_cifar_bytes(&b);
        }
    }
}
