//! Run configuration: a TOML file, then command-line overrides (flags win). Unknown keys are
//! errors. The resolved config is written into the run directory and into every checkpoint.
//!
//! Fields are *structural* (they fix the shapes of the parameters: architecture, latent sizes,
//! data shape) or *tunable* (everything else). Resuming checks the structural ones.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::synthetic::Synthetic;
use crate::data::Binarization;
use crate::error::{Error, Result};
use crate::ops::linear::Activation;

/// The whole resolved configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub objective: ObjectiveConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub eval: EvalConfig,
}

/// Model family and architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model family: `vae` (the VAE and the IWAE: same model, different bound), `flow`
    /// (RealNVP) or `gan`.
    pub family: String,
    pub activation: Activation,
    pub decoder: DecoderKind,
    /// Stochastic layers, bottom (next to x) first.
    pub layers: Vec<LayerConfig>,
    /// Conditional models: classes of the one-hot label (0: unconditional). A VAE feeds it to
    /// the bottom encoder and to the likelihood; a GAN to the generator's input and to a
    /// projection discriminator.
    pub classes: usize,
    /// The flow's architecture (`family = "flow"`).
    pub flow: crate::models::flow::FlowConfig,
    /// The GAN's architecture and losses (`family = "gan"`).
    pub gan: crate::models::gan::GanConfig,
}

/// One stochastic layer: the deterministic hidden widths below it and its latent size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    pub hidden: Vec<usize>,
    pub latent: usize,
}

/// Likelihood of the data given the bottom latent layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// Bernoulli with logits (binary data).
    #[default]
    Bernoulli,
    /// Diagonal Gaussian with learned mean and log-variance (continuous data).
    Gaussian,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            family: "vae".into(),
            activation: Activation::Relu,
            decoder: DecoderKind::Bernoulli,
            layers: vec![LayerConfig {
                hidden: vec![400],
                latent: 20,
            }],
            classes: 0,
            flow: Default::default(),
            gan: Default::default(),
        }
    }
}

/// The bound that is maximized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// ELBO averaged over `k` samples.
    #[default]
    Elbo,
    /// Importance-weighted bound with `k` samples.
    Iwae,
}

/// How the KL term of the ELBO is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// Closed form (one stochastic layer only).
    #[default]
    Analytic,
    /// `log q(z|x) - log p(z)` at the sampled z.
    MonteCarlo,
}

/// Objective settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub kind: ObjectiveKind,
    /// Samples per data point.
    pub k: usize,
    pub kl: KlEstimator,
    /// Weight of the KL term (beta-VAE); 1 is the ELBO.
    pub beta: f64,
    /// Epochs over which the KL weight rises linearly from 0 to `beta` (0: no warm-up).
    pub warmup_epochs: f64,
    /// Free bits per latent dimension (Kingma et al. 2016), 0 to disable.
    pub free_bits: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            kind: ObjectiveKind::Elbo,
            k: 1,
            kl: KlEstimator::Analytic,
            beta: 1.0,
            warmup_epochs: 0.0,
            free_bits: 0.0,
        }
    }
}

/// Data settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `mnist` (or any IDX image set in `dir`) or a synthetic set name.
    pub dataset: String,
    /// Directory of the IDX files (relative paths are taken from the working directory).
    pub dir: PathBuf,
    pub binarize: Binarization,
    /// Training images held out for validation (from the end of the training set).
    pub validation: usize,
    /// Use only the first N training images (0: all).
    pub limit_train: usize,
    /// Size of a synthetic training set.
    pub synthetic_size: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "mnist".into(),
            dir: PathBuf::from("data/mnist"),
            binarize: Binarization::Dynamic,
            validation: 0,
            limit_train: 0,
            synthetic_size: 50_000,
        }
    }
}

impl DataConfig {
    /// The synthetic set named by `dataset`, if it is one.
    pub fn synthetic(&self) -> Option<Synthetic> {
        serde_json::from_value(serde_json::Value::String(self.dataset.clone())).ok()
    }
}

/// Training-loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// CPU threads (0: all cores).
    pub threads: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Log training metrics every N steps.
    pub log_every: usize,
    /// Evaluate the test ELBO every N epochs (0: never during training).
    pub eval_every: usize,
    /// Write a checkpoint every N epochs (the final epoch always writes one).
    pub checkpoint_every: usize,
    /// Also write a checkpoint every N optimizer steps (0: off).
    pub checkpoint_every_steps: usize,
    /// Write a sample grid every N epochs (0: only at the end).
    pub sample_every: usize,
    /// What to do when the loss or a gradient is NaN or infinite.
    pub on_nonfinite: NonFinitePolicy,
    /// Checkpoints to keep in the run directory (0: all).
    pub keep_checkpoints: usize,
    /// Allow TF32 tensor-core GEMMs on CUDA devices.
    pub tf32: bool,
}

/// Policy for a non-finite loss or gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Stop with an error; the last checkpoint is left as it was.
    #[default]
    Stop,
    /// Skip the update (counted and logged) and go on.
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            seed: 0,
            threads: 0,
            device: "cpu".into(),
            log_every: 50,
            eval_every: 1,
            checkpoint_every: 1,
            checkpoint_every_steps: 0,
            sample_every: 1,
            on_nonfinite: NonFinitePolicy::Stop,
            keep_checkpoints: 3,
            tf32: true,
        }
    }
}

/// Optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Adam,
    Sgd,
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step,
    /// The IWAE paper's: for i = 0..7, 3^i epochs at `lr * 10^(-i/7)` (3280 epochs in all).
    Iwae,
    /// Linear decay over `step_epochs` epochs: `lr * (1 - e / step_epochs)` in epoch `e`
    /// (0-based), so the last of `step_epochs` epochs runs at `lr / step_epochs`; 0 after.
    /// Set `step_epochs` to `train.epochs` for the SN-GAN decay to zero.
    Linear,
}

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    pub schedule: ScheduleKind,
    pub step_epochs: usize,
    pub gamma: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            schedule: ScheduleKind::Constant,
            step_epochs: 10,
            gamma: 0.5,
        }
    }
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Importance samples for the log-likelihood estimate.
    pub k: usize,
    /// Rows (samples x images) per forward pass; bounds memory at any k.
    pub max_rows: usize,
    /// Evaluate on the first N test images (0: all).
    pub limit: usize,
    /// Importance samples of the end-of-training NLL printed by `train` (0: skip it).
    pub final_k: usize,
    /// Test images of that estimate (0: all).
    pub final_limit: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            k: 5000,
            max_rows: 16_384,
            limit: 0,
            final_k: 1000,
            final_limit: 2000,
        }
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub epochs: Option<usize>,
    pub device: Option<String>,
    pub seed: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub k: Option<usize>,
    pub threads: Option<usize>,
    /// Free-form `section.key=value` overrides (TOML values).
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
                if !table.contains_key(*last) {
                    return Err(Error::Config(format!("--set {path}: unknown key `{last}`")));
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
        match self.model.family.as_str() {
            "vae" => self.validate_vae()?,
            "flow" => {
                self.model.flow.validate()?;
                if self.data.synthetic().is_none() && self.data.binarize != Binarization::Dequantize
                {
                    return err(
                        "a flow is a density on continuous data: set data.binarize = \"dequantize\""
                            .into(),
                    );
                }
            }
            "gan" => {
                self.model.gan.validate()?;
                if self.data.synthetic().is_none() && self.data.binarize != Binarization::None {
                    return err(
                        "the GAN learns gray-level images: set data.binarize = \"none\"".into(),
                    );
                }
            }
            other => {
                return err(format!(
                    "model.family = {other:?}: expected \"vae\", \"flow\" or \"gan\""
                ))
            }
        }
        if self.model.classes > 0 && self.model.family == "flow" {
            return err(
                "model.classes (conditioning) is implemented for the vae and gan families".into(),
            );
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
            && self.data.dataset != "mnist"
            && self.data.dataset != "idx"
        {
            return err(format!(
                "data.dataset = {:?}: expected mnist, idx, ring8, grid25, moons or checkerboard",
                self.data.dataset
            ));
        }
        if self.model.classes > 0 && self.data.synthetic().is_some() {
            return err(
                "model.classes: the synthetic 2-D sets have no labels to condition on".into(),
            );
        }
        crate::device::parse_device_spec(&self.train.device)?;
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
            && self.model.family == "vae"
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
];

/// Whether a change of the field at `path` makes a checkpoint unusable: every field under
/// `model.` (they fix the parameters and their meaning) except [`TUNABLE_MODEL_FIELDS`], and
/// `data.dataset`. Decided by path, not by a list of structural fields, so a field added to a
/// model config is structural without anyone remembering to list it.
pub fn is_structural(path: &str) -> bool {
    (path.starts_with("model.") && !TUNABLE_MODEL_FIELDS.contains(&path)) || path == "data.dataset"
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
    fn bad_values_are_named() {
        for (set, needle) in [
            ("objective.k=0", "objective.k"),
            ("train.batch_size=0", "batch_size"),
            ("optim.lr=-1.0", "optim.lr"),
            ("train.device=\"tpu\"", "tpu"),
            ("train.nope=1", "nope"),
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
        let changes: [Change; 5] = [
            ("model.gan.architecture", |c| {
                c.model.gan.architecture = crate::models::gan::GanArchitecture::Dcgan
            }),
            ("model.gan.conv_channels", |c| {
                c.model.gan.conv_channels = [8, 4]
            }),
            ("model.flow.coupling_layers", |c| {
                c.model.flow.coupling_layers += 1
            }),
            ("model.classes", |c| c.model.classes = 10),
            ("data.dataset", |c| c.data.dataset = "moons".into()),
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
        let c = base
            .clone()
            .with_overrides(&Overrides {
                set: vec!["train.seed=99".into(), "model.gan.n_critic=3".into()],
                ..Default::default()
            })
            .unwrap();
        let d = c.differences(&base);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|x| !x.structural), "{d:?}");
        assert!(d.iter().any(|x| x.path == "train.seed" && x.new == "99"));
        // Every leaf is named, so no field can be left out of the comparison.
        let leaves = base.leaves();
        assert!(leaves.iter().any(|(p, _)| p == "model.gan.architecture"));
        assert!(leaves.iter().any(|(p, _)| p == "optim.lr"));
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml(), Path::new("x")).unwrap(), c);
    }
}
