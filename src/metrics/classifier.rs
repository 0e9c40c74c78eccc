//! The feature extractor of the sample metrics: a small MNIST classifier that gentrain trains
//! itself, deterministically, the first time a metric needs it, and caches next to the data.
//!
//! Architecture: MLP 784-512-256-10 with ReLU, trained with Adam (lr 1e-3, batch 128) for
//! [`EPOCHS`] epochs on the training images scaled to `[0, 1]` (about 98% test accuracy). The
//! 256 penultimate ReLU activations are the features of the Frechet distance ("MNIST-FID"); the
//! softmax output is `p(y|x)` for the Inception-Score analogue and the class histogram. Being a
//! different network from Inception-v3, its numbers are comparable only with each other.
//!
//! The cache file name carries a fingerprint of the training images and labels and the
//! architecture version, so a different data set never reuses a stale classifier. When the data
//! folder is read-only the classifier is trained in memory and not cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use crate::config::OptimConfig;
use crate::data::images::{ImageSet, Split};
use crate::error::{Error, Result};
use crate::models::mlp::{Dense, Trunk};
use crate::models::params::ParamStore;
use crate::ops::linear::Activation;
use crate::optim::Optimizer;
use crate::rng::{stream_rng, Stream};

/// Training epochs.
pub const EPOCHS: usize = 4;
/// Width of the feature layer.
pub const FEATURES: usize = 256;
/// Bumped whenever the architecture or the training recipe changes.
const VERSION: u32 = 1;
const BATCH: usize = 128;
/// Seed of the initialization and the shuffles (fixed: the classifier is part of the metric).
const SEED: u64 = 20_171_207;

/// The trained classifier.
#[derive(Debug, Clone)]
pub struct Classifier {
    store: ParamStore,
    trunk: Trunk,
    out: Dense,
    /// Values per input row.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// Accuracy on the test split it was trained next to.
    pub test_accuracy: f64,
}

/// 64-bit FNV-1a over the pixels, labels and shape of an image set.
pub fn fingerprint(set: &ImageSet) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for v in [set.n, set.rows, set.cols] {
        v.to_le_bytes().into_iter().for_each(&mut eat);
    }
    set.pixels.iter().copied().for_each(&mut eat);
    set.labels.iter().flatten().copied().for_each(&mut eat);
    h
}

/// The cache file of the classifier for `train` in `dir`.
pub fn cache_path(dir: &Path, train: &ImageSet) -> PathBuf {
    dir.join(format!(
        "gentrain-classifier-v{VERSION}-{:016x}.safetensors",
        fingerprint(train)
    ))
}

/// Rows of `set` scaled to `[0, 1]`, as a tensor.
pub fn scaled(set: &ImageSet, start: usize, len: usize) -> Result<Tensor> {
    let d = set.dim();
    let v: Vec<f32> = set.pixels[start * d..(start + len) * d]
        .iter()
        .map(|&p| p as f32 / 255.0)
        .collect();
    Ok(Tensor::from_vec(v, (len, d), &Device::Cpu)?)
}

impl Classifier {
    fn fresh(dim: usize, classes: usize) -> Result<Self> {
        let mut rng = stream_rng(SEED, Stream::Metrics, 0);
        let mut store = ParamStore::new(Device::Cpu);
        let trunk = Trunk::new(
            &mut store,
            "classifier",
            dim,
            &[512, FEATURES],
            Activation::Relu,
            &mut rng,
        )?;
        let out = Dense::new(
            &mut store,
            "classifier.net.4",
            FEATURES,
            classes,
            Activation::Identity,
            &mut rng,
        )?;
        Ok(Classifier {
            store,
            trunk,
            out,
            dim,
            classes,
            test_accuracy: 0.0,
        })
    }

    /// Loads the cached classifier of the data in `dir`, or trains and caches it.
    pub fn for_data_dir(dir: &Path) -> Result<Self> {
        Self::for_training_set(dir, &ImageSet::load(dir, Split::Train)?)
    }

    /// [`Classifier::for_data_dir`] with the training split of `dir` already loaded.
    pub fn for_training_set(dir: &Path, train: &ImageSet) -> Result<Self> {
        let path = cache_path(dir, train);
        let classes = train.num_classes();
        if classes < 2 {
            return Err(Error::Data(format!(
                "{}: the metric classifier needs labelled training images of at least 2 classes",
                dir.display()
            )));
        }
        if path.is_file() {
            return Self::load(&path, train.dim(), classes);
        }
        let test = ImageSet::load(dir, Split::Test)?;
        tracing::info!(
            "training the metric classifier on {} images ({EPOCHS} epochs); cached at {}",
            train.n,
            path.display()
        );
        let c = Self::train(train, &test)?;
        if let Err(e) = c.save(&path) {
            tracing::warn!("could not cache the metric classifier: {e}");
        }
        Ok(c)
    }

    /// Trains a classifier on `train` and measures it on `test`.
    pub fn train(train: &ImageSet, test: &ImageSet) -> Result<Self> {
        let labels = train
            .labels
            .as_ref()
            .ok_or_else(|| Error::Data("the metric classifier needs labels".into()))?;
        let mut c = Self::fresh(train.dim(), train.num_classes())?;
        let mut opt = Optimizer::new(&OptimConfig::default(), &c.store)?;
        let mut order: Vec<usize> = (0..train.n).collect();
        let d = train.dim();
        for epoch in 0..EPOCHS {
            order.shuffle(&mut stream_rng(SEED, Stream::Metrics, 1 + epoch as u64));
            for idx in order.chunks(BATCH) {
                let mut x = Vec::with_capacity(idx.len() * d);
                for &i in idx {
                    x.extend(train.image(i).iter().map(|&p| p as f32 / 255.0));
                }
                let x = Tensor::from_vec(x, (idx.len(), d), &Device::Cpu)?;
                let y: Vec<u32> = idx.iter().map(|&i| labels[i] as u32).collect();
                let y = Tensor::from_vec(y, idx.len(), &Device::Cpu)?;
                let loss = candle_nn::loss::cross_entropy(&c.logits(&x)?, &y)?;
                let grads = loss.backward()?;
                opt.step(&grads, 1e-3, None)?;
            }
        }
        c.test_accuracy = c.accuracy(test)?;
        Ok(c)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.trunk.forward(x)?)
    }

    /// Features (`n x 256`) and class probabilities (`n x C`) of rows in `[0, 1]`, computed on
    /// the CPU in chunks.
    pub fn features_and_probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, d) = x.dims2()?;
        if d != self.dim {
            return Err(Error::Data(format!(
                "the metric classifier takes rows of {} values, got {d}",
                self.dim
            )));
        }
        let x = x
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?;
        let (mut feats, mut probs) = (Vec::new(), Vec::new());
        for start in (0..n).step_by(2000) {
            let len = 2000.min(n - start);
            let h = self.trunk.forward(&x.narrow(0, start, len)?)?;
            probs.push(candle_nn::ops::softmax_last_dim(&self.out.forward(&h)?)?);
            feats.push(h);
        }
        Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&probs, 0)?))
    }

    /// Share of `set` classified correctly.
    pub fn accuracy(&self, set: &ImageSet) -> Result<f64> {
        let labels = set
            .labels
            .as_ref()
            .ok_or_else(|| Error::Data("accuracy needs labels".into()))?;
        let (_, probs) = self.features_and_probs(&scaled(set, 0, set.n)?)?;
        let pred: Vec<u32> = probs.argmax(1)?.to_vec1()?;
        let hits = pred
            .iter()
            .zip(labels)
            .filter(|(p, l)| **p == **l as u32)
            .count();
        Ok(hits as f64 / set.n as f64)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = self.store.named_tensors().into_iter().collect();
        tensors.insert(
            "test_accuracy".into(),
            Tensor::new(&[self.test_accuracy as f32], &Device::Cpu)?,
        );
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    fn load(path: &Path, dim: usize, classes: usize) -> Result<Self> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{reason} (delete the file to retrain the metric classifier)"),
        };
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        let mut c = Self::fresh(dim, classes)?;
        c.store
            .load_from(|name, dims| {
                let t = tensors.get(name).ok_or(format!("no tensor `{name}`"))?;
                if t.dims() != dims {
                    return Err(format!("`{name}` is {:?}, expected {dims:?}", t.dims()));
                }
                Ok(t.clone())
            })
            .map_err(bad)?;
        c.test_accuracy = tensors
            .get("test_accuracy")
            .and_then(|t| t.to_vec1::<f32>().ok())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| bad("no `test_accuracy`".into()))? as f64;
        Ok(c)
    }
}
