//! PNG image grids: samples, reconstructions beside their inputs, latent interpolations.

use std::path::Path;

use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::error::{Error, Result};

/// Writes `images` (each `rows * cols` values in [0, 1], row-major) as a grid with `per_row`
/// images per row and a 2-pixel gray border, scaled up `scale` times.
pub fn write_grid(
    path: &Path,
    images: &[Vec<f32>],
    rows: usize,
    cols: usize,
    per_row: usize,
    scale: u32,
) -> Result<()> {
    if images.is_empty() || per_row == 0 {
        return Err(Error::Data("no images to write".into()));
    }
    let pad = 2usize;
    let grid_rows = images.len().div_ceil(per_row);
    let w = per_row * (cols + pad) + pad;
    let h = grid_rows * (rows + pad) + pad;
    let mut img = GrayImage::from_pixel((w as u32) * scale, (h as u32) * scale, Luma([128]));
    for (n, im) in images.iter().enumerate() {
        let (gy, gx) = (n / per_row, n % per_row);
        for r in 0..rows {
            for c in 0..cols {
                let v = (im[r * cols + c].clamp(0.0, 1.0) * 255.0).round() as u8;
                let (x0, y0) = (
                    (pad + gx * (cols + pad) + c) as u32,
                    (pad + gy * (rows + pad) + r) as u32,
                );
                for dy in 0..scale {
                    for dx in 0..scale {
                        img.put_pixel(x0 * scale + dx, y0 * scale + dy, Luma([v]));
                    }
                }
            }
        }
    }
    save(path, img)
}

/// Writes `images` of shape `(channels, rows, cols)` (planar, values in [0, 1]) as a grid:
/// [`write_grid`] for one channel, an RGB PNG with the same layout (a gray border) for three.
///
/// # Errors
/// [`Error::Data`] for no images, another channel count than 1 or 3, or a file that cannot be
/// written.
pub fn write_image_grid(
    path: &Path,
    images: &[Vec<f32>],
    (channels, rows, cols): (usize, usize, usize),
    per_row: usize,
    scale: u32,
) -> Result<()> {
    match channels {
        1 => return write_grid(path, images, rows, cols, per_row, scale),
        3 => {}
        c => return Err(Error::Data(format!("cannot draw images of {c} channels"))),
    }
    if images.is_empty() || per_row == 0 {
        return Err(Error::Data("no images to write".into()));
    }
    let pad = 2usize;
    let grid_rows = images.len().div_ceil(per_row);
    let w = (per_row * (cols + pad) + pad) as u32;
    let h = (grid_rows * (rows + pad) + pad) as u32;
    let mut img = RgbImage::from_pixel(w * scale, h * scale, Rgb([128, 128, 128]));
    let plane = rows * cols;
    for (n, im) in images.iter().enumerate() {
        let (gy, gx) = (n / per_row, n % per_row);
        for r in 0..rows {
            for c in 0..cols {
                let v = |ch: usize| {
                    (im[ch * plane + r * cols + c].clamp(0.0, 1.0) * 255.0).round() as u8
                };
                let px = Rgb([v(0), v(1), v(2)]);
                let x0 = (pad + gx * (cols + pad) + c) as u32;
                let y0 = (pad + gy * (rows + pad) + r) as u32;
                for dy in 0..scale {
                    for dx in 0..scale {
                        img.put_pixel(x0 * scale + dx, y0 * scale + dy, px);
                    }
                }
            }
        }
    }
    save(path, img)
}

/// Saves `img` as a PNG at `path`, creating its folder.
fn save<P>(path: &Path, img: image::ImageBuffer<P, Vec<u8>>) -> Result<()>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    img.save(path)
        .map_err(|e| Error::Data(format!("{}: cannot write PNG: {e}", path.display())))
}
