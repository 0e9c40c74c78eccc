//! Run configuration: a TOML file, then command-line overrides (flags win). Unknown keys are
//! errors. The resolved config is written into the run directory and into every checkpoint.
//!
//! This module is the reference for config keys: every field below documents its meaning, unit
//! and default. One file per section: [`ModelConfig`] (`model.rs`, with the flow's and the GAN's
//! architectures), [`ObjectiveConfig`] (`objective.rs`), [`DataConfig`] (`data.rs`),
//! [`TrainConfig`] (`train.rs`), [`OptimConfig`] (`optim.rs`) and [`EvalConfig`] (`eval.rs`).
//!
//! Fields are *structural* (they fix the shapes of the parameters: architecture, latent sizes,
//! data shape) or *tunable* (everything else). Resuming checks the structural ones
//! ([`is_structural`]).
//!
//! Config is the bottom of the crate's one-way dependency chain (config -> data -> model ->
//! objective -> optimizer -> checkpoint / metrics / samples): nothing here imports from the
//! layers above it, only [`crate::error`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod data;
mod diffusion;
mod eval;
mod model;
mod objective;
mod optim;
mod train;

pub use data::{Binarization, DataConfig, Synthetic};
pub use diffusion::{
    DenoiserKind, DiffusionConfig, NoiseSchedule, ReverseVariance, SamplerKind,
    DIFFUSION_EVAL_ROWS, TUNABLE_DIFFUSION_FIELDS,
};
pub use eval::EvalConfig;
pub use model::{
    Activation, DecoderKind, FlowConfig, FlowMasks, GanArchitecture, GanConfig, GanLoss,
    GanPenalty, GaussianScale, LayerConfig, ModelConfig, ModelFamily, OutputBias,
    UnknownModelFamily, WeightInit,
};
pub use objective::{KlEstimator, ObjectiveConfig, ObjectiveKind};
pub use optim::{OptimConfig, OptimizerKind, Player, ScheduleKind};
pub use train::{parse_device_spec, DeviceSpec, NonFinitePolicy, TrainConfig};

/// Checks one `--set` item against the config type itself: a table holding only `last` (with
/// `value`) under `sections` must deserialize. This accepts the optional settings (`Option`
/// fields such as `optim.d_lr` or `data.crop`, absent from a serialized config while unset)
/// without a list of them, and names the key in a type error.
///
/// # Errors
/// The deserializer's message: an unknown field, or a value of the wrong type.
fn check_setting(
    sections: &[&str],
    last: &str,
    value: &toml::Value,
) -> std::result::Result<(), String> {
    let mut v = toml::Value::Table(toml::Table::from_iter([(last.to_string(), value.clone())]));
    for section in sections.iter().rev() {
        v = toml::Value::Table(toml::Table::from_iter([(section.to_string(), v)]));
    }
    v.try_into::<Config>()
        .map(|_| ())
        .map_err(|e| e.message().replace('\n', " "))
}

/// The whole resolved configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[model]`: family and architecture. Default: the 784-400-20 VAE ([`ModelConfig`]).
    pub model: ModelConfig,
    /// `[objective]`: the VAE's bound. Default: the single-sample ELBO ([`ObjectiveConfig`]).
    pub objective: ObjectiveConfig,
    /// `[data]`: data set and input transform. Default: dynamically binarized MNIST
    /// ([`DataConfig`]).
    pub data: DataConfig,
    /// `[train]`: loop length, batch, seed, device, cadences. Default: 10 epochs of batch 128
    /// on the CPU ([`TrainConfig`]).
    pub train: TrainConfig,
    /// `[optim]`: optimizer and schedule. Default: Adam at a constant `1e-3`
    /// ([`OptimConfig`]).
    pub optim: OptimConfig,
    /// `[eval]`: likelihood estimates. Default: k = 5000 for `eval`, k = 1000 on 2000 test
    /// images after training ([`EvalConfig`]).
    pub eval: EvalConfig,
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--epochs`: `train.epochs` (epochs). Default: none (the file's value).
    pub epochs: Option<usize>,
    /// `--device`: `train.device`. Default: none.
    pub device: Option<String>,
    /// `--seed`: `train.seed`. Default: none.
    pub seed: Option<u64>,
    /// `--data-dir`: `data.dir`. Default: none.
    pub data_dir: Option<PathBuf>,
    /// `--batch-size`: `train.batch_size` (rows). Default: none.
    pub batch_size: Option<usize>,
    /// `--lr`: `optim.lr`. Default: none.
    pub lr: Option<f64>,
    /// `--k`: `objective.k` (samples per data point). Default: none.
    pub k: Option<usize>,
    /// `--threads`: `train.threads`. Default: none.
    pub threads: Option<usize>,
    /// `--set section.key=value` overrides (TOML values; a bare word is a string), applied in
    /// order before the flags above. Default: empty.
    pub set: Vec<String>,
}

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::Config(format!(
                "{}: {}",
                origin.display(),
                e.message().replace('\n', " ")
            ))
        })
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, path)
    }

    /// Applies command-line overrides (flags win over the file) and validates the result.
    pub fn with_overrides(mut self, o: &Overrides) -> Result<Self> {
        if !o.set.is_empty() {
            let mut value =
                toml::Value::try_from(&self).map_err(|e| Error::Config(e.to_string()))?;
            for item in &o.set {
                let (path, raw) = item.split_once('=').ok_or_else(|| {
                    Error::Config(format!("--set {item}: expected section.key=value"))
                })?;
                let (path, raw) = (path.trim(), raw.trim());
                let parsed: toml::Value = toml::from_str(&format!("v = {raw}"))
                    .map(|t: toml::Table| t["v"].clone())
                    .unwrap_or_else(|_| toml::Value::String(raw.to_string()));
                let parts: Vec<&str> = path.split('.').collect();
                let (last, sections) = parts.split_last().expect("split yields one part");
                let mut cur = &mut value;
                for part in sections {
                    cur = cur.get_mut(*part).ok_or_else(|| {
                        Error::Config(format!("--set {path}: unknown section `{part}`"))
                    })?;
                }
                let table = cur
                    .as_table_mut()
                    .ok_or_else(|| Error::Config(format!("--set {path}: not a table")))?;
                match check_setting(sections, last, &parsed) {
                    Err(e) if e.contains("unknown field") && !table.contains_key(*last) => {
                        return Err(Error::Config(format!("--set {path}: unknown key `{last}`")))
                    }
                    Err(e) => return Err(Error::Config(format!("--set {path}: {e}"))),
                    Ok(()) => {}
                }
                table.insert(last.to_string(), parsed);
            }
            self = value
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(e.message().replace('\n', " ")))?;
        }
        if let Some(v) = o.epochs {
            self.train.epochs = v;
        }
        if let Some(v) = &o.device {
            self.train.device = v.clone();
        }
        if let Some(v) = o.seed {
            self.train.seed = v;
        }
        if let Some(v) = &o.data_dir {
            self.data.dir = v.clone();
        }
        if let Some(v) = o.batch_size {
            self.train.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.optim.lr = v;
        }
        if let Some(v) = o.k {
            self.objective.k = v;
        }
        if let Some(v) = o.threads {
            self.train.threads = v;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks every value a user can get wrong, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        match self.model.family {
            ModelFamily::Vae => self.validate_vae()?,
            ModelFamily::Flow => {
                self.model.flow.validate()?;
                if self.data.synthetic().is_none() && self.data.binarize != Binarization::Dequantize
                {
                    return err(
                        "a flow is a density on continuous data: set data.binarize = \"dequantize\""
                            .into(),
                    );
                }
                if self.model.classes > 0 {
                    return err(
                        "model.classes (conditioning) is implemented for the vae and gan families"
                            .into(),
                    );
                }
            }
            ModelFamily::Diffusion => self.validate_diffusion()?,
            ModelFamily::Gan => {
                self.model.gan.validate()?;
                if self.data.synthetic().is_none() && self.data.binarize != Binarization::None {
                    return err(
                        "the GAN learns gray-level images: set data.binarize = \"none\"".into(),
                    );
                }
            }
        }
        if self.train.batch_size == 0 {
            return err("train.batch_size must be at least 1".into());
        }
        if self.train.log_every == 0 {
            return err("train.log_every must be at least 1".into());
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return err(format!("optim.lr = {}: must be a positive number", o.lr));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return err("optim.beta1 and optim.beta2 must lie in [0, 1)".into());
        }
        self.validate_player_optim()?;
        self.validate_vae_init()?;
        if !(o.second_moment_init.is_finite() && o.second_moment_init >= 0.0) {
            return err(format!(
                "optim.second_moment_init = {}: must be >= 0 (0: PyTorch's Adam)",
                o.second_moment_init
            ));
        }
        if o.second_moment_init != 0.0 && o.kind != OptimizerKind::Adam {
            return err("optim.second_moment_init is Adam's: optim.kind is not \"adam\"".into());
        }
        if o.eps.is_nan()
            || o.eps <= 0.0
            || o.weight_decay.is_nan()
            || o.weight_decay < 0.0
            || !(0.0..1.0).contains(&o.momentum)
        {
            return err(
                "optim.eps must be > 0, optim.weight_decay >= 0, optim.momentum in [0, 1)".into(),
            );
        }
        if !(o.clip_grad_norm >= 0.0 && o.clip_grad_norm.is_finite()) {
            return err(format!(
                "optim.clip_grad_norm = {}: must be >= 0 (0: off)",
                o.clip_grad_norm
            ));
        }
        if o.schedule == ScheduleKind::Linear && o.step_epochs == 0 {
            return err("optim.step_epochs must be >= 1 for the linear schedule".into());
        }
        if o.schedule == ScheduleKind::Step
            && (o.step_epochs == 0 || o.gamma.is_nan() || o.gamma <= 0.0)
        {
            return err(
                "optim.step_epochs must be >= 1 and optim.gamma > 0 for the step schedule".into(),
            );
        }
        if self.eval.k == 0 || self.eval.max_rows == 0 {
            return err("eval.k and eval.max_rows must be at least 1".into());
        }
        if self.data.synthetic().is_none()
            && !data::FILE_DATASETS.contains(&self.data.dataset.as_str())
        {
            return err(format!(
                "data.dataset = {:?}: expected mnist, idx, npy, cifar10, folder, ring8, grid25, moons or checkerboard",
                self.data.dataset
            ));
        }
        self.data.validate()?;
        if self.model.classes > 0 && self.data.synthetic().is_some() {
            return err(
                "model.classes: the synthetic 2-D sets have no labels to condition on".into(),
            );
        }
        parse_device_spec(&self.train.device)?;
        Ok(())
    }

    /// `model.init`, `model.output_bias` and `model.gaussian_head` belong to the VAE family;
    /// another family refuses a value other than the default rather than ignore it.
    fn validate_vae_init(&self) -> Result<()> {
        let m = &self.model;
        let set = m.init != WeightInit::Pytorch
            || m.output_bias != OutputBias::Default
            || m.gaussian_head != GaussianScale::Logvar;
        if set && m.family != ModelFamily::Vae {
            return Err(Error::Config(format!(
                "model.init, model.output_bias and model.gaussian_head set up a VAE's layers: \
                 model.family = \"{}\" has its own",
                m.family
            )));
        }
        // The sections of the other families: a value other than the default would be ignored.
        for (section, family, set) in [
            ("gan", ModelFamily::Gan, m.gan != GanConfig::default()),
            ("flow", ModelFamily::Flow, m.flow != FlowConfig::default()),
            (
                "diffusion",
                ModelFamily::Diffusion,
                m.diffusion != DiffusionConfig::default(),
            ),
        ] {
            if set && m.family != family {
                return Err(Error::Config(format!(
                    "[model.{section}] is set but model.family = \"{}\": its settings would be \
                     ignored (set model.family = \"{section}\", or remove them)",
                    m.family
                )));
            }
        }
        Ok(())
    }

    /// The players' own optimizer settings (`optim.d_lr`, `g_lr`, `d_betas`, `g_betas`): valid
    /// values, and only for a GAN.
    fn validate_player_optim(&self) -> Result<()> {
        let o = &self.optim;
        let set =
            o.d_lr.is_some() || o.g_lr.is_some() || o.d_betas.is_some() || o.g_betas.is_some();
        if set && self.model.family != ModelFamily::Gan {
            return Err(Error::Config(
                "optim.d_lr, g_lr, d_betas and g_betas set the two players of a GAN: this model \
                 is not one"
                    .into(),
            ));
        }
        if (o.d_betas.is_some() || o.g_betas.is_some()) && o.kind != OptimizerKind::Adam {
            return Err(Error::Config(
                "optim.d_betas and g_betas are Adam's: optim.kind is not \"adam\"".into(),
            ));
        }
        for (name, lr) in [("d_lr", o.d_lr), ("g_lr", o.g_lr)] {
            if let Some(lr) = lr.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::Config(format!(
                    "optim.{name} = {lr}: must be a positive number"
                )));
            }
        }
        for (name, b) in [("d_betas", o.d_betas), ("g_betas", o.g_betas)] {
            if let Some(b) = b.filter(|b| !b.iter().all(|v| (0.0..1.0).contains(v))) {
                return Err(Error::Config(format!(
                    "optim.{name} = {b:?}: each must lie in [0, 1)"
                )));
            }
        }
        Ok(())
    }

    /// The checks of the `diffusion` family: the section's own, then the data it can model
    /// (8-bit images as they are, for the discretized decoder of the bound, or 2-D points) and
    /// the denoiser that suits it.
    fn validate_diffusion(&self) -> Result<()> {
        let d = &self.model.diffusion;
        d.validate()?;
        let synthetic = self.data.synthetic().is_some();
        if !synthetic && self.data.binarize != Binarization::None {
            return Err(Error::Config(
                "a diffusion model learns 8-bit images as they are (its bound ends in a discretized decoder over the 256 levels): set data.binarize = \"none\"".into(),
            ));
        }
        if synthetic && d.denoiser == DenoiserKind::Unet {
            return Err(Error::Config(
                "model.diffusion.denoiser = \"unet\" needs images; use \"mlp\" for 2-D points"
                    .into(),
            ));
        }
        if self.model.classes > 0 {
            return Err(Error::Config(
                "model.classes (conditioning) is implemented for the vae and gan families".into(),
            ));
        }
        Ok(())
    }

    /// The checks of the `vae` family.
    fn validate_vae(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        if self.model.layers.is_empty() {
            return err("model.layers: at least one stochastic layer is required".into());
        }
        for (i, l) in self.model.layers.iter().enumerate() {
            if l.latent == 0 || l.hidden.contains(&0) {
                return err(format!(
                    "model.layers[{i}]: widths and latent size must be positive"
                ));
            }
        }
        if self.objective.k == 0 {
            return err("objective.k must be at least 1".into());
        }
        if !(self.objective.beta.is_finite() && self.objective.beta >= 0.0) {
            return err(format!(
                "objective.beta = {}: must be finite and >= 0",
                self.objective.beta
            ));
        }
        if !(self.objective.warmup_epochs >= 0.0 && self.objective.free_bits >= 0.0) {
            return err("objective.warmup_epochs and objective.free_bits must be >= 0".into());
        }
        if self.objective.kl == KlEstimator::Analytic
            && self.model.layers.len() > 1
            && self.objective.kind == ObjectiveKind::Elbo
        {
            // Analytic KL is only closed-form for the single-layer model.
            return err(
                "objective.kl = \"analytic\" needs one stochastic layer; use \"monte_carlo\""
                    .into(),
            );
        }
        if self.objective.free_bits > 0.0
            && (self.objective.kind != ObjectiveKind::Elbo
                || self.objective.kl != KlEstimator::Analytic)
        {
            return err("objective.free_bits needs kind = \"elbo\" with kl = \"analytic\"".into());
        }
        if self.data.synthetic().is_some() && self.model.decoder != DecoderKind::Gaussian {
            return err(
                "synthetic 2-D data is real-valued: set model.decoder = \"gaussian\"".into(),
            );
        }
        if matches!(
            self.data.binarize,
            Binarization::None | Binarization::Dequantize
        ) && self.model.decoder == DecoderKind::Bernoulli
            && self.data.synthetic().is_none()
        {
            return err(format!(
                "data.binarize = \"{}\" gives continuous data: use model.decoder = \"gaussian\"",
                format!("{:?}", self.data.binarize).to_lowercase()
            ));
        }
        Ok(())
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Every leaf of the config as `(dotted path, value as JSON text)`, in path order (arrays
    /// are single leaves).
    pub fn leaves(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&path, v, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        let v = serde_json::to_value(self).expect("config serializes");
        walk("", &v, &mut out);
        out
    }

    /// The fields on which `self` (the run) and `old` (a checkpoint's) differ, as
    /// `(path, old value, new value)`, with whether each is structural ([`is_structural`]).
    pub fn differences(&self, old: &Config) -> Vec<ConfigDifference> {
        let old: std::collections::BTreeMap<String, String> = old.leaves().into_iter().collect();
        self.leaves()
            .into_iter()
            .filter_map(|(path, new)| {
                let was = old.get(&path).cloned().unwrap_or_else(|| "(absent)".into());
                (was != new).then(|| ConfigDifference {
                    structural: is_structural(&path),
                    path,
                    old: was,
                    new,
                })
            })
            .collect()
    }
}

/// One field on which two configs differ (see [`Config::differences`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigDifference {
    pub path: String,
    pub old: String,
    pub new: String,
    /// True when a checkpoint cannot continue under the new value.
    pub structural: bool,
}

/// The fields under `model.` that may change on resume: they set how the model trains, not the
/// parameters it has.
const TUNABLE_MODEL_FIELDS: &[&str] = &[
    "model.gan.loss",
    "model.gan.n_critic",
    "model.gan.gp_weight",
    "model.gan.sn_iterations",
    "model.gan.penalty",
    "model.gan.r1_gamma",
];

/// Whether `path` is a model field that may change on resume.
fn is_tunable_model_field(path: &str) -> bool {
    TUNABLE_MODEL_FIELDS.contains(&path) || TUNABLE_DIFFUSION_FIELDS.contains(&path)
}

/// Whether a change of the field at `path` makes a checkpoint unusable: every field under
/// `model.` (they fix the parameters and their meaning) except those of `TUNABLE_MODEL_FIELDS`
/// (the GAN's `loss`, `n_critic`, `gp_weight` and `sn_iterations`) and of
/// `TUNABLE_DIFFUSION_FIELDS` (the diffusion model's sampler, EMA and loss weight), and
/// the data fields that decide which rows train: `data.dataset`, `data.crop`, `data.resize` and
/// `data.test_fraction`. Decided by path, not by a list of structural fields, so a field added
/// to a model config is structural without anyone remembering to list it.
pub fn is_structural(path: &str) -> bool {
    (path.starts_with("model.") && !is_tunable_model_field(path))
        || matches!(
            path,
            "data.dataset" | "data.crop" | "data.resize" | "data.test_fraction"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Config::from_toml("[train]\nepochz = 3\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("epochz"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let c = Config::from_toml("[train]\nepochs = 3\nseed = 4\n", Path::new("x.toml")).unwrap();
        let o = Overrides {
            epochs: Some(7),
            set: vec!["objective.k=5".into(), "optim.lr=0.01".into()],
            ..Default::default()
        };
        let c = c.with_overrides(&o).unwrap();
        assert_eq!(
            (c.train.epochs, c.train.seed, c.objective.k, c.optim.lr),
            (7, 4, 5, 0.01)
        );
    }

    #[test]
    fn every_optional_setting_can_be_set() {
        // Optional settings are absent from a serialized config while unset; `--set` used to
        // accept only a hand-kept list of them (and refused `data.crop`, `data.resize`).
        let o = Overrides {
            set: vec![
                "model.family=\"gan\"".into(),
                "data.binarize=\"none\"".into(),
                "data.dataset=\"folder\"".into(),
                " data.crop = [8, 8] ".into(),
                "optim.d_lr=0.0002".into(),
                "optim.g_betas=[0.5, 0.9]".into(),
            ],
            ..Default::default()
        };
        let c = Config::default().with_overrides(&o).unwrap();
        assert_eq!(c.data.crop, Some([8, 8]));
        assert_eq!(
            (c.optim.d_lr, c.optim.g_betas),
            (Some(2e-4), Some([0.5, 0.9]))
        );
        let o = Overrides {
            set: vec![
                "data.dataset=\"folder\"".into(),
                "data.resize=[8, 8]".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            Config::default().with_overrides(&o).unwrap().data.resize,
            Some([8, 8])
        );
    }

    #[test]
    fn bad_values_are_named() {
        for (set, needle) in [
            ("objective.k=0", "objective.k"),
            ("train.batch_size=0", "batch_size"),
            ("optim.lr=-1.0", "optim.lr"),
            ("train.device=\"tpu\"", "tpu"),
            ("train.nope=1", "nope"),
            // Unknown keys among the optional settings, and a type error, name the key.
            ("data.cropp=[8, 8]", "--set data.cropp: unknown key `cropp`"),
            ("model.flow.maskz=1", "unknown key `maskz`"),
            ("data.crop=\"big\"", "--set data.crop: invalid type"),
        ] {
            let o = Overrides {
                set: vec![set.into()],
                ..Default::default()
            };
            let e = Config::default()
                .with_overrides(&o)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    #[test]
    fn every_model_field_is_structural_unless_declared_tunable() {
        // The hand-written list this replaces had fallen behind: gan.architecture and
        // gan.conv_channels could change on resume.
        let base = Config::default();
        type Change = (&'static str, fn(&mut Config));
        let changes: [Change; 6] = [
            ("model.gan.architecture", |c| {
                c.model.gan.architecture = GanArchitecture::Dcgan
            }),
            ("model.gan.conv_channels", |c| {
                c.model.gan.conv_channels = [8, 4]
            }),
            ("model.flow.coupling_layers", |c| {
                c.model.flow.coupling_layers += 1
            }),
            ("model.classes", |c| c.model.classes = 10),
            ("data.dataset", |c| c.data.dataset = "moons".into()),
            ("data.test_fraction", |c| c.data.test_fraction = 0.2),
        ];
        for (path, change) in changes {
            let mut c = base.clone();
            change(&mut c);
            let d = c.differences(&base);
            assert!(
                d.iter().any(|x| x.path == path && x.structural),
                "{path}: {d:?}"
            );
        }
        // A GAN's tunable field (another family's section would be refused).
        let mut gan = base.clone();
        gan.model.family = ModelFamily::Gan;
        gan.data.binarize = Binarization::None;
        let c = gan
            .clone()
            .with_overrides(&Overrides {
                set: vec!["train.seed=99".into(), "model.gan.n_critic=3".into()],
                ..Default::default()
            })
            .unwrap();
        let d = c.differences(&gan);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|x| !x.structural), "{d:?}");
        assert!(d.iter().any(|x| x.path == "train.seed" && x.new == "99"));
        // Every leaf is named, so no field can be left out of the comparison.
        let leaves = base.leaves();
        assert!(leaves.iter().any(|(p, _)| p == "model.gan.architecture"));
        assert!(leaves.iter().any(|(p, _)| p == "optim.lr"));
    }

    #[test]
    fn every_family_round_trips_with_its_spelling() {
        for (family, name, binarize) in [
            (ModelFamily::Vae, "vae", "dynamic"),
            (ModelFamily::Flow, "flow", "dequantize"),
            (ModelFamily::Gan, "gan", "none"),
            (ModelFamily::Diffusion, "diffusion", "none"),
        ] {
            assert_eq!(
                (family.as_str(), family.to_string()),
                (name, name.to_string())
            );
            assert_eq!(name.parse::<ModelFamily>(), Ok(family));
            let mut c = Config::default();
            c.model.family = family;
            // TOML (config files, `RUN_DIR/config.toml`) writes and reads the same word.
            let text = c.to_toml();
            assert!(
                text.contains(&format!("family = \"{name}\"")),
                "{name}: {text}"
            );
            assert_eq!(Config::from_toml(&text, Path::new("x")).unwrap(), c);
            // JSON (the `config` inside checkpoints) likewise.
            let json = serde_json::to_string(&c).unwrap();
            assert!(json.contains(&format!("\"family\":\"{name}\"")), "{json}");
            assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
            // `--set model.family=...`, bare or quoted.
            for set in [
                format!("model.family={name}"),
                format!("model.family=\"{name}\""),
            ] {
                let o = Overrides {
                    set: vec![set, format!("data.binarize={binarize}")],
                    ..Default::default()
                };
                let got = Config::default().with_overrides(&o).unwrap();
                assert_eq!(got.model.family, family);
            }
        }
        // A config JSON as written by earlier builds (family as a string) still loads.
        let old = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(old["model"]["family"], serde_json::json!("vae"));
        let back: Config = serde_json::from_value(old).unwrap();
        assert_eq!(back.model.family, ModelFamily::Vae);
    }

    #[test]
    fn an_unknown_family_is_refused_naming_the_accepted_ones() {
        let accepted = "expected \"vae\", \"flow\", \"gan\" or \"diffusion\"";
        let e = "score".parse::<ModelFamily>().unwrap_err().to_string();
        assert_eq!(e, format!("model.family = \"score\": {accepted}"));
        // The spelling is exact: no other case is accepted.
        assert!("VAE".parse::<ModelFamily>().is_err());
        let e = Config::from_toml("[model]\nfamily = \"score\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("score") && e.contains(accepted), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let mut json = serde_json::to_value(Config::default()).unwrap();
        json["model"]["family"] = serde_json::json!("score");
        let e = serde_json::from_value::<Config>(json)
            .unwrap_err()
            .to_string();
        assert!(e.contains("score") && e.contains(accepted), "{e}");
        let o = Overrides {
            set: vec!["model.family=score".into()],
            ..Default::default()
        };
        let e = Config::default()
            .with_overrides(&o)
            .unwrap_err()
            .to_string();
        assert!(e.contains("score") && e.contains(accepted), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml(), Path::new("x")).unwrap(), c);
    }
}
