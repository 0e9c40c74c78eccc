//! Images a person looks at: prior samples, reconstructions beside their inputs, and latent
//! interpolations (decoded along the straight line between two posterior means).

use std::path::Path;

use candle_core::Tensor;

use crate::data::DataSource;
use crate::error::Result;
use crate::models::Vae;
use crate::report::png::write_grid;
use crate::rng::{stream_rng, Stream};

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
    shape: (usize, usize),
) -> Result<()> {
    if shape.0 == 1 {
        return Ok(()); // 2-D data: nothing to draw as images
    }
    let z = model.sample_z1(n, &mut stream_rng(seed, Stream::Sample, index))?;
    let images = rows_of(&model.decode_mean(&z)?)?;
    write_grid(path, &images, shape.0, shape.1, per_row(n), 2)
}

/// The first `n` images of `data` (left) next to their reconstructions from the posterior mean.
pub fn write_reconstructions(
    model: &Vae,
    data: &DataSource,
    path: &Path,
    n: usize,
    shape: (usize, usize),
) -> Result<()> {
    let n = n.min(data.len());
    let x = data.range(0, n, model.device())?;
    let (mu, _) = model.encode(&x)?;
    let rec = rows_of(&model.decode_mean(&mu)?)?;
    let inputs = rows_of(&x)?;
    let mut images = Vec::with_capacity(2 * n);
    for (a, b) in inputs.into_iter().zip(rec) {
        images.push(a);
        images.push(b);
    }
    write_grid(path, &images, shape.0, shape.1, 16, 2)
}

/// `pairs` rows, each decoding `steps` points between the posterior means of two test images.
pub fn write_interpolation(
    model: &Vae,
    data: &DataSource,
    path: &Path,
    pairs: usize,
    steps: usize,
    shape: (usize, usize),
) -> Result<()> {
    let pairs = pairs.min(data.len() / 2).max(1);
    let x = data.range(0, 2 * pairs, model.device())?;
    let (mu, _) = model.encode(&x)?;
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
        images.extend(rows_of(&model.decode_mean(&Tensor::cat(&zs, 0)?)?)?);
    }
    write_grid(path, &images, shape.0, shape.1, steps, 2)
}
