//! The GAN family in the training loop: alternating updates (Goodfellow et al. 2014,
//! algorithm 1) with `n_critic` discriminator updates per generator update, spectral-norm
//! power iterations once per discriminator update, and every random draw keyed by the step
//! (fakes, the generator's own noise, gradient-penalty interpolation weights), so a resumed
//! run continues exactly.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;

use super::{restore_optimizer, EpochEval, FinalEval, StepContext, StepOutput, Trainee};
use crate::checkpoint::{LoadedFile, OPTIM_FILE};
use crate::config::{Config, GanPenalty, Player};
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::models::Gan;
use crate::optim::{check_finite_grads, Optimizer};
use crate::rng::{stream_rng, Stream};
use crate::session::{self, Datasets, Model};

/// A GAN and its two optimizers.
pub struct GanTrainee {
    pub gan: Gan,
    pub gen_opt: Optimizer,
    pub disc_opt: Optimizer,
    /// The last generator loss (reported between generator updates when `n_critic > 1`).
    last_gen_loss: Option<Tensor>,
}

impl GanTrainee {
    /// The sample figures of the current generator (MNIST-FID and class balance on IDX
    /// images, mode coverage on the 2-D mixtures, precision, recall and MMD^2 on other data).
    fn figures(&self, cfg: &Config, data: &Datasets) -> Result<Vec<(&'static str, f64)>> {
        crate::metrics::quick_sample_figures(&Model::Gan(self.gan.clone()), cfg, data)
    }

    /// Fresh players for `cfg`.
    pub fn fresh(cfg: &Config, data: &Datasets, device: &Device) -> Result<Self> {
        let gan = session::build_gan(cfg, data.dim(), data.image_shape(), device)?;
        Self::with(cfg, gan)
    }

    fn with(cfg: &Config, gan: Gan) -> Result<Self> {
        Ok(GanTrainee {
            gen_opt: Optimizer::new(&cfg.optim.for_player(Player::Generator), &gan.gen_store)?,
            disc_opt: Optimizer::new(
                &cfg.optim.for_player(Player::Discriminator),
                &gan.disc_store,
            )?,
            gan,
            last_gen_loss: None,
        })
    }

    /// The players, spectral-norm vectors and optimizer states of a checkpoint (whose data the
    /// caller has checked, [`session::LoadedCheckpoint::check_data`]).
    pub fn restore(cfg: &Config, ck: session::LoadedCheckpoint, device: &Device) -> Result<Self> {
        let Model::Gan(mut gan) = ck.model else {
            return Err(Error::checkpoint(&ck.dir, "not a gan checkpoint"));
        };
        // The model was built from the checkpoint's settings; train with the run's (a resume
        // may change the loss and the penalties).
        gan.set_tunables(&cfg.model.gan)?;
        let mut t = Self::with(cfg, gan)?;
        let file = LoadedFile::read(&ck.dir.join(OPTIM_FILE))?;
        restore_optimizer(&mut t.gen_opt, &file, "gen_", device)?;
        restore_optimizer(&mut t.disc_opt, &file, "disc_", device)?;
        Ok(t)
    }

    /// One generator update on fresh noise for the global batch of `batch` rows, of which this
    /// process holds `rows` (with their one-hot `labels` for a conditional GAN); false when the
    /// loss or a gradient was not finite and the update was skipped.
    fn generator_update(
        &mut self,
        ctx: &StepContext,
        rows: &std::ops::Range<usize>,
        batch: usize,
        labels: Option<&Tensor>,
    ) -> Result<bool> {
        let with_labels = |t: Tensor| -> Result<Tensor> {
            Ok(match labels {
                Some(y) => Tensor::cat(&[&t, y], 1)?,
                None => t,
            })
        };
        let seed = ctx.cfg.train.seed;
        let z = self.gan.noise(
            batch,
            &mut stream_rng(seed, Stream::GeneratorNoise, ctx.step),
        )?;
        let z = super::rows_of(&z, rows)?;
        let b = rows.len();
        let g_local = if b == 0 {
            None
        } else {
            let fake = with_labels(self.gan.generate(&with_labels(z)?)?)?;
            Some(crate::objectives::gan::generator_loss(&self.gan, &fake)?)
        };
        let gen_vars = self.gan.gen_store.vars();
        let (g_loss, _, grads) = super::averaged_backward(
            ctx.parallel,
            ctx.device,
            &gen_vars,
            g_local.as_ref().map(|l| (l, Vec::new())),
            0,
            b,
            batch,
        )?;
        let applied = g_loss.to_scalar::<f32>()?.is_finite()
            && check_finite_grads(&self.gan.gen_store, &grads).is_ok();
        if applied {
            let lr = ctx.lr * player_scale(ctx.cfg, Player::Generator);
            self.gen_opt.step(&grads, lr, None)?;
        }
        self.last_gen_loss = Some(g_loss.detach());
        Ok(applied)
    }

    /// The step's report: the discriminator's loss and figures `[d_real, d_fake, penalty?]`.
    fn output(
        &self,
        d_loss: Tensor,
        extra: &[Tensor],
        applied: bool,
        ctx: &StepContext,
    ) -> Result<StepOutput> {
        let (d_real, d_fake, gp) = (extra[0].clone(), extra[1].clone(), extra.get(2));
        let mut values = vec![("d_loss", d_loss.detach())];
        if let Some(g) = &self.last_gen_loss {
            values.push(("g_loss", g.clone()));
        }
        values.push(("d_real", d_real));
        values.push(("d_fake", d_fake));
        if let Some(gp) = gp {
            let name = match ctx.cfg.model.gan.effective_penalty() {
                GanPenalty::R1 => "r1_penalty",
                _ => "gradient_penalty",
            };
            values.push((name, gp.detach()));
        }
        let o = &ctx.cfg.optim;
        let constants = if o.d_lr.is_some() || o.g_lr.is_some() {
            vec![
                (
                    "d_lr",
                    ctx.lr * player_scale(ctx.cfg, Player::Discriminator),
                ),
                ("g_lr", ctx.lr * player_scale(ctx.cfg, Player::Generator)),
            ]
        } else {
            Vec::new()
        };
        Ok(StepOutput {
            loss: d_loss,
            values,
            constants,
            skipped: Tensor::new(if applied { 0f32 } else { 1f32 }, ctx.device)?,
            applied: Some(applied),
        })
    }
}

/// The factor that takes the schedule's learning rate (of `optim.lr`) to `player`'s own
/// (`optim.d_lr` / `optim.g_lr`), so warm-up and decay scale both players alike.
fn player_scale(cfg: &Config, player: Player) -> f64 {
    cfg.optim.player_lr(player) / cfg.optim.lr
}

/// One discriminator update and, every `n_critic`-th step, one generator update; the
/// host checks the losses and gradients before each update (`Error::NonFinite` handling is the
/// loop's, through `applied`).
impl Trainee for GanTrainee {
    fn numel(&self) -> usize {
        self.gan.gen_store.numel() + self.gan.disc_store.numel()
    }

    fn parameters(&self) -> Vec<candle_core::Var> {
        let mut vars = self.gan.gen_store.vars();
        vars.extend(self.gan.disc_store.vars());
        vars
    }

    fn step(&mut self, ctx: &StepContext, data: &DataSource, idx: &[u32]) -> Result<StepOutput> {
        let seed = ctx.cfg.train.seed;
        // Every draw (data, noise, penalty points) is made for the global batch and narrowed to
        // this rank's rows (see crate::distributed); in one process the rows are all of it.
        let batch = idx.len();
        let rows = ctx.shard(batch);
        let x = super::rows_of(&data.batch(idx, ctx.step, ctx.device)?, &rows)?;
        let b = rows.len();
        // A conditional GAN's rows end with their one-hot labels; the fakes of this step are
        // drawn for the same labels (the label columns are carried through unchanged).
        let classes = self.gan.classes;
        let labels = if classes > 0 {
            Some(x.narrow(1, self.gan.dim, classes)?)
        } else {
            None
        };
        let with_labels = |t: Tensor| -> Result<Tensor> {
            Ok(match &labels {
                Some(y) => Tensor::cat(&[&t, y], 1)?,
                None => t,
            })
        };
        self.gan.update_spectral_vectors()?;
        let z = self
            .gan
            .noise(batch, &mut stream_rng(seed, Stream::Noise, ctx.step))?;
        let z = super::rows_of(&z, &rows)?;
        let mut rng = stream_rng(seed, Stream::Penalty, ctx.step);
        let t: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
        let t = super::rows_of(&Tensor::from_vec(t, (batch, 1), ctx.device)?, &rows)?;
        let penalty = self.gan.config().effective_penalty() != GanPenalty::None;
        let extras = if penalty { 3 } else { 2 };
        let local = if b == 0 {
            None
        } else {
            let fake = with_labels(self.gan.generate(&with_labels(z)?)?.detach())?;
            let crate::objectives::gan::DiscriminatorLoss {
                loss: d_loss,
                d_real,
                d_fake,
                penalty: gp,
            } = crate::objectives::gan::discriminator_loss(&self.gan, &x, &fake, &t)?;
            let mut extra = vec![d_real, d_fake];
            extra.extend(gp);
            Some((d_loss, extra))
        };
        if let (None, Some((l, _))) = (ctx.parallel, &local) {
            if !l.to_scalar::<f32>()?.is_finite() {
                // One process: no backward pass for a non-finite loss.
                return self.output(l.clone(), &local.as_ref().expect("some").1, false, ctx);
            }
        }
        let disc_vars = self.gan.disc_store.vars();
        let (d_loss, d_extra, grads) = super::averaged_backward(
            ctx.parallel,
            ctx.device,
            &disc_vars,
            local.as_ref().map(|(l, e)| (l, e.clone())),
            extras,
            b,
            batch,
        )?;
        let mut applied = d_loss.to_scalar::<f32>()?.is_finite()
            && check_finite_grads(&self.gan.disc_store, &grads).is_ok();
        if applied {
            self.disc_opt.step(
                &grads,
                ctx.lr * player_scale(ctx.cfg, Player::Discriminator),
                None,
            )?;
        }
        if applied && (ctx.step + 1) % self.gan.config().n_critic as u64 == 0 {
            applied = self.generator_update(ctx, &rows, batch, labels.as_ref())?;
        }
        self.output(d_loss, &d_extra, applied, ctx)
    }

    fn epoch_eval(&self, cfg: &Config, data: &Datasets) -> Result<EpochEval> {
        let figures = self.figures(cfg, data)?;
        let summary = figures
            .iter()
            .map(|(n, v)| format!("{n} {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(EpochEval {
            summary,
            figures,
            score: None,
        })
    }

    fn write_samples(&self, cfg: &Config, data: &Datasets, path: &Path, epoch: u64) -> Result<()> {
        crate::samples::write_model_samples(
            &Model::Gan(self.gan.clone()),
            cfg,
            path,
            64,
            epoch,
            data.image_shape(),
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = self.gan.gen_store.named_tensors();
        tensors.extend(self.gan.disc_store.named_tensors());
        tensors.extend(self.gan.named_buffers());
        tensors
    }

    fn optimizers(&self) -> Vec<(&'static str, &Optimizer)> {
        vec![("gen_", &self.gen_opt), ("disc_", &self.disc_opt)]
    }

    fn finish(
        &self,
        cfg: &Config,
        data: &Datasets,
        _run_dir: &Path,
        epoch_eval: Option<&[(&'static str, f64)]>,
    ) -> Result<FinalEval> {
        FinalEval::reusing(epoch_eval, || self.figures(cfg, data))
    }
}
