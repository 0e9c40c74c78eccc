//! The pieces every command shares: loading the data sets a config names, building a fresh model,
//! and loading a model (and its config) back from a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::checkpoint::{self, LoadedFile, FORMAT_VERSION, MODEL_FILE};
use crate::config::{Config, DecoderKind, ModelFamily, Synthetic};
use crate::data::sources::column_stats;
use crate::data::{DataSource, Loaded, NpyData, SeededSplit};
use crate::error::{Error, Result};
use crate::models::{Diffusion, Flow, Gan, Vae};
use crate::rng::{stream_rng, Stream, TEST_BINARIZATION_SEED};

/// Training, validation and test rows of a run.
pub struct Datasets {
    pub train: DataSource,
    pub valid: Option<DataSource>,
    pub test: DataSource,
    /// Image shape `channels x rows x cols` (`1 x 1 x D` for continuous rows and the 2-D sets,
    /// which are not images).
    pub channels: usize,
    pub rows: usize,
    pub cols: usize,
    pub num_classes: usize,
    /// The train/test split drawn with the run seed, for a source without a test split.
    pub split: Option<SeededSplit>,
    /// The per-column `(mean, std)` every split of continuous rows was standardized with
    /// (`data.standardize`), written into checkpoints so that evaluation applies the training
    /// run's statistics.
    pub standardization: Option<Standardization>,
}

/// Per-column `(mean, std)` of continuous rows: `x -> (x - mean) / std`, `D` values each.
pub type Standardization = (Vec<f32>, Vec<f32>);

impl Datasets {
    /// Values per row.
    pub fn dim(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// `(C, H, W)`; images have `H > 1`.
    pub fn image_shape(&self) -> ImageShape {
        (self.channels, self.rows, self.cols)
    }
}

/// `(channels, height, width)` of the data: images when `height > 1`; rows of `D` values are
/// `(1, 1, D)`.
pub type ImageShape = (usize, usize, usize);

/// True when data of `shape` are images (rather than rows).
pub fn is_image(shape: ImageShape) -> bool {
    shape.1 > 1
}

/// The synthetic 2-D set of `cfg`, which must name one.
fn synthetic_datasets(cfg: &Config, set: Synthetic) -> Result<Datasets> {
    let seed = cfg.train.seed;
    let flat = |n: usize, index: u64, s: u64| -> Vec<f32> {
        set.sample(n, &mut stream_rng(s, Stream::Synthetic, index))
            .into_iter()
            .flatten()
            .collect()
    };
    let n = cfg.data.synthetic_size.max(1);
    // Points are drawn as (x, y) pairs of f64 before they are stored as f32.
    crate::memory::check(
        &format!("data.synthetic_size = {n}"),
        crate::memory::f32_bytes(&[n.max(cfg.data.validation), 2, 4]),
    )?;
    let valid = (cfg.data.validation > 0)
        .then(|| DataSource::from_real(flat(cfg.data.validation, 1, seed), 2, seed));
    Ok(Datasets {
        train: DataSource::from_real(flat(n, 0, seed), 2, seed),
        valid,
        test: DataSource::from_real(
            flat(10_000, 2, TEST_BINARIZATION_SEED),
            2,
            TEST_BINARIZATION_SEED,
        ),
        channels: 1,
        rows: 1,
        cols: 2,
        num_classes: 0,
        split: None,
        standardization: None,
    })
}

/// Loads the data a config names: a synthetic set, or a source read from files
/// ([`crate::data::load_source`]) whose validation rows are split off the end of the training
/// rows before `data.limit_train` keeps the first training rows.
///
/// # Errors
/// The readers' [`Error::Data`]; [`Error::Config`] for a validation split that leaves no
/// training rows, `data.flip` on rows, and a model's labels out of range.
pub fn load_datasets(cfg: &Config) -> Result<Datasets> {
    load_datasets_with(cfg, None)
}

/// [`load_datasets`] for a trained model: continuous rows are standardized with `stored` (a
/// checkpoint's [`LoadedCheckpoint::standardization`]) rather than with statistics of the
/// training split as read now.
///
/// # Errors
/// As [`load_datasets`]; [`Error::Data`] when `stored` does not have one value per column.
pub fn load_datasets_with(cfg: &Config, stored: Option<&Standardization>) -> Result<Datasets> {
    if let Some(set) = cfg.data.synthetic() {
        return synthetic_datasets(cfg, set);
    }
    let seed = cfg.train.seed;
    let Loaded {
        mut train,
        test,
        split,
    } = crate::data::load_source(&cfg.data, seed)?;
    let valid_set = if cfg.data.validation > 0 {
        Some(train.split_off(cfg.data.validation)?)
    } else {
        None
    };
    if cfg.data.limit_train > 0 {
        train.truncate(cfg.data.limit_train);
    }
    let shape = train.shape();
    check_decoder(cfg, &train)?;
    let stats = match (&train, cfg.data.standardize, stored) {
        (NpyData::Rows(r), true, Some(st)) if st.0.len() != r.dim || st.1.len() != r.dim => {
            return Err(Error::Data(format!(
                "the checkpoint standardizes {} columns but the rows have {}",
                st.0.len(),
                r.dim
            )))
        }
        (NpyData::Rows(_), true, Some(st)) => Some(st.clone()),
        (NpyData::Rows(r), true, None) => Some(column_stats(r)),
        _ => None,
    };
    let mode = cfg.data.binarize;
    let classes = cfg.model.classes;
    let source = |d: &NpyData, evaluation: bool, seed: u64| -> Result<DataSource> {
        let s = match d {
            NpyData::Images(s) if evaluation => DataSource::raw_for_evaluation(s, mode, seed),
            NpyData::Images(s) => DataSource::from_raw(s, mode, seed),
            NpyData::Rows(r) => DataSource::from_rows(r, stats.as_ref(), seed),
        };
        if classes > 0 {
            s.with_one_hot(classes)
        } else {
            Ok(s)
        }
    };
    let mut train_rows = source(&train, false, seed)?;
    if cfg.data.flip {
        if !matches!(train, NpyData::Images(_)) {
            return Err(Error::Config(
                "data.flip flips images: this data set holds rows".into(),
            ));
        }
        train_rows = train_rows.with_flip(shape)?;
    }
    Ok(Datasets {
        train: train_rows,
        valid: valid_set.map(|v| source(&v, true, seed)).transpose()?,
        test: source(&test, true, TEST_BINARIZATION_SEED)?,
        channels: shape.0,
        rows: shape.1,
        cols: shape.2,
        num_classes: train.num_classes().max(test.num_classes()),
        split,
        standardization: stats,
    })
}

/// Refuses a VAE's Bernoulli decoder on data that are not binary: colour images (binarizing
/// each colour channel is not a model of colour images) and continuous rows.
///
/// # Errors
/// [`Error::Config`] saying what to set instead.
fn check_decoder(cfg: &Config, train: &NpyData) -> Result<()> {
    if cfg.model.family != ModelFamily::Vae || cfg.model.decoder != DecoderKind::Bernoulli {
        return Ok(());
    }
    match train {
        NpyData::Images(s) if s.channels > 1 => Err(Error::Config(
            "model.decoder = \"bernoulli\" models binary pixels, but these are colour images: set data.binarize = \"dequantize\" and model.decoder = \"gaussian\"".into(),
        )),
        NpyData::Rows(_) => Err(Error::Config(
            "model.decoder = \"bernoulli\" models binary pixels, but this data set holds continuous rows: set model.decoder = \"gaussian\"".into(),
        )),
        NpyData::Images(_) => Ok(()),
    }
}

/// A freshly initialized VAE for `cfg` (rows of `input_dim` values), with the run seed's
/// `Init` stream.
pub fn build_vae(cfg: &Config, input_dim: usize, device: &Device) -> Result<Vae> {
    Vae::new(
        &cfg.model,
        input_dim,
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// Metadata written into `model.safetensors`.
pub fn model_metadata(
    cfg: &Config,
    data: &Datasets,
    step: u64,
    epoch: u64,
) -> HashMap<String, String> {
    let rng_state = serde_json::json!({
        "seed": cfg.train.seed,
        "scheme": "chacha8 keyed by (seed, stream, index); index = epoch for shuffling, global step for binarization and noise",
        "next_step": step,
    });
    let (c, h, w) = data.image_shape();
    let mut meta = HashMap::from([
        ("format".into(), "pt".into()),
        ("gentrain_format_version".into(), FORMAT_VERSION.into()),
        ("gentrain_version".into(), env!("CARGO_PKG_VERSION").into()),
        ("model_family".into(), cfg.model.family.to_string()),
        ("input_dim".into(), data.dim().to_string()),
        ("image_shape".into(), format!("{c},{h},{w}")),
        ("num_classes".into(), data.num_classes.to_string()),
        (
            "config".into(),
            serde_json::to_string(cfg).expect("config serializes"),
        ),
        ("step".into(), step.to_string()),
        ("epoch".into(), epoch.to_string()),
        ("rng_state".into(), rng_state.to_string()),
    ]);
    if let Some(split) = &data.split {
        let split = serde_json::json!({
            "seed": split.seed,
            "test_fraction": split.test_fraction,
            "train": split.train,
            "test": split.test,
        });
        meta.insert("data_split".into(), split.to_string());
    }
    if let Some((mean, std)) = &data.standardization {
        let st = serde_json::json!({ "mean": mean, "std": std });
        meta.insert("standardization".into(), st.to_string());
    }
    meta
}

/// Parses metadata `standardization` (`{"mean": [..], "std": [..]}`, `input_dim` finite values
/// each, every `std` positive); `None` when the checkpoint has none.
fn parse_standardization(file: &LoadedFile, input_dim: usize) -> Result<Option<Standardization>> {
    let Ok(text) = file.meta("standardization") else {
        return Ok(None);
    };
    let bad = |why: &str| file.error(format!("metadata `standardization`: {why}"));
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let column = |key: &str| -> Result<Vec<f32>> {
        let values = v[key]
            .as_array()
            .ok_or_else(|| bad(&format!("no `{key}` array")))?;
        let out: Vec<f32> = values
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(&format!(
                    "`{key}` holds a value that is not a finite number"
                ))
            })?;
        if out.len() != input_dim {
            return Err(bad(&format!(
                "`{key}` has {} values for input_dim {input_dim}",
                out.len()
            )));
        }
        Ok(out)
    };
    let (mean, std) = (column("mean")?, column("std")?);
    if std.iter().any(|s| *s <= 0.0) {
        return Err(bad("a standard deviation is not positive"));
    }
    Ok(Some((mean, std)))
}

/// Parses metadata `image_shape`: `"C,H,W"`, or `"H,W"` (checkpoints before colour data, one
/// channel); the product must be `input_dim`.
pub fn parse_image_shape(text: &str, input_dim: usize) -> Option<ImageShape> {
    let dims: Vec<usize> = text
        .split(',')
        .map(|d| d.trim().parse().ok())
        .collect::<Option<_>>()?;
    let shape = match dims[..] {
        [h, w] => (1, h, w),
        [c, h, w] => (c, h, w),
        _ => return None,
    };
    let product = shape.0.checked_mul(shape.1)?.checked_mul(shape.2)?;
    (product == input_dim).then_some(shape)
}

/// A model of any family.
#[derive(Debug, Clone)]
pub enum Model {
    Vae(Vae),
    Flow(Flow),
    Gan(Gan),
    Diffusion(Box<Diffusion>),
}

impl Model {
    /// The parameters.
    pub fn store(&self) -> &crate::models::ParamStore {
        match self {
            Model::Vae(m) => &m.store,
            Model::Flow(m) => &m.store,
            Model::Gan(m) => &m.gen_store,
            Model::Diffusion(m) => &m.store,
        }
    }

    /// `n` samples in data space (images in `[0, 1]`: a VAE's decoded means, a flow's
    /// inverse-logit samples, a GAN's outputs), drawn with `rng`. A conditional VAE's samples
    /// cycle through the classes (row `i` has label `i mod C`).
    pub fn sample(
        &self,
        n: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<candle_core::Tensor> {
        match self {
            Model::Vae(m) => {
                let z = m.sample_z1(n, rng)?;
                if m.classes > 0 {
                    let labels: Vec<u32> = (0..n).map(|i| (i % m.classes) as u32).collect();
                    let y = crate::data::one_hot(&labels, m.classes, m.device())?;
                    m.decode_mean(&z, Some(&y))
                } else {
                    m.decode_mean(&z, None)
                }
            }
            Model::Flow(f) => f.sample_data(n, rng),
            Model::Gan(g) => g.sample(n, rng),
            Model::Diffusion(d) => d.sample(n, rng),
        }
    }

    /// Classes of a conditional model (0: unconditional).
    pub fn classes(&self) -> usize {
        match self {
            Model::Vae(m) => m.classes,
            Model::Flow(_) => 0,
            Model::Gan(m) => m.classes,
            Model::Diffusion(_) => 0,
        }
    }

    /// Values per data row.
    pub fn input_dim(&self) -> usize {
        match self {
            Model::Vae(m) => m.input_dim,
            Model::Flow(m) => m.dim,
            Model::Gan(m) => m.dim,
            Model::Diffusion(m) => m.dim,
        }
    }
}

/// A fresh flow for `cfg` on data of `shape`.
pub fn build_flow(cfg: &Config, shape: ImageShape, device: &Device) -> Result<Flow> {
    Flow::new(
        &cfg.model.flow,
        shape,
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// Fresh GAN players for `cfg` on rows of `dim` values of data of `shape` (images when
/// [`is_image`]: sigmoid outputs).
pub fn build_gan(cfg: &Config, dim: usize, shape: ImageShape, device: &Device) -> Result<Gan> {
    Gan::new(
        &cfg.model.gan,
        dim,
        is_image(shape).then_some(shape),
        cfg.model.classes,
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// A fresh diffusion model for `cfg` on rows of `dim` values of data of `shape` (images when
/// [`is_image`]).
pub fn build_diffusion(
    cfg: &Config,
    dim: usize,
    shape: ImageShape,
    device: &Device,
) -> Result<Diffusion> {
    Diffusion::new(
        &cfg.model.diffusion,
        dim,
        is_image(shape).then_some(shape),
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// A model restored from a checkpoint.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub model: Model,
    pub config: Config,
    pub step: u64,
    pub epoch: u64,
    /// `(C, H, W)` of the training data.
    pub image_shape: ImageShape,
    /// The standardization of the training rows (metadata `standardization`), if any: data
    /// for this model is loaded with it ([`load_datasets_with`]).
    pub standardization: Option<Standardization>,
    pub file: LoadedFile,
}

impl LoadedCheckpoint {
    /// Checks that `data` is what the model was trained on: the same image shape (rows and
    /// columns, not only their product: a transposed set has the same size) and the same values
    /// per row.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming both shapes.
    pub fn check_data(&self, data: &Datasets) -> Result<()> {
        let have = data.image_shape();
        if have != self.image_shape || data.dim() != self.model.input_dim() {
            let text = |(c, h, w): ImageShape| {
                if c == 1 {
                    format!("{h}x{w}")
                } else {
                    format!("{c}x{h}x{w}")
                }
            };
            return Err(Error::checkpoint(
                &self.dir,
                format!(
                    "the model was trained on {} data ({} values per row), this data is {} ({} values per row)",
                    text(self.image_shape),
                    self.model.input_dim(),
                    text(have),
                    data.dim()
                ),
            ));
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(f: &LoadedFile, key: &str) -> Result<T> {
    f.meta(key)?
        .trim()
        .parse()
        .map_err(|_| f.error(format!("metadata `{key}` is not a number")))
}

/// Loads the model of a checkpoint (or of a run directory's latest checkpoint) onto `device`.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let dir = checkpoint::resolve(path)?;
    let file = LoadedFile::read(&dir.join(MODEL_FILE))?;
    let version = file.meta("gentrain_format_version")?;
    if version != FORMAT_VERSION {
        return Err(file.error(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let name = file.meta("model_family")?;
    let family: ModelFamily = name.parse().map_err(|_| {
        file.error(format!(
            "model family `{name}`: this build reads `vae`, `flow`, `gan` and `diffusion` checkpoints"
        ))
    })?;
    let config: Config = serde_json::from_str(file.meta("config")?)
        .map_err(|e| file.error(format!("metadata `config` is not a valid config: {e}")))?;
    config
        .validate()
        .map_err(|e| file.error(format!("metadata `config`: {e}")))?;
    if config.model.family != family {
        return Err(file.error(format!(
            "metadata `model_family` is `{family}` but its config says `{}`",
            config.model.family
        )));
    }
    let input_dim: usize = parse_num(&file, "input_dim")?;
    if input_dim == 0 {
        return Err(file.error("metadata `input_dim` is 0"));
    }
    let shape = file.meta("image_shape")?;
    let image_shape = parse_image_shape(shape, input_dim).ok_or_else(|| {
        file.error(format!(
            "metadata `image_shape` = {shape:?} does not match input_dim {input_dim}"
        ))
    })?;
    let step = parse_num(&file, "step")?;
    let epoch = parse_num(&file, "epoch")?;
    let standardization = parse_standardization(&file, input_dim)?;
    // The config must not describe more parameters than the file holds: a corrupt or hostile
    // config would otherwise make us allocate a huge model before any tensor is compared.
    let wanted = config
        .model
        .parameter_count(input_dim)
        .ok_or_else(|| file.error("metadata `config` describes a model too large to count"))?;
    if wanted > file.f32_elements() {
        return Err(file.error(format!(
            "metadata `config` describes {wanted} parameters but the file holds {} values",
            file.f32_elements()
        )));
    }
    let lookup = |name: &str, dims: &[usize]| file.tensor(name, dims, device);
    let model = match family {
        ModelFamily::Flow => Model::Flow(build_flow(&config, image_shape, device)?),
        ModelFamily::Gan => {
            let mut gan = build_gan(&config, input_dim, image_shape, device)?;
            gan.gen_store.load_from(lookup).map_err(|e| file.error(e))?;
            gan.disc_store
                .load_from(lookup)
                .map_err(|e| file.error(e))?;
            gan.load_buffers(lookup).map_err(|e| file.error(e))?;
            Model::Gan(gan)
        }
        ModelFamily::Vae => Model::Vae(build_vae(&config, input_dim, device)?),
        ModelFamily::Diffusion => {
            let m = build_diffusion(&config, input_dim, image_shape, device)?;
            m.store.load_from(lookup).map_err(|e| file.error(e))?;
            // The EMA weights are there when the checkpoint's config kept an average.
            if let Some(ema) = &m.ema {
                let prefix = crate::models::diffusion::EMA_PREFIX;
                ema.load_from(|name, dims| file.tensor(&format!("{prefix}{name}"), dims, device))
                    .map_err(|e| file.error(e))?;
            }
            Model::Diffusion(Box::new(m))
        }
    };
    if !matches!(model, Model::Gan(_) | Model::Diffusion(_)) {
        model.store().load_from(lookup).map_err(|e| file.error(e))?;
    }
    Ok(LoadedCheckpoint {
        dir,
        model,
        config,
        step,
        epoch,
        image_shape,
        standardization,
        file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_shape_metadata_reads_both_formats() {
        // Checkpoints written before colour data hold "H,W": one channel.
        assert_eq!(parse_image_shape("28,28", 784), Some((1, 28, 28)));
        assert_eq!(parse_image_shape("1,2", 2), Some((1, 1, 2)));
        assert_eq!(parse_image_shape("3, 8, 8", 192), Some((3, 8, 8)));
        assert_eq!(parse_image_shape("1,28,28", 784), Some((1, 28, 28)));
        for bad in [
            "28,28",
            "3,8",
            "1,2,3,4",
            "a,b",
            "",
            "4294967296,4294967296,4",
        ] {
            assert_eq!(parse_image_shape(bad, 192), None, "{bad}");
        }
    }
}
