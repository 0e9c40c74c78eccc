//! Images a person looks at: prior samples, reconstructions beside their inputs, and latent
//! interpolations (decoded along the straight line between two posterior means). A conditional
//! model's prior samples form a class-conditional grid: row `c` holds samples given label `c`.

use std::path::Path;

use candle_core::Tensor;

use crate::data::DataSource;
use crate::error::Result;
use crate::models::Vae;
use crate::report::png::{write_grid, write_image_grid};
use crate::rng::{stream_rng, Stream};
use crate::session::ImageShape;

fn rows_of(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

fn per_row(n: usize) -> usize {
    (n as f64).sqrt().ceil() as usize
}

/// `n` samples from the model's prior, decoded to their means.
pub fn write_samples(
    model: &Vae,
    path: &Path,
    n: usize,
    seed: u64,
    index: u64,
    shape: ImageShape,
) -> Result<()> {
    if !crate::session::is_image(shape) {
        return Ok(()); // 2-D data: nothing to draw as images
    }
    let mut rng = stream_rng(seed, Stream::Sample, index);
    if model.classes > 0 {
        let per_class = n.div_ceil(model.classes).max(1);
        let rows = per_class * model.classes;
        let z = model.sample_z1(rows, &mut rng)?;
        let labels: Vec<u32> = (0..rows).map(|r| (r / per_class) as u32).collect();
        let y = crate::data::one_hot(&labels, model.classes, model.device())?;
        let images = rows_of(&model.decode_mean(&z, Some(&y))?)?;
        return write_image_grid(path, &images, shape, per_class, 2);
    }
    let z = model.sample_z1(n, &mut rng)?;
    let images = rows_of(&model.decode_mean(&z, None)?)?;
    write_image_grid(path, &images, shape, per_row(n), 2)
}

/// `n` flow samples as an image grid, or for a 2-D flow its density on `extent^2` as a
/// 256 x 256 gray-level map (brighter is denser, scaled to the maximum).
pub fn write_flow_samples(
    flow: &crate::models::Flow,
    path: &Path,
    n: usize,
    seed: u64,
    index: u64,
    shape: ImageShape,
    extent: (f32, f32),
) -> Result<()> {
    if !crate::session::is_image(shape) {
        if flow.dim != 2 {
            return Ok(()); // rows of more than 2 values: nothing to draw
        }
        let density = flow.density_grid(256, extent.0, extent.1)?;
        let max = density
            .iter()
            .copied()
            .fold(0f32, f32::max)
            .max(f32::MIN_POSITIVE);
        let image: Vec<f32> = density.iter().map(|v| v / max).collect();
        return write_grid(path, &[image], 256, 256, 1, 1);
    }
    let x = flow.sample_data(n, &mut stream_rng(seed, Stream::Sample, index))?;
    write_image_grid(path, &rows_of(&x)?, shape, per_row(n), 2)
}

/// The first `n` images of `data` (left) next to their reconstructions from the posterior mean.
pub fn write_reconstructions(
    model: &Vae,
    data: &DataSource,
    path: &Path,
    n: usize,
    shape: ImageShape,
) -> Result<()> {
    let n = n.min(data.len());
    let input = data.range(0, n, model.device())?;
    let (x, y) = model.split_input(&input)?;
    let (mu, _) = model.encode(&input)?;
    let rec = rows_of(&model.decode_mean(&mu, y.as_ref())?)?;
    let inputs = rows_of(&x)?;
    let mut images = Vec::with_capacity(2 * n);
    for (a, b) in inputs.into_iter().zip(rec) {
        images.push(a);
        images.push(b);
    }
    write_image_grid(path, &images, shape, 2 * reconstruction_pairs_per_row(n), 2)
}

/// Pairs (image, reconstruction) per grid row for `n` pairs: at most 8, spread evenly over the
/// rows needed, so that no column stays empty (4 pairs: one row of 4; 9: two rows of 5).
fn reconstruction_pairs_per_row(n: usize) -> usize {
    let rows = n.div_ceil(8).max(1);
    n.div_ceil(rows).max(1)
}

/// `pairs` rows, each decoding `steps` points between the posterior means of two test images.
pub fn write_interpolation(
    model: &Vae,
    data: &DataSource,
    path: &Path,
    pairs: usize,
    steps: usize,
    shape: ImageShape,
) -> Result<()> {
    let pairs = pairs.min(data.len() / 2).max(1);
    let input = data.range(0, 2 * pairs, model.device())?;
    let (_, y) = model.split_input(&input)?;
    let (mu, _) = model.encode(&input)?;
    let mut images = Vec::with_capacity(pairs * steps);
    for p in 0..pairs {
        let a = mu.get(2 * p)?;
        let b = mu.get(2 * p + 1)?;
        let zs: Vec<Tensor> = (0..steps)
            .map(|i| {
                let t = i as f64 / (steps.max(2) - 1) as f64;
                ((&a * (1.0 - t))? + (&b * t)?)?.unsqueeze(0)
            })
            .collect::<candle_core::Result<_>>()?;
        // A conditional model interpolates given the first image's label.
        let y_pair = y
            .as_ref()
            .map(|y| y.get(2 * p)?.unsqueeze(0)?.repeat((steps, 1)))
            .transpose()?;
        images.extend(rows_of(
            &model.decode_mean(&Tensor::cat(&zs, 0)?, y_pair.as_ref())?,
        )?);
    }
    write_image_grid(path, &images, shape, steps, 2)
}

/// Samples of any model: a grid of `n` images (for a conditional model one column per class,
/// `n` rounded up to whole rows), or for 2-D data a 256 x 256 map of where 20,000 samples fall
/// (log-scaled counts, brighter is denser) over the data set's extent.
pub fn write_model_samples(
    model: &crate::session::Model,
    cfg: &crate::config::Config,
    path: &Path,
    n: usize,
    index: u64,
    shape: ImageShape,
) -> Result<()> {
    let mut rng = stream_rng(cfg.train.seed, Stream::Sample, index);
    if !crate::session::is_image(shape) {
        if model.input_dim() != 2 {
            return Ok(()); // rows of more than 2 values: nothing to draw
        }
        let extent = cfg
            .data
            .synthetic()
            .map(|s| s.extent())
            .unwrap_or((-6.0, 6.0));
        let pts = rows_of(&model.sample(20_000, &mut rng)?)?;
        return write_grid(path, &[point_map(&pts, 256, extent)], 256, 256, 1, 1);
    }
    // A conditional model's sample i has label i mod C: C per row puts each digit in a column.
    let classes = model.classes();
    let (n, per_row) = if classes > 0 {
        (n.div_ceil(classes) * classes, classes)
    } else {
        (n, per_row(n))
    };
    let x = model.sample(n, &mut rng)?;
    write_image_grid(path, &rows_of(&x)?, shape, per_row, 2)
}

/// A diffusion model's denoising trajectories with sampler `s`: `n` rows of 10 images, the
/// states at 10 evenly spaced points of the reverse process from `x_T` (left) to the sample
/// (right), in data space (clamped to `[0, 1]`).
pub fn write_trajectory(
    model: &crate::models::Diffusion,
    s: &crate::models::diffusion::SamplerSettings,
    path: &Path,
    n: usize,
    seed: u64,
    shape: ImageShape,
) -> Result<()> {
    let mut rng = stream_rng(seed, Stream::Sample, 0);
    let mut states = Vec::new();
    model.sample_with(n, s, &mut rng, Some(&mut states))?;
    let last = states.len() - 1;
    let cols = 10.min(states.len());
    let picks: Vec<usize> = (0..cols)
        .map(|i| {
            if cols == 1 {
                last
            } else {
                i * last / (cols - 1)
            }
        })
        .collect();
    let mut images = Vec::with_capacity(n * cols);
    let frames = picks
        .iter()
        .map(|&i| rows_of(&model.to_data_space(&states[i])?))
        .collect::<Result<Vec<_>>>()?;
    for r in 0..n {
        for f in &frames {
            images.push(f[r].clone());
        }
    }
    write_image_grid(path, &images, shape, cols, 2)
}

/// Log-scaled counts of 2-D points on a `size x size` grid over `extent^2` (row 0 at the top),
/// normalized to [0, 1].
pub fn point_map(points: &[Vec<f32>], size: usize, extent: (f32, f32)) -> Vec<f32> {
    let mut counts = vec![0f32; size * size];
    let scale = size as f32 / (extent.1 - extent.0);
    for p in points {
        let c = ((p[0] - extent.0) * scale).floor();
        let r = ((extent.1 - p[1]) * scale).floor();
        if c >= 0.0 && r >= 0.0 && (c as usize) < size && (r as usize) < size {
            counts[r as usize * size + c as usize] += 1.0;
        }
    }
    let max = counts.iter().copied().fold(0f32, f32::max);
    let norm = (1.0 + max).ln().max(f32::MIN_POSITIVE);
    counts.iter().map(|c| (1.0 + c).ln() / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstruction_grids_fit_the_count() {
        for (n, per_row) in [(1, 1), (4, 4), (8, 8), (9, 5), (16, 8), (17, 6), (64, 8)] {
            assert_eq!(reconstruction_pairs_per_row(n), per_row, "n = {n}");
            // Never a whole empty column, never a whole empty row.
            let rows = n.div_ceil(per_row);
            assert!(rows * per_row - n < per_row, "n = {n}");
            assert!(per_row <= n);
        }
    }
}
