//! Minibatches: gathering rows by index and binarizing them.
//!
//! Binarization follows the IWAE paper's protocol: *dynamic* binarization resamples
//! `x ~ Bernoulli(pixel / 255)` for every minibatch (keyed by the optimizer step, so a resumed run
//! draws the same bits); *fixed* binarization samples once with the run seed; the test set is
//! binarized once with [`crate::rng::TEST_BINARIZATION_SEED`]. `none` feeds `pixel / 255` as
//! continuous data (for Gaussian decoders). *dequantize* feeds `x = (pixel + u) / 256` with
//! `u ~ U[0, 1)` drawn afresh for every minibatch (keyed by the step, like the bits), the uniform
//! dequantization of Theis et al. 2016 ("A note on the evaluation of generative models"): a
//! continuous density on `[0, 1)^D` then bounds the discrete model's log-likelihood, and
//! `bits/dim = (nll + D ln 256) / (D ln 2)` on the 8-bit pixel scale. Evaluation rows are
//! dequantized once with the evaluation seed.
//!
//! A Bernoulli(p / 255) bit is drawn exactly from a 32-bit uniform `r` as `r * 255 < p * 2^32`.

use candle_core::{Device, Tensor};
use rand::{Rng, RngCore};

use super::{ImageSet, RawImages, RealRows};
use crate::error::Result;
use crate::rng::{stream_rng, Draws, Stream};

pub use crate::config::Binarization;

/// Rows of model inputs, stored compactly, from which minibatches are drawn.
#[derive(Debug, Clone)]
pub struct DataSource {
    dim: usize,
    n: usize,
    rows: Rows,
    seed: u64,
    /// Labels, if the data set has them.
    pub labels: Option<Vec<u32>>,
    /// Evaluation rows dequantized once (stored as real rows).
    dequantized_eval: bool,
    /// Classes of the one-hot label appended to every row (0: none), for conditional models.
    one_hot: usize,
    /// Pixels uploaded once to a CUDA device for on-device binarization (dynamic rows only).
    device_pixels: std::sync::OnceLock<Tensor>,
    /// `(C, H, W)` of images flipped horizontally at random in every batch (`data.flip`).
    flip: Option<(usize, usize, usize)>,
}

#[derive(Debug, Clone)]
enum Rows {
    /// Raw pixels, binarized on the fly for every batch.
    Dynamic(Vec<u8>),
    /// Values already final: 0/1 bits or pixel bytes scaled by 1/255.
    Bytes { data: Vec<u8>, scale: f32 },
    /// Real-valued rows (synthetic sets, dequantized evaluation images).
    Real(Vec<f32>),
    /// Raw pixels, dequantized afresh for every batch.
    Dequantize(Vec<u8>),
}

/// `(pixel + u) / 256` for 32-bit uniforms `r` (`u = r / 2^32`).
#[inline(always)]
fn dequantize_value(r: u32, p: u8) -> f32 {
    ((p as f64 + r as f64 * (1.0 / 4_294_967_296.0)) / 256.0) as f32
}

/// Dequantizes `pixels` with uniforms drawn from `rng`.
pub fn dequantize(pixels: &[u8], rng: &mut impl RngCore) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| dequantize_value(rng.next_u32(), p))
        .collect()
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
    /// Training rows from a grey IDX image set with a binarization mode (as
    /// [`DataSource::from_raw`] of the same pixels in one channel).
    pub fn from_images(set: &ImageSet, mode: Binarization, seed: u64) -> Self {
        Self::from_raw(&grey(set), mode, seed)
    }

    /// Training rows from 8-bit images (`dim = C * H * W` values per row, planar) with a
    /// binarization mode.
    pub fn from_raw(set: &RawImages, mode: Binarization, seed: u64) -> Self {
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
            Binarization::Dequantize => Rows::Dequantize(set.pixels.clone()),
        };
        DataSource {
            dim: set.dim(),
            n: set.n,
            rows,
            seed,
            labels: set.labels.clone(),
            dequantized_eval: false,
            one_hot: 0,
            device_pixels: std::sync::OnceLock::new(),
            flip: None,
        }
    }

    /// Evaluation rows of a grey IDX image set (as [`DataSource::raw_for_evaluation`]).
    pub fn for_evaluation(set: &ImageSet, mode: Binarization, seed: u64) -> Self {
        Self::raw_for_evaluation(&grey(set), mode, seed)
    }

    /// Evaluation rows: binarized once with `seed` (any binarizing mode), or scaled (`None`),
    /// or dequantized once with `seed` (`Dequantize`).
    pub fn raw_for_evaluation(set: &RawImages, mode: Binarization, seed: u64) -> Self {
        let mode = match mode {
            Binarization::None => Binarization::None,
            Binarization::Dequantize => {
                let mut src = Self::from_raw(set, Binarization::None, seed);
                src.rows = Rows::Real(dequantize(
                    &set.pixels,
                    &mut stream_rng(seed, Stream::FixedBinarize, 0),
                ));
                src.dequantized_eval = true;
                return src;
            }
            _ => Binarization::Fixed,
        };
        Self::from_raw(set, mode, seed)
    }

    /// Continuous rows with their labels; `standardize` is the per-column `(mean, std)` to
    /// apply (`(x - mean) / std`), if any.
    pub fn from_rows(
        set: &RealRows,
        standardize: Option<&(Vec<f32>, Vec<f32>)>,
        seed: u64,
    ) -> Self {
        let mut values = set.values.clone();
        if let Some((mean, std)) = standardize {
            for row in values.chunks_exact_mut(set.dim.max(1)) {
                for ((v, m), s) in row.iter_mut().zip(mean).zip(std) {
                    *v = (*v - m) / s;
                }
            }
        }
        let mut src = Self::from_real(values, set.dim, seed);
        src.labels = set.labels.clone();
        src
    }

    /// Flips every row of a batch, seen as a `(C, H, W)` image, horizontally with probability
    /// 1/2, drawn from the `(seed, Flip, step)` stream (training augmentation, `data.flip`).
    ///
    /// # Errors
    /// [`crate::error::Error::Data`] when `C * H * W` is not the row width.
    pub fn with_flip(mut self, shape: (usize, usize, usize)) -> Result<Self> {
        if shape.0 * shape.1 * shape.2 != self.dim {
            return Err(crate::error::Error::Data(format!(
                "data.flip: rows of {} values are not {}x{}x{} images",
                self.dim, shape.0, shape.1, shape.2
            )));
        }
        self.flip = Some(shape);
        Ok(self)
    }

    /// Real-valued rows of dimension `dim`.
    pub fn from_real(data: Vec<f32>, dim: usize, seed: u64) -> Self {
        DataSource {
            dim,
            n: data.len() / dim.max(1),
            rows: Rows::Real(data),
            seed,
            labels: None,
            dequantized_eval: false,
            one_hot: 0,
            device_pixels: std::sync::OnceLock::new(),
            flip: None,
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

    /// Appends the one-hot label (`classes` wide) to every row a batch returns (conditional
    /// models); every row must have a label below `classes`.
    pub fn with_one_hot(mut self, classes: usize) -> Result<Self> {
        let labels = self.labels.as_ref().ok_or_else(|| {
            crate::error::Error::Data(
                "a conditional model needs labels, this data set has none".into(),
            )
        })?;
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(crate::error::Error::Data(format!(
                "label {bad} is out of range for model.classes = {classes}"
            )));
        }
        self.one_hot = classes;
        Ok(self)
    }

    /// Classes of the appended one-hot label (0: none).
    pub fn one_hot_classes(&self) -> usize {
        self.one_hot
    }

    /// The rows `idx` as an `(idx.len(), dim)` f32 tensor, followed by their one-hot labels when
    /// [`DataSource::with_one_hot`] was set; `step` keys dynamic binarization, drawn with the
    /// generator training uses on `device` ([`Draws::for_device`]).
    ///
    /// # Errors
    /// [`crate::error::Error::Data`] when an index is not below [`DataSource::len`].
    pub fn batch(&self, idx: &[u32], step: u64, device: &Device) -> Result<Tensor> {
        self.batch_drawn(idx, step, device, Draws::for_device(device))
    }

    /// [`DataSource::batch`] with the binarization bits drawn by `draws` on any device (a device
    /// check draws the GPU's bits on the CPU this way).
    pub fn batch_drawn(
        &self,
        idx: &[u32],
        step: u64,
        device: &Device,
        draws: Draws,
    ) -> Result<Tensor> {
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= self.n) {
            return Err(crate::error::Error::Data(format!(
                "row index {bad} is out of range for {} rows",
                self.n
            )));
        }
        let mut x = self.batch_values(idx, step, device, draws)?;
        if let Some(shape) = self.flip {
            x = flip_rows(&x, shape, self.seed, step)?;
        }
        if self.one_hot == 0 {
            return Ok(x);
        }
        let labels = self.labels.as_ref().expect("checked by with_one_hot");
        let rows: Vec<u32> = idx.iter().map(|&i| labels[i as usize]).collect();
        let y = super::one_hot(&rows, self.one_hot, device)?;
        Ok(Tensor::cat(&[&x, &y], 1)?)
    }

    /// The rows `idx` as an `(idx.len(), dim)` f32 tensor; `step` keys dynamic binarization.
    ///
    /// With counter draws (training on a CUDA device) and dynamic binarization the pixels live on
    /// the device (uploaded once) and the bits are drawn there by [`crate::ops::random::binarize_rows`] from the counter
    /// stream of `(seed, Binarize, step)`: only the indices cross the bus.
    fn batch_values(
        &self,
        idx: &[u32],
        step: u64,
        device: &Device,
        draws: Draws,
    ) -> Result<Tensor> {
        if let (Rows::Dynamic(pixels), Draws::Counter) = (&self.rows, draws) {
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
            Rows::Dequantize(pixels) => {
                let mut rng = stream_rng(self.seed, Stream::Binarize, step);
                let mut uniform = vec![0u32; idx.len() * d];
                rng.fill(&mut uniform[..]);
                for (row, &i) in uniform.chunks_exact(d.max(1)).zip(idx) {
                    let px = &pixels[i as usize * d..(i as usize + 1) * d];
                    out.extend(row.iter().zip(px).map(|(&r, &p)| dequantize_value(r, p)));
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

    /// The rows `idx` without random draws, one-hot labels or flips: `idx.len() * dim` values,
    /// raw pixels (dynamically binarized or dequantized sources) as `pixel / 255`, every other
    /// kind as stored (scaled pixels, fixed bits, real rows).
    ///
    /// # Errors
    /// [`crate::error::Error::Data`] for an index out of range.
    pub fn plain_rows(&self, idx: &[usize]) -> Result<Vec<f32>> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.n) {
            return Err(crate::error::Error::Data(format!(
                "row index {bad} is out of range for {} rows",
                self.n
            )));
        }
        let d = self.dim;
        let mut out = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            let range = i * d..(i + 1) * d;
            match &self.rows {
                Rows::Dynamic(px) | Rows::Dequantize(px) => {
                    out.extend(px[range].iter().map(|&p| p as f32 / 255.0));
                }
                Rows::Bytes { data, scale } => {
                    out.extend(data[range].iter().map(|&b| b as f32 * scale));
                }
                Rows::Real(data) => out.extend_from_slice(&data[range]),
            }
        }
        Ok(out)
    }

    /// The per-dimension mean of the rows' data values (`dim` values, a conditional model's
    /// one-hot labels left out), in model-input units: for dynamically binarized rows
    /// `pixel / 255`, the expected value of the bits; for dequantized rows `(pixel + 0.5) / 256`.
    /// Summed in f64. All zeros for an empty source.
    pub fn column_means(&self) -> Vec<f64> {
        let (d, n) = (self.dim, self.n);
        let values: Box<dyn Iterator<Item = f64> + '_> = match &self.rows {
            Rows::Dynamic(p) => Box::new(p.iter().map(|&v| v as f64 / 255.0)),
            Rows::Bytes { data, scale } => {
                let scale = *scale as f64;
                Box::new(data.iter().map(move |&v| v as f64 * scale))
            }
            Rows::Real(x) => Box::new(x.iter().map(|&v| v as f64)),
            Rows::Dequantize(p) => Box::new(p.iter().map(|&v| (v as f64 + 0.5) / 256.0)),
        };
        let mut sum = vec![0f64; d];
        for (i, v) in values.take(n * d).enumerate() {
            sum[i % d] += v;
        }
        sum.iter().map(|s| s / n.max(1) as f64).collect()
    }

    /// True when rows are dequantized 8-bit pixels (densities on `[0, 1)^D`).
    pub fn is_dequantized(&self) -> bool {
        matches!(self.rows, Rows::Dequantize(_)) || self.dequantized_eval
    }

    /// The stored bytes (0/1 or pixels), for exporting evaluation data. `None` for real rows.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.rows {
            Rows::Dynamic(p) | Rows::Dequantize(p) => Some(p),
            Rows::Bytes { data, .. } => Some(data),
            Rows::Real(_) => None,
        }
    }
}

/// One channel of a grey IDX image set.
fn grey(set: &ImageSet) -> RawImages {
    RawImages {
        pixels: set.pixels.clone(),
        n: set.n,
        channels: 1,
        height: set.rows,
        width: set.cols,
        labels: set
            .labels
            .as_ref()
            .map(|l| l.iter().map(|&v| v as u32).collect()),
        classes: Vec::new(),
    }
}

/// Rows `x` `(B, C*H*W)` with each row's image flipped horizontally when a bit of the
/// `(seed, Flip, step)` stream says so (probability 1/2).
fn flip_rows(x: &Tensor, (c, h, w): (usize, usize, usize), seed: u64, step: u64) -> Result<Tensor> {
    let b = x.dim(0)?;
    let mut rng = stream_rng(seed, Stream::Flip, step);
    let mask: Vec<f32> = (0..b).map(|_| (rng.next_u32() >> 31) as f32).collect();
    let mask = Tensor::from_vec(mask, (b, 1), x.device())?;
    let rev: Vec<u32> = (0..w as u32).rev().collect();
    let rev = Tensor::from_vec(rev, w, x.device())?;
    let flipped = x
        .reshape((b, c, h, w))?
        .index_select(&rev, 3)?
        .reshape((b, c * h * w))?;
    let keep = (1.0 - &mask)?;
    Ok((x.broadcast_mul(&keep)? + flipped.broadcast_mul(&mask)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_reverse_columns_of_every_channel_and_depend_on_the_step() {
        // 8 images of 2 channels x 1 row x 3 columns.
        let set = RawImages {
            pixels: (0..8u8).flat_map(|i| [i, 1, 2, 3, 4, 5]).collect(),
            n: 8,
            channels: 2,
            height: 1,
            width: 3,
            labels: None,
            classes: Vec::new(),
        };
        let src = DataSource::from_raw(&set, Binarization::None, 5)
            .with_flip((2, 1, 3))
            .unwrap();
        let idx: Vec<u32> = (0..8).collect();
        let rows = |step| {
            src.batch(&idx, step, &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let a = rows(1);
        let s = 1.0 / 255.0;
        let mut flipped = 0;
        for (i, r) in a.iter().enumerate() {
            let plain = [i as f32 * s, s, 2.0 * s, 3.0 * s, 4.0 * s, 5.0 * s];
            let mirror = [2.0 * s, s, i as f32 * s, 5.0 * s, 4.0 * s, 3.0 * s];
            assert!(r[..] == plain || r[..] == mirror, "{r:?}");
            flipped += (r[..] == mirror && i != 2) as usize;
        }
        assert!(flipped > 0 && flipped < 8, "{flipped} of 8 flipped");
        assert_eq!(a, rows(1));
        assert!((2..6).any(|step| rows(step) != a));
        assert!(DataSource::from_raw(&set, Binarization::None, 5)
            .with_flip((1, 1, 5))
            .is_err());
    }

    #[test]
    fn standardized_rows_have_zero_mean_and_keep_labels() {
        let set = RealRows {
            values: vec![1.0, 10.0, 3.0, 30.0],
            n: 2,
            dim: 2,
            labels: Some(vec![1, 0]),
        };
        let stats = (vec![2.0, 20.0], vec![1.0, 10.0]);
        let src = DataSource::from_rows(&set, Some(&stats), 0);
        let x = src
            .range(0, 2, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(x, vec![vec![-1.0, -1.0], vec![1.0, 1.0]]);
        assert_eq!(src.labels, Some(vec![1, 0]));
    }

    #[test]
    fn column_means_are_in_model_input_units() {
        // Two 2-pixel images: (0, 255) and (255, 51).
        let set = image_set(vec![0, 255, 255, 51], 2, 1, 2);
        let close = |got: Vec<f64>, want: [f64; 2]| {
            assert!(
                got.len() == 2 && got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-7),
                "{got:?} != {want:?}"
            )
        };
        let mean = |mode| DataSource::from_images(&set, mode, 1).column_means();
        close(mean(Binarization::Dynamic), [0.5, 0.6]);
        close(mean(Binarization::None), [0.5, 0.6]);
        close(
            mean(Binarization::Dequantize),
            [(0.5 + 255.5) / 512.0, (255.5 + 51.5) / 512.0],
        );
        let real = DataSource::from_real(vec![1.0, 2.0, 3.0, 6.0], 2, 0).column_means();
        close(real, [2.0, 4.0]);
    }

    /// An unlabelled image set of `n` images of `rows x cols` pixels.
    fn image_set(pixels: Vec<u8>, n: usize, rows: usize, cols: usize) -> ImageSet {
        ImageSet {
            pixels,
            labels: None,
            n,
            rows,
            cols,
        }
    }

    #[test]
    fn a_row_index_out_of_range_is_a_data_error_on_every_path() {
        // It used to panic on the CPU (a slice out of range) and read past the pixels on a GPU.
        let set = image_set(vec![7; 3 * 4], 3, 2, 2);
        for mode in [
            Binarization::Dynamic,
            Binarization::Fixed,
            Binarization::None,
            Binarization::Dequantize,
        ] {
            let src = DataSource::from_images(&set, mode, 1);
            for draws in [Draws::Host, Draws::Counter] {
                let e = src
                    .batch_drawn(&[0, 3], 0, &Device::Cpu, draws)
                    .unwrap_err();
                assert!(e.to_string().contains("row index 3"), "{e}");
                assert!(src.batch_drawn(&[2, 0], 0, &Device::Cpu, draws).is_ok());
            }
        }
    }

    #[test]
    fn counter_draws_on_the_cpu_are_the_gpu_kernels_reference() {
        // Dynamic binarization with the counter generator on the CPU gives exactly the bits of
        // ops::random::binarize_rows (what cuda/random.cu computes), keyed like training.
        let set = image_set((0..=255u8).cycle().take(5 * 30).collect(), 5, 5, 6);
        let src = DataSource::from_images(&set, Binarization::Dynamic, 11);
        let got = src
            .batch_drawn(&[4, 1, 1], 9, &Device::Cpu, Draws::Counter)
            .unwrap();
        let px = Tensor::from_slice(&set.pixels, (5, 30), &Device::Cpu).unwrap();
        let idx = Tensor::from_slice(&[4u32, 1, 1], 3, &Device::Cpu).unwrap();
        let key = crate::rng::stream_key(11, Stream::Binarize, 9);
        let want = crate::ops::random::binarize_rows(&px, &idx, key).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

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
        let set = image_set(vec![128; 40], 10, 2, 2);
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

    #[test]
    fn dequantized_values_stay_inside_their_pixel_bin() {
        let pixels: Vec<u8> = (0..=255u8).collect();
        let set = image_set(pixels.clone(), 16, 4, 4);
        let src = DataSource::from_images(&set, Binarization::Dequantize, 3);
        let idx: Vec<u32> = (0..16).collect();
        let x = src.batch(&idx, 9, &Device::Cpu).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut frac = 0f64;
        for (v, p) in x.iter().zip(&pixels) {
            let lo = *p as f32 / 256.0;
            assert!(*v >= lo && *v <= lo + 1.0 / 256.0, "{v} outside bin of {p}");
            frac += (*v as f64 * 256.0 - *p as f64) / 256.0;
        }
        // The offsets are uniform on [0, 1): mean 0.5 (sd of the mean 0.018 for 256 values).
        assert!((frac - 0.5).abs() < 0.08, "mean offset {frac}");
        let again = src.batch(&idx, 10, &Device::Cpu).unwrap();
        assert_ne!(x, again.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(!src.is_binary() && src.is_dequantized());
    }
}
