//! Keyed random streams. Every random draw of a run comes from a ChaCha8 generator whose key is
//! derived from `(run seed, stream, index)` (SplitMix64 mixing), where the index is the epoch for
//! data order and the global optimizer step for binarization and reparameterization noise.
//! A run resumed at any step therefore draws exactly what the uninterrupted run would have drawn,
//! with no generator state to save beyond the seed and the step.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The independent random streams of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Parameter initialization.
    Init = 1,
    /// Per-epoch permutation of the training set.
    Shuffle = 2,
    /// Per-step dynamic binarization.
    Binarize = 3,
    /// Per-step reparameterization noise.
    Noise = 4,
    /// One-off fixed binarization of the training set.
    FixedBinarize = 5,
    /// Evaluation noise (importance samples).
    Eval = 6,
    /// Sampling for images written to disk.
    Sample = 7,
    // 8 and 12 were a train/validation split and initial spectral-norm vectors, neither drawn
    // from a stream of its own (the split is fixed rows of the training set, the vectors come
    // from `Init`); the numbers stay retired so every other stream keeps its key.
    /// Synthetic data generation.
    Synthetic = 9,
    /// GAN generator noise for the generator's own update (the discriminator's fakes use `Noise`).
    GeneratorNoise = 10,
    /// Interpolation points of the WGAN gradient penalty.
    Penalty = 11,
    /// Sample-quality metrics: the feature classifier's initialization and shuffling, and the
    /// subsets the metrics compare.
    Metrics = 13,
    /// The diffusion family's time steps `t` (training and the bound's Monte-Carlo estimate).
    Timestep = 14,
    /// The seeded train/test split of a user data set that has no test split of its own.
    DataSplit = 15,
    /// Per-step horizontal flips of training images (`data.flip`).
    Flip = 16,
}

/// Which generator draws a training step's per-row randomness: the dynamic binarization bits
/// and the reparameterization noise. Both are keyed by `(seed, stream, step)`; they differ in the
/// generator, so a device check must make both sides draw with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draws {
    /// ChaCha8 streams on the host ([`stream_rng`]): CPU training, and every figure published
    /// from CPU runs.
    Host,
    /// Counter-based draws ([`counter_u64`], [`counter_normal`]) made where the tensors live:
    /// CUDA training, with no host work or transfer (`cuda/random.cu`; the CPU forwards of
    /// `ops::random` are the reference).
    Counter,
}

impl Draws {
    /// The generator training uses on `device`: `Host` on the CPU, `Counter` elsewhere.
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Draws::Host
        } else {
            Draws::Counter
        }
    }
}

/// The seed with which every test set is binarized, independent of the run seed, so that
/// models trained with different seeds are evaluated on the same binary images.
pub const TEST_BINARIZATION_SEED: u64 = 0x6765_6e74_7261_696e; // "gentrain"

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit key of `(seed, stream, index)`.
pub fn stream_key(seed: u64, stream: Stream, index: u64) -> u64 {
    splitmix64(seed) ^ splitmix64(stream as u64 ^ 0xa5a5_a5a5) ^ splitmix64(index.rotate_left(17))
}

/// Counter-based draw `counter` of the stream `key`: `splitmix64(key ^ splitmix64(counter))`.
/// The device kernels (`cuda/random.cu`) compute the same function, so device-drawn bits and
/// noise are keyed exactly like the host's and can be checked against this reference.
#[inline(always)]
pub fn counter_u64(key: u64, counter: u64) -> u64 {
    splitmix64(key ^ splitmix64(counter))
}

/// Standard normal number `i` of the counter stream `key` (Box-Muller on draws `2i`, `2i + 1`).
#[inline(always)]
pub fn counter_normal(key: u64, i: u64) -> f32 {
    let u1 = ((counter_u64(key, 2 * i) >> 40) + 1) as f32 * (1.0 / 16_777_216.0);
    let u2 = (counter_u64(key, 2 * i + 1) >> 40) as f32 * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// The generator for `(seed, stream, index)`.
pub fn stream_rng(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    let mut state = stream_key(seed, stream, index);
    for chunk in key.chunks_mut(8) {
        state = splitmix64(state);
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniformly random permutation of `0..n` (Fisher-Yates) for epoch `epoch`.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<u32> = (0..n as u32).collect();
    idx.shuffle(&mut stream_rng(seed, Stream::Shuffle, epoch));
    idx
}

/// `n` standard-normal draws.
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: u64 = stream_rng(1, Stream::Noise, 5).random();
        let b: u64 = stream_rng(1, Stream::Noise, 5).random();
        let c: u64 = stream_rng(1, Stream::Noise, 6).random();
        let d: u64 = stream_rng(1, Stream::Binarize, 5).random();
        let e: u64 = stream_rng(2, Stream::Noise, 5).random();
        assert_eq!(a, b);
        assert!(a != c && a != d && a != e && c != d);
    }

    #[test]
    fn counter_normals_have_unit_moments() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n)
            .map(|i| counter_normal(stream_key(1, Stream::Noise, 3), i) as f64)
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01 && (kurt - 3.0).abs() < 0.05,
            "{mean} {var} {kurt}"
        );
        assert!(xs.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = epoch_permutation(3, 0, 1000);
        assert_ne!(p, epoch_permutation(3, 1, 1000));
        p.sort();
        assert_eq!(p, (0..1000).collect::<Vec<u32>>());
    }
}
