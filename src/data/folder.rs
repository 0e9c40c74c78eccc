//! Reader for folders of image files, laid out like torchvision's `ImageFolder`:
//!
//! - **class folders** `root/<class>/<image>`: the class names are the folder names, sorted
//!   (byte order), and an image's label is the index of its class; images may sit in
//!   sub-folders of a class folder (any depth, like `ImageFolder`; symbolic links are followed,
//!   each real folder once);
//! - **a flat folder** `root/<image>` with no sub-folders: images without labels.
//!
//! Images are PNG or JPEG files, recognised by the extension `.png`, `.jpg` or `.jpeg` (any
//! case) and decoded by their content. Every other file is ignored (`.txt`, `.csv`, ...), and so
//! is every file or folder whose name starts with a dot (`.DS_Store`, `.ipynb_checkpoints`).
//! A root that holds both class folders and images directly is refused rather than guessed.
//!
//! Files are taken in sorted path order and decoded in parallel (rayon), so the result does
//! not depend on the number of threads. When every image is grey (with or without alpha) the
//! set has 1 channel; otherwise every image is converted to RGB (grey ones by repeating the
//! value) and the set has 3. Alpha is dropped (not blended), 16-bit images are scaled to 8
//! bits. EXIF orientation is not applied (as in PIL by default).
//!
//! The image sizes must agree under [`Fit::Exact`]; [`Fit::CenterCrop`] and [`Fit::Resize`]
//! make them agree. The image crate's default decoding limits apply (at most 512 MiB per
//! image), and no buffer for the whole set is allocated before every image has decoded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{ColorType, ImageBuffer, ImageDecoder, ImageReader, Pixel};
use rayon::prelude::*;

use super::raw::{in_file, RawImages};
use crate::error::{Error, Result};

/// The filter of [`Fit::Resize`]: linear interpolation (bilinear in 2-D, with a support that
/// widens when shrinking, so it averages rather than skips pixels).
pub const RESIZE_FILTER: FilterType = FilterType::Triangle;

/// File extensions read as images (compared without regard to case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// How the images of a folder are brought to one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Keep every image as it is: all must already have the same size.
    #[default]
    Exact,
    /// Cut the central `(height, width)` window out of each image (the extra rows and columns
    /// split evenly, one more at the bottom or right when odd); every image must be at least
    /// that large.
    CenterCrop(usize, usize),
    /// Scale each image to `(height, width)` with [`RESIZE_FILTER`], ignoring its aspect ratio.
    Resize(usize, usize),
}

/// The image files of a folder, in order, with their labels and class names.
#[derive(Debug)]
pub(crate) struct Listing {
    /// Image files, sorted (class by class for class folders).
    pub(crate) files: Vec<PathBuf>,
    /// The label of each file, for class folders.
    pub(crate) labels: Option<Vec<u32>>,
    /// Class names, indexed by label.
    pub(crate) classes: Vec<String>,
}

/// Size and colour of one image, read from its header.
#[derive(Debug, Clone, Copy)]
struct Probe {
    height: usize,
    width: usize,
    grey: bool,
}

/// Loads every image under `root` (class folders or a flat folder, see the module
/// documentation) as one set, planar `(n, channels, height, width)`, with labels and class
/// names for class folders.
///
/// # Errors
/// [`Error::Config`] for a `Fit` with a zero size; [`Error::Io`] when a folder or file cannot
/// be opened; [`Error::Data`] when the folder holds no image, a class folder holds no image, the
/// root mixes class folders and images, an image cannot be decoded (naming the file), sizes
/// differ under [`Fit::Exact`] (naming two files and their sizes), or an image is smaller
/// than a [`Fit::CenterCrop`] window (naming the file).
pub fn load_image_folder(root: &Path, fit: Fit) -> Result<RawImages> {
    check_fit(fit)?;
    decode_listing(root, list_folder(root)?, fit)
}

/// Refuses a [`Fit`] with a zero size or one that does not fit in 32 bits.
pub(crate) fn check_fit(fit: Fit) -> Result<()> {
    if let Fit::CenterCrop(h, w) | Fit::Resize(h, w) = fit {
        if h == 0 || w == 0 || u32::try_from(h).is_err() || u32::try_from(w).is_err() {
            return Err(Error::Config(format!(
                "image size {h}x{w} of {fit:?} must be positive and below 2^32"
            )));
        }
    }
    Ok(())
}

/// Decodes the images of `listing` (the folder `root`) in parallel and assembles the set.
pub(crate) fn decode_listing(root: &Path, listing: Listing, fit: Fit) -> Result<RawImages> {
    let probes: Vec<Probe> = in_order(listing.files.par_iter().map(|p| probe(p)).collect())?;
    let (height, width) = target_size(&listing.files, &probes, fit)?;
    let channels = if probes.iter().all(|p| p.grey) { 1 } else { 3 };
    let decoded: Vec<Vec<u8>> = in_order(
        listing
            .files
            .par_iter()
            .zip(&probes)
            .map(|(p, pr)| decode(p, *pr, channels, fit))
            .collect(),
    )?;
    let dim = channels * height * width;
    let total = decoded.len().checked_mul(dim).ok_or_else(|| {
        Error::Data(format!(
            "{}: the images overflow the address space",
            root.display()
        ))
    })?;
    let mut pixels = Vec::with_capacity(total);
    for image in decoded {
        pixels.extend_from_slice(&image);
    }
    let images = RawImages {
        pixels,
        n: listing.files.len(),
        channels,
        height,
        width,
        labels: listing.labels,
        classes: listing.classes,
    };
    images
        .check()
        .map_err(|e| in_file(&root.display().to_string(), e))?;
    Ok(images)
}

/// The values in order, or the first error in order (not the first to happen).
fn in_order<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The visible entries of `dir` split into folders and image files, each sorted.
fn entries(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut dirs, mut images) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if is_hidden(&path) {
            continue;
        }
        // Follows symbolic links; a dangling link is neither and is skipped.
        if path.is_dir() {
            dirs.push(path);
        } else if path.is_file() && is_image(&path) {
            images.push(path);
        }
    }
    dirs.sort();
    images.sort();
    Ok((dirs, images))
}

/// Every image file under `dir`, sorted by path. Each real folder is walked once (`seen`
/// holds the canonical paths walked), so symbolic-link loops end.
fn walk(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(real) {
        return Ok(());
    }
    let (dirs, images) = entries(dir)?;
    out.extend(images);
    for d in dirs {
        walk(&d, seen, out)?;
    }
    Ok(())
}

/// The image files under `root` (see the module documentation), with labels for class folders.
pub(crate) fn list_folder(root: &Path) -> Result<Listing> {
    let (dirs, images) = entries(root)?;
    let exts = IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ");
    if dirs.is_empty() {
        if images.is_empty() {
            return Err(Error::Data(format!(
                "{}: no images ({exts}) and no class folders in this folder",
                root.display()
            )));
        }
        return Ok(Listing {
            files: images,
            labels: None,
            classes: Vec::new(),
        });
    }
    if let Some(stray) = images.first() {
        return Err(Error::Data(format!(
            "{}: holds both class folders ({}) and images ({}); put every image in a class \
             folder, or remove the folders for an unlabelled set",
            root.display(),
            dirs[0].display(),
            stray.display()
        )));
    }
    let (mut files, mut labels, mut classes) = (Vec::new(), Vec::new(), Vec::new());
    for (label, dir) in dirs.iter().enumerate() {
        let before = files.len();
        walk(dir, &mut HashSet::new(), &mut files)?;
        if files.len() == before {
            return Err(Error::Data(format!(
                "{}: class folder holds no images ({exts})",
                dir.display()
            )));
        }
        let label = u32::try_from(label)
            .map_err(|_| Error::Data(format!("{}: too many classes", root.display())))?;
        labels.resize(files.len(), label);
        let name = dir.file_name().unwrap_or_default();
        classes.push(name.to_string_lossy().into_owned());
    }
    Ok(Listing {
        files,
        labels: Some(labels),
        classes,
    })
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> Error {
    let msg = e.to_string().replace(['\n', '\r'], " ");
    Error::Data(format!("{}: cannot read image: {msg}", path.display()))
}

fn open(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))
}

/// Reads the size and colour type of an image from its header.
fn probe(path: &Path) -> Result<Probe> {
    let decoder = open(path)?
        .into_decoder()
        .map_err(|e| unreadable(path, e))?;
    let (w, h) = decoder.dimensions();
    let grey = matches!(
        decoder.color_type(),
        ColorType::L8 | ColorType::La8 | ColorType::L16 | ColorType::La16
    );
    Ok(Probe {
        height: h as usize,
        width: w as usize,
        grey,
    })
}

/// The common size of the set: the first image's under [`Fit::Exact`] (all must agree), the
/// fit's otherwise (crops must fit).
fn target_size(files: &[PathBuf], probes: &[Probe], fit: Fit) -> Result<(usize, usize)> {
    let size = |p: &Probe| format!("{}x{}", p.height, p.width);
    match fit {
        Fit::Exact => {
            let Some(first) = probes.first() else {
                return Err(Error::Data("no images".to_string()));
            };
            if let Some(i) = probes
                .iter()
                .position(|p| (p.height, p.width) != (first.height, first.width))
            {
                return Err(Error::Data(format!(
                    "images differ in size (height x width): {} is {} but {} is {} (crop or \
                     resize them to one size)",
                    files[0].display(),
                    size(first),
                    files[i].display(),
                    size(&probes[i])
                )));
            }
            Ok((first.height, first.width))
        }
        Fit::CenterCrop(h, w) => {
            if let Some(i) = probes.iter().position(|p| p.height < h || p.width < w) {
                return Err(Error::Data(format!(
                    "{}: image of {} (height x width) is smaller than the {h}x{w} center crop",
                    files[i].display(),
                    size(&probes[i])
                )));
            }
            Ok((h, w))
        }
        Fit::Resize(h, w) => Ok((h, w)),
    }
}

/// Decodes one image into planar `(channels, height, width)` bytes after fitting it.
fn decode(path: &Path, probe: Probe, channels: usize, fit: Fit) -> Result<Vec<u8>> {
    let image = open(path)?.decode().map_err(|e| unreadable(path, e))?;
    if (image.height() as usize, image.width() as usize) != (probe.height, probe.width) {
        return Err(Error::Data(format!(
            "{}: decoded as {}x{} but its header says {}x{} (did the file change?)",
            path.display(),
            image.height(),
            image.width(),
            probe.height,
            probe.width
        )));
    }
    Ok(if channels == 1 {
        planar(fitted(image.to_luma8(), fit))
    } else {
        planar(fitted(image.to_rgb8(), fit))
    })
}

/// Applies a center crop or resize (sizes already checked against the image).
fn fitted<P>(image: ImageBuffer<P, Vec<u8>>, fit: Fit) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = image.dimensions();
    match fit {
        Fit::Exact => image,
        Fit::CenterCrop(ch, cw) => {
            let (ch, cw) = (ch as u32, cw as u32);
            imageops::crop_imm(
                &image,
                w.saturating_sub(cw) / 2,
                h.saturating_sub(ch) / 2,
                cw,
                ch,
            )
            .to_image()
        }
        Fit::Resize(rh, rw) if (rh as u32, rw as u32) == (h, w) => image,
        Fit::Resize(rh, rw) => imageops::resize(&image, rw as u32, rh as u32, RESIZE_FILTER),
    }
}

/// Interleaved `(height, width, channels)` pixels as planar `(channels, height, width)`.
fn planar<P>(image: ImageBuffer<P, Vec<u8>>) -> Vec<u8>
where
    P: Pixel<Subpixel = u8>,
{
    let c = usize::from(P::CHANNEL_COUNT);
    let raw = image.into_raw();
    if c == 1 {
        return raw;
    }
    let hw = raw.len() / c;
    let mut out = vec![0u8; raw.len()];
    for (p, px) in raw.chunks_exact(c).enumerate() {
        for (k, &v) in px.iter().enumerate() {
            out[k * hw + p] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use image::{GrayAlphaImage, GrayImage, Luma, LumaA, Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;

    /// The value of channel `c` at row `y`, column `x` of test image `k`: distinct per position.
    fn value(k: u8, c: usize, y: u32, x: u32) -> u8 {
        k.wrapping_mul(16) + c as u8 * 70 + y as u8 * 9 + x as u8 * 2
    }

    fn rgb(k: u8, h: u32, w: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([0, 1, 2].map(|c| value(k, c, y, x))))
    }

    fn grey(k: u8, h: u32, w: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| Luma([value(k, 0, y, x)]))
    }

    fn mkdir(p: &Path) -> PathBuf {
        std::fs::create_dir_all(p).unwrap();
        p.to_path_buf()
    }

    fn assert_err<T: std::fmt::Debug>(r: Result<T>, want: &str) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
        assert!(!e.contains('\n'), "{e:?} is not one line");
    }

    #[test]
    fn class_folders_of_colour_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let cat = mkdir(&dir.path().join("cat"));
        let dog = mkdir(&dir.path().join("dog"));
        let deep = mkdir(&dog.join("more"));
        rgb(1, 3, 4).save(cat.join("b.png")).unwrap();
        rgb(0, 3, 4).save(cat.join("a.PNG")).unwrap();
        rgb(2, 3, 4).save(deep.join("c.png")).unwrap();
        rgb(3, 3, 4).save(dog.join("d.png")).unwrap();
        // Ignored: other files, hidden files and folders.
        std::fs::write(cat.join("notes.txt"), "not an image").unwrap();
        std::fs::write(cat.join(".DS_Store"), "junk").unwrap();
        rgb(9, 5, 5).save(cat.join(".hidden.png")).unwrap();
        rgb(9, 5, 5)
            .save(mkdir(&dir.path().join(".cache")).join("x.png"))
            .unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!((set.n, set.channels, set.height, set.width), (4, 3, 3, 4));
        assert_eq!(set.classes, vec!["cat", "dog"]);
        // Sorted paths: cat/a.PNG, cat/b.png, dog/d.png, dog/more/c.png.
        assert_eq!(set.labels, Some(vec![0, 0, 1, 1]));
        for (i, k) in [0u8, 1, 3, 2].into_iter().enumerate() {
            for c in 0..3 {
                for y in 0..3 {
                    for x in 0..4 {
                        assert_eq!(set.pixel(i, c, y, x), value(k, c, y as u32, x as u32));
                    }
                }
            }
        }
        assert_eq!(set.num_classes(), 2);
    }

    #[test]
    fn grey_only_folders_keep_one_channel() {
        let dir = tempfile::tempdir().unwrap();
        grey(0, 2, 3).save(dir.path().join("0.png")).unwrap();
        let ga = GrayAlphaImage::from_fn(3, 2, |x, y| LumaA([value(1, 0, y, x), 0]));
        ga.save(dir.path().join("1.png")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!((set.n, set.channels, set.height, set.width), (2, 1, 2, 3));
        assert_eq!(set.labels, None);
        assert!(set.classes.is_empty());
        assert_eq!(set.pixel(0, 0, 1, 2), value(0, 0, 1, 2));
        assert_eq!(set.pixel(1, 0, 1, 0), value(1, 0, 1, 0));
        // 16-bit grey is scaled to 8 bits.
        let wide = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(3, 2, |x, _| {
            Luma([[0u16, 0x8080, 0xffff][x as usize]])
        });
        wide.save(dir.path().join("2.png")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!(set.channels, 1);
        assert_eq!(set.image(2), &[0, 128, 255, 0, 128, 255]);
    }

    #[test]
    fn grey_beside_colour_becomes_rgb_and_alpha_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        grey(0, 2, 2).save(dir.path().join("a.png")).unwrap();
        let rgba = RgbaImage::from_fn(2, 2, |x, y| {
            let [r, g, b] = [0, 1, 2].map(|c| value(1, c, y, x));
            Rgba([r, g, b, 0])
        });
        rgba.save(dir.path().join("b.png")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!(set.channels, 3);
        for c in 0..3 {
            assert_eq!(set.pixel(0, c, 1, 0), value(0, 0, 1, 0), "grey repeated");
            assert_eq!(set.pixel(1, c, 1, 1), value(1, c, 1, 1), "alpha dropped");
        }
    }

    #[test]
    fn jpeg_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let flat = RgbImage::from_pixel(16, 8, Rgb([200, 40, 90]));
        flat.save(dir.path().join("a.jpg")).unwrap();
        rgb(0, 8, 16).save(dir.path().join("b.jpeg")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!((set.n, set.channels, set.height, set.width), (2, 3, 8, 16));
        for (c, want) in [200i32, 40, 90].into_iter().enumerate() {
            let got = i32::from(set.pixel(0, c, 4, 7));
            assert!((got - want).abs() <= 6, "channel {c}: {got} vs {want}");
        }
    }

    #[test]
    fn center_crop_takes_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        rgb(0, 4, 6).save(dir.path().join("a.png")).unwrap();
        rgb(1, 3, 3).save(dir.path().join("b.png")).unwrap();
        let set = load_image_folder(dir.path(), Fit::CenterCrop(2, 3)).unwrap();
        assert_eq!((set.height, set.width), (2, 3));
        // 4x6 -> rows 1..3, columns 1..4; 3x3 -> rows 0..2, columns 0..3.
        for c in 0..3 {
            assert_eq!(set.pixel(0, c, 0, 0), value(0, c, 1, 1));
            assert_eq!(set.pixel(0, c, 1, 2), value(0, c, 2, 3));
            assert_eq!(set.pixel(1, c, 1, 2), value(1, c, 1, 2));
        }
        let small = dir.path().join("b.png");
        assert_err(
            load_image_folder(dir.path(), Fit::CenterCrop(4, 4)),
            &format!(
                "{}: image of 3x3 (height x width) is smaller than the 4x4 center crop",
                small.display()
            ),
        );
    }

    #[test]
    fn resize_brings_sizes_together() {
        let dir = tempfile::tempdir().unwrap();
        RgbImage::from_pixel(10, 7, Rgb([10, 100, 250]))
            .save(dir.path().join("a.png"))
            .unwrap();
        rgb(1, 4, 4).save(dir.path().join("b.png")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Resize(4, 4)).unwrap();
        assert_eq!((set.n, set.height, set.width), (2, 4, 4));
        // A flat image stays flat; an image already 4x4 is unchanged.
        for (c, want) in [10u8, 100, 250].into_iter().enumerate() {
            assert!(set.image(0)[c * 16..(c + 1) * 16]
                .iter()
                .all(|&v| v == want));
        }
        assert_eq!(set.pixel(1, 2, 3, 1), value(1, 2, 3, 1));
        assert_err(
            load_image_folder(dir.path(), Fit::Resize(0, 4)),
            "config: image size 0x4 of Resize(0, 4) must be positive",
        );
        assert_err(
            load_image_folder(dir.path(), Fit::CenterCrop(4, 0)),
            "must be positive",
        );
    }

    #[test]
    fn mixed_sizes_are_refused_under_exact_naming_two_files() {
        let dir = tempfile::tempdir().unwrap();
        rgb(0, 3, 4).save(dir.path().join("a.png")).unwrap();
        rgb(0, 3, 4).save(dir.path().join("b.png")).unwrap();
        rgb(0, 5, 4).save(dir.path().join("c.png")).unwrap();
        let (a, c) = (dir.path().join("a.png"), dir.path().join("c.png"));
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            &format!(
                "images differ in size (height x width): {} is 3x4 but {} is 5x4",
                a.display(),
                c.display()
            ),
        );
    }

    #[test]
    fn empty_and_malformed_folders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            "no images (.png, .jpg, .jpeg) and no class folders",
        );
        std::fs::write(dir.path().join("readme.txt"), "x").unwrap();
        assert_err(load_image_folder(dir.path(), Fit::Exact), "no images");
        assert_err(
            load_image_folder(&dir.path().join("nope"), Fit::Exact),
            "nope",
        );
        let a = mkdir(&dir.path().join("a"));
        let b = mkdir(&dir.path().join("b"));
        rgb(0, 2, 2).save(a.join("x.png")).unwrap();
        std::fs::write(b.join("only.txt"), "x").unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            &format!("{}: class folder holds no images", b.display()),
        );
        rgb(0, 2, 2).save(b.join("y.png")).unwrap();
        rgb(0, 2, 2).save(dir.path().join("stray.png")).unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            "holds both class folders",
        );
    }

    #[test]
    fn unreadable_images_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        rgb(0, 8, 8).save(dir.path().join("a.png")).unwrap();
        let png = std::fs::read(dir.path().join("a.png")).unwrap();
        let truncated = dir.path().join("b.png");
        std::fs::write(&truncated, &png[..png.len() - 30]).unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            &format!("{}: cannot read image", truncated.display()),
        );
        std::fs::write(&truncated, "this is text").unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            &format!("{}: cannot read image", truncated.display()),
        );
        rgb(0, 8, 8).save(dir.path().join("c.jpg")).unwrap();
        let jpg = std::fs::read(dir.path().join("c.jpg")).unwrap();
        std::fs::remove_file(&truncated).unwrap();
        let cut = dir.path().join("d.jpg");
        std::fs::write(&cut, &jpg[..jpg.len() / 3]).unwrap();
        assert_err(
            load_image_folder(dir.path(), Fit::Exact),
            &format!("{}: cannot read image", cut.display()),
        );
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_link_loops_end_and_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = mkdir(&dir.path().join("a"));
        rgb(0, 2, 2).save(a.join("x.png")).unwrap();
        std::os::unix::fs::symlink(&a, a.join("again")).unwrap();
        std::os::unix::fs::symlink(&a, a.join("and-again")).unwrap();
        let set = load_image_folder(dir.path(), Fit::Exact).unwrap();
        assert_eq!((set.n, set.labels), (1, Some(vec![0])));
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        for k in 0..12u8 {
            let class = mkdir(&dir.path().join(format!("c{}", k % 3)));
            rgb(k, 5, 6).save(class.join(format!("{k}.png"))).unwrap();
        }
        let many = load_image_folder(dir.path(), Fit::Resize(3, 3)).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| load_image_folder(dir.path(), Fit::Resize(3, 3)))
            .unwrap();
        assert_eq!(many, one);
        assert_eq!(many.labels, Some(vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]));
    }
}
