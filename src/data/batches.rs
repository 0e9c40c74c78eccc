//! Minibatches: gathering rows by index and binarizing them.
//!
//! Binarization follows the IWAE paper's protocol: *dynamic* binarization resamples
//! `x ~ Bernoulli(pixel / 255)` for every minibatch (keyed by the optimizer step, so a resumed run
//! draws the same bits); *fixed* binarization samples once with the run seed; the test set is
//! binarized once with [`crate::rng::TEST_BINARIZATION_SEED`]. `none` feeds `pixel / 255` as
//! continuous data (for Gaussian decoders).
//!
//! A Bernoulli(p / 255) bit is drawn exactly from a 32-bit uniform `r` as `r * 255 < p * 2^32`.

use candle_core::{Device, Tensor};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use super::ImageSet;
use crate::error::Result;
use crate::rng::{stream_rng, Stream};

/// How 8-bit pixels become model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Binarization {
    /// Resample `x ~ Bernoulli(pixel / 255)` for every minibatch.
    #[default]
    Dynamic,
    /// Sample the binary images once.
    Fixed,
    /// No binarization: `x = pixel / 255`.
    None,
}

/// Rows of model inputs, stored compactly, from which minibatches are drawn.
#[derive(Debug, Clone)]
pub struct DataSource {
    dim: usize,
    n: usize,
    rows: Rows,
    seed: u64,
    /// Labels, if the data set has them.
    pub labels: Option<Vec<u8>>,
    /// Pixels uploaded once to a CUDA device for on-device binarization (dynamic rows only).
    device_pixels: std::sync::OnceLock<Tensor>,
}

#[derive(Debug, Clone)]
enum Rows {
    /// Raw pixels, binarized on the fly for every batch.
    Dynamic(Vec<u8>),
    /// Values already final: 0/1 bits or pixel bytes scaled by 1/255.
    Bytes { data: Vec<u8>, scale: f32 },
    /// Real-valued rows (synthetic sets).
    Real(Vec<f32>),
}

/// A Bernoulli(p / 255) draw from the 32-bit uniform `r`, as 0.0 or 1.0.
#[inline(always)]
fn bernoulli_bit(r: u32, p: u8) -> f32 {
    (((r as u64) * 255 < (p as u64) << 32) as u8) as f32
}

/// Draws Bernoulli(p / 255) bits for `pixels` from `rng`.
pub fn binarize(pixels: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
    pixels
        .iter()
        .map(|&p| bernoulli_bit(rng.next_u32(), p) as u8)
        .collect()
}

impl DataSource {
    /// Training rows from an image set with a binarization mode.
    pub fn from_images(set: &ImageSet, mode: Binarization, seed: u64) -> Self {
        let rows = match mode {
            Binarization::Dynamic => Rows::Dynamic(set.pixels.clone()),
            Binarization::Fixed => Rows::Bytes {
                data: binarize(&set.pixels, &mut stream_rng(seed, Stream::FixedBinarize, 0)),
                scale: 1.0,
            },
            Binarization::None => Rows::Bytes {
                data: set.pixels.clone(),
                scale: 1.0 / 255.0,
            },
        };
        DataSource {
            dim: set.dim(),
            n: set.n,
            rows,
            seed,
            labels: set.labels.clone(),
            device_pixels: std::sync::OnceLock::new(),
        }
    }

    /// Evaluation rows: binarized once with `seed` (any binarizing mode), or scaled (`None`).
    pub fn for_evaluation(set: &ImageSet, mode: Binarization, seed: u64) -> Self {
        let mode = match mode {
            Binarization::None => Binarization::None,
            _ => Binarization::Fixed,
        };
        Self::from_images(set, mode, seed)
    }

    /// Real-valued rows of dimension `dim`.
    pub fn from_real(data: Vec<f32>, dim: usize, seed: u64) -> Self {
        DataSource {
            dim,
            n: data.len() / dim.max(1),
            rows: Rows::Real(data),
            seed,
            labels: None,
            device_pixels: std::sync::OnceLock::new(),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// True when rows are binary (Bernoulli decoders apply).
    pub fn is_binary(&self) -> bool {
        matches!(self.rows, Rows::Dynamic(_) | Rows::Bytes { scale: 1.0, .. })
    }

    /// The rows `idx` as an `(idx.len(), dim)` f32 tensor; `step` keys dynamic binarization.
    ///
    /// On a CUDA device with dynamic binarization the pixels live on the device (uploaded once)
    /// and the bits are drawn there by [`crate::ops::random::binarize_rows`] from the counter
    /// stream of `(seed, Binarize, step)`: only the indices cross the bus.
    pub fn batch(&self, idx: &[u32], step: u64, device: &Device) -> Result<Tensor> {
        if let (Rows::Dynamic(pixels), true) = (&self.rows, device.is_cuda()) {
            let on_device = match self.device_pixels.get() {
                Some(t) if t.device().same_device(device) => t.clone(),
                _ => {
                    let t = Tensor::from_slice(pixels, (self.n, self.dim), device)?;
                    let _ = self.device_pixels.set(t.clone());
                    t
                }
            };
            let idx = Tensor::from_slice(idx, idx.len(), device)?;
            let key = crate::rng::stream_key(self.seed, Stream::Binarize, step);
            return Ok(crate::ops::random::binarize_rows(&on_device, &idx, key)?);
        }
        let d = self.dim;
        let mut out = Vec::with_capacity(idx.len() * d);
        match &self.rows {
            Rows::Dynamic(pixels) => {
                let mut rng = stream_rng(self.seed, Stream::Binarize, step);
                let mut uniform = vec![0u32; idx.len() * d];
                rng.fill(&mut uniform[..]);
                for (row, &i) in uniform.chunks_exact(d.max(1)).zip(idx) {
                    let px = &pixels[i as usize * d..(i as usize + 1) * d];
                    out.extend(row.iter().zip(px).map(|(&r, &p)| bernoulli_bit(r, p)));
                }
            }
            Rows::Bytes { data, scale } => {
                for &i in idx {
                    out.extend(
                        data[i as usize * d..(i as usize + 1) * d]
                            .iter()
                            .map(|&b| b as f32 * scale),
                    );
                }
            }
            Rows::Real(data) => {
                for &i in idx {
                    out.extend_from_slice(&data[i as usize * d..(i as usize + 1) * d]);
                }
            }
        }
        Ok(Tensor::from_vec(out, (idx.len(), d), device)?)
    }

    /// Contiguous rows `start..start + len` (evaluation order).
    pub fn range(&self, start: usize, len: usize, device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = (start as u32..(start + len) as u32).collect();
        self.batch(&idx, 0, device)
    }

    /// The stored bytes (0/1 or pixels), for exporting evaluation data. `None` for real rows.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.rows {
            Rows::Dynamic(p) => Some(p),
            Rows::Bytes { data, .. } => Some(data),
            Rows::Real(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binarization_has_the_right_mean_and_extremes() {
        let pixels: Vec<u8> = (0..=255u8).cycle().take(256 * 400).collect();
        let bits = binarize(&pixels, &mut stream_rng(0, Stream::Binarize, 0));
        for p in [0usize, 255] {
            assert!(bits
                .iter()
                .skip(p)
                .step_by(256)
                .all(|&b| b as usize == p / 255));
        }
        let mean_bits = bits.iter().map(|&b| b as f64).sum::<f64>() / bits.len() as f64;
        let mean_p = pixels.iter().map(|&p| p as f64 / 255.0).sum::<f64>() / pixels.len() as f64;
        assert!(
            (mean_bits - mean_p).abs() < 0.005,
            "{mean_bits} vs {mean_p}"
        );
    }

    #[test]
    fn dynamic_batches_depend_on_step_only() {
        let set = ImageSet {
            pixels: vec![128; 40],
            labels: None,
            n: 10,
            rows: 2,
            cols: 2,
        };
        let src = DataSource::from_images(&set, Binarization::Dynamic, 7);
        let a = src
            .batch(&[1, 2, 3], 5, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = src
            .batch(&[1, 2, 3], 5, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = src
            .batch(&[1, 2, 3], 6, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
