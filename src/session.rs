//! The pieces every command shares: loading the data sets a config names, building a fresh model,
//! and loading a model (and its config) back from a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::checkpoint::{self, LoadedFile, FORMAT_VERSION, MODEL_FILE};
use crate::config::{Config, ModelFamily};
use crate::data::images::Split;
use crate::data::{DataSource, ImageSet};
use crate::error::{Error, Result};
use crate::models::{Diffusion, Flow, Gan, Vae};
use crate::rng::{stream_rng, Stream, TEST_BINARIZATION_SEED};

/// Training, validation and test rows of a run.
pub struct Datasets {
    pub train: DataSource,
    pub valid: Option<DataSource>,
    pub test: DataSource,
    /// Image shape (`1 x 2` for the 2-D sets).
    pub rows: usize,
    pub cols: usize,
    pub num_classes: usize,
}

impl Datasets {
    /// Values per row.
    pub fn dim(&self) -> usize {
        self.rows * self.cols
    }
}

/// Loads the data a config names.
pub fn load_datasets(cfg: &Config) -> Result<Datasets> {
    let seed = cfg.train.seed;
    if let Some(set) = cfg.data.synthetic() {
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
        return Ok(Datasets {
            train: DataSource::from_real(flat(n, 0, seed), 2, seed),
            valid,
            test: DataSource::from_real(
                flat(10_000, 2, TEST_BINARIZATION_SEED),
                2,
                TEST_BINARIZATION_SEED,
            ),
            rows: 1,
            cols: 2,
            num_classes: 0,
        });
    }
    let dir = &cfg.data.dir;
    let mut train = ImageSet::load(dir, Split::Train)?;
    let test = ImageSet::load(dir, Split::Test)?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(Error::Data(format!(
            "{}: training images are {}x{} but test images are {}x{}",
            dir.display(),
            train.rows,
            train.cols,
            test.rows,
            test.cols
        )));
    }
    let valid_set = if cfg.data.validation > 0 {
        Some(train.split_off(cfg.data.validation)?)
    } else {
        None
    };
    if cfg.data.limit_train > 0 {
        train.truncate(cfg.data.limit_train);
    }
    let mode = cfg.data.binarize;
    let classes = cfg.model.classes;
    let labelled = |s: DataSource| -> Result<DataSource> {
        if classes > 0 {
            s.with_one_hot(classes)
        } else {
            Ok(s)
        }
    };
    Ok(Datasets {
        train: labelled(DataSource::from_images(&train, mode, seed))?,
        valid: valid_set
            .map(|v| labelled(DataSource::for_evaluation(&v, mode, seed)))
            .transpose()?,
        test: labelled(DataSource::for_evaluation(
            &test,
            mode,
            TEST_BINARIZATION_SEED,
        ))?,
        rows: train.rows,
        cols: train.cols,
        num_classes: train.num_classes().max(test.num_classes()),
    })
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
    HashMap::from([
        ("format".into(), "pt".into()),
        ("gentrain_format_version".into(), FORMAT_VERSION.into()),
        ("gentrain_version".into(), env!("CARGO_PKG_VERSION").into()),
        ("model_family".into(), cfg.model.family.to_string()),
        ("input_dim".into(), data.dim().to_string()),
        ("image_shape".into(), format!("{},{}", data.rows, data.cols)),
        ("num_classes".into(), data.num_classes.to_string()),
        (
            "config".into(),
            serde_json::to_string(cfg).expect("config serializes"),
        ),
        ("step".into(), step.to_string()),
        ("epoch".into(), epoch.to_string()),
        ("rng_state".into(), rng_state.to_string()),
    ])
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
pub fn build_flow(cfg: &Config, shape: (usize, usize), device: &Device) -> Result<Flow> {
    Flow::new(
        &cfg.model.flow,
        shape,
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// Fresh GAN players for `cfg` on rows of `dim` values of data of `shape` (images when
/// `shape.0 > 1`: sigmoid outputs).
pub fn build_gan(cfg: &Config, dim: usize, shape: (usize, usize), device: &Device) -> Result<Gan> {
    Gan::new(
        &cfg.model.gan,
        dim,
        (shape.0 > 1).then_some(shape),
        cfg.model.classes,
        device,
        &mut stream_rng(cfg.train.seed, Stream::Init, 0),
    )
}

/// A fresh diffusion model for `cfg` on rows of `dim` values of data of `shape` (images when
/// `shape.0 > 1`).
pub fn build_diffusion(
    cfg: &Config,
    dim: usize,
    shape: (usize, usize),
    device: &Device,
) -> Result<Diffusion> {
    Diffusion::new(
        &cfg.model.diffusion,
        dim,
        (shape.0 > 1).then_some(shape),
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
    pub image_shape: (usize, usize),
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
        let have = (data.rows, data.cols);
        if have != self.image_shape || data.dim() != self.model.input_dim() {
            return Err(Error::checkpoint(
                &self.dir,
                format!(
                    "the model was trained on {}x{} data ({} values per row), this data is {}x{} ({} values per row)",
                    self.image_shape.0,
                    self.image_shape.1,
                    self.model.input_dim(),
                    have.0,
                    have.1,
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
    let image_shape = shape
        .split_once(',')
        .and_then(|(r, c)| Some((r.trim().parse().ok()?, c.trim().parse().ok()?)))
        .filter(|(r, c): &(usize, usize)| r.checked_mul(*c) == Some(input_dim))
        .ok_or_else(|| {
            file.error(format!(
                "metadata `image_shape` = {shape:?} does not match input_dim {input_dim}"
            ))
        })?;
    let step = parse_num(&file, "step")?;
    let epoch = parse_num(&file, "epoch")?;
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
        file,
    })
}
