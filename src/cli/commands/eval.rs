//! `trainer eval`: the likelihoods that apply to a checkpoint's model, then the sample metrics.

use anyhow::{bail, Context, Result};

use crate::cli::output::{merge, print_json};
use crate::cli::resolve::with_data_dir;
use crate::cli::EvalArgs;
use crate::config::Config;
use crate::session::{Datasets, LoadedCheckpoint, Model};

/// The evaluation flags resolved against the checkpoint's config.
struct Settings {
    k: usize,
    max_rows: usize,
    limit: usize,
    threads: usize,
    seed: u64,
    t_draws: usize,
    estimator: crate::eval::Estimator,
    sweep: Vec<usize>,
}

impl Settings {
    /// The flags, else the config's `eval` section.
    ///
    /// # Errors
    /// `--k 0` or `--max-rows 0` (given, or from the config).
    fn resolve(a: &EvalArgs, cfg: &Config) -> Result<Self> {
        let k = a.k.unwrap_or(cfg.eval.k);
        if k == 0 {
            bail!("--k must be at least 1");
        }
        let max_rows = a.max_rows.unwrap_or(cfg.eval.max_rows);
        if max_rows == 0 {
            bail!("--max-rows must be at least 1");
        }
        Ok(Settings {
            k,
            max_rows,
            limit: a.limit.unwrap_or(cfg.eval.limit),
            threads: a.threads.unwrap_or(0),
            seed: a.seed,
            t_draws: a.t_draws.unwrap_or(16),
            estimator: match a.estimator {
                Some(crate::cli::EstimatorChoice::Prior) => crate::eval::Estimator::Prior,
                _ => crate::eval::Estimator::Importance,
            },
            sweep: match &a.k_sweep {
                Some(v) => {
                    if let Some(bad) = v.iter().find(|&&p| p == 0 || p > k) {
                        bail!("--k-sweep {bad}: each point must be between 1 and --k ({k})");
                    }
                    if let Some(w) = v.windows(2).find(|w| w[0] >= w[1]) {
                        bail!(
                            "--k-sweep {}: the points must increase ({} then {})",
                            v.iter()
                                .map(|p| p.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            w[0],
                            w[1]
                        );
                    }
                    v.clone()
                }
                None => crate::eval::likelihood::default_sweep(k),
            },
        })
    }
}

/// What `eval` prints: one JSON object, or the same figures as lines of text.
struct Report {
    json: serde_json::Value,
    lines: Vec<String>,
}

impl Report {
    fn new(ck: &LoadedCheckpoint, cfg: &Config) -> Self {
        let json = serde_json::json!({
            "checkpoint": ck.dir.display().to_string(),
            "step": ck.step,
            "family": cfg.model.family.as_str(),
        });
        let lines = vec![format!(
            "checkpoint: {} (step {}, epoch {})",
            ck.dir.display(),
            ck.step,
            ck.epoch
        )];
        Report { json, lines }
    }

    /// Adds the fields of `figures` to the JSON object.
    fn merge(&mut self, figures: &impl serde::Serialize) -> Result<()> {
        merge(&mut self.json, crate::report::json::to_json(figures)?);
        Ok(())
    }

    fn print(self, json: bool) -> Result<()> {
        if json {
            return print_json(&self.json);
        }
        for l in self.lines {
            outln!("{l}");
        }
        Ok(())
    }
}

/// What a test row is: an image, or a point of a 2-D set.
fn rows_word(data: &Datasets) -> &'static str {
    if crate::session::is_image(data.image_shape()) {
        "images"
    } else {
        "points"
    }
}

/// A diffusion model's bound on the test rows (see `eval::diffusion_bound`), and the sampler
/// the sample metrics below use.
fn diffusion_bound(
    report: &mut Report,
    m: &crate::models::Diffusion,
    data: &Datasets,
    s: &Settings,
) -> Result<()> {
    let r = crate::device::with_cpu_threads(s.threads, || {
        crate::eval::diffusion_bound(m, &data.test, s.limit, s.t_draws, s.seed)
    })?;
    report.merge(&serde_json::json!({ "bound": r }))?;
    let how = if r.t_draws == 0 {
        "exact sum over all T terms".to_string()
    } else {
        format!(
            "unbiased estimate: prior and L_0 exact, the {} KL terms from {} steps per row drawn in geometric strata",
            m.schedule.len() - 1,
            r.t_draws
        )
    };
    let what = rows_word(data);
    report.lines.push(format!(
        "test bound (-log p(x) <=, {} {what}, {} weights, {how}): {:.3} +- {:.3} nats (standard error over {what})",
        r.n, r.weights, r.nll, r.nll_stderr
    ));
    report.lines.push(format!(
        "  terms: prior {:.4}, reconstruction L_0 {:.3}, diffusion KLs {:.3} nats; {:.1} s",
        r.prior, r.reconstruction, r.diffusion, r.seconds
    ));
    if let Some(b) = r.bits_per_dim {
        report.lines.push(format!("bits/dim (8-bit scale): {b:.4}"));
    }
    let sampler = m.sampler_settings().describe(m.schedule.len());
    report.merge(&serde_json::json!({ "sampler": sampler }))?;
    report
        .lines
        .push(format!("sample metrics below drawn with: {sampler}"));
    Ok(())
}

/// Evaluates the checkpoint on the test set and prints the figures (or one JSON object).
///
/// # Errors
/// An unknown device, an unreadable checkpoint, `--k 0` or `--max-rows 0`, a `--limit` above the
/// test set's size, `--k-sweep` points out of order or above `--k`, data that is not what
/// the model was trained on, sizes that would not fit in memory, a failure while evaluating, or
/// a failed write to stdout.
pub(crate) fn run(a: &EvalArgs) -> Result<()> {
    let device = crate::device::open_device(a.device.as_deref().unwrap_or("cpu"))?;
    let mut ck = crate::session::load_checkpoint(&a.checkpoint, &device)?;
    crate::cli::resolve::apply_sampler_flags(&mut ck, &a.sampler)?;
    let cfg = with_data_dir(ck.config.clone(), a.data_dir.as_deref());
    refuse_flags_of_other_families(a, cfg.model.family)?;
    let s = Settings::resolve(a, &cfg)?;
    let data = crate::session::load_datasets_with(&cfg, ck.standardization.as_ref())?;
    ck.check_data(&data)?;
    if s.limit > data.test.len() {
        let flag = if a.limit.is_some() {
            "--limit"
        } else {
            "eval.limit"
        };
        bail!(
            "{flag} {}: the test set has only {} {} (0 evaluates all of them)",
            s.limit,
            data.test.len(),
            rows_word(&data)
        );
    }
    crate::memory::check(
        &format!("--max-rows {}", s.max_rows),
        crate::memory::f32_bytes(&[
            if cfg.model.family == crate::config::ModelFamily::Diffusion {
                crate::config::DIFFUSION_EVAL_ROWS
            } else {
                s.max_rows
            },
            crate::memory::widest_layer(&cfg, data.dim()),
            4,
        ]),
    )?;
    let mut report = Report::new(&ck, &cfg);
    likelihood(&mut report, &ck.model, &data, &s, a.plot.as_deref())?;
    let n = a
        .samples
        .unwrap_or(if crate::session::is_image(ck.image_shape) {
            10_000
        } else {
            2_500
        });
    crate::memory::check(
        &format!("--samples {n}"),
        crate::memory::f32_bytes(&[n, ck.model.input_dim(), 4]),
    )?;
    if n > 0 {
        let r = crate::device::with_cpu_threads(s.threads, || {
            crate::metrics::sample_metrics(&ck.model, &cfg, &data, n, s.seed)
        })?;
        report.lines.extend(r.lines());
        report.merge(&r)?;
    }
    report.print(a.json)
}

/// The likelihood figures of the model's family: a VAE's test ELBO, importance-sampled NLL,
/// bits/dim and active units; a flow's exact NLL; none for a GAN.
fn likelihood(
    report: &mut Report,
    model: &Model,
    data: &Datasets,
    s: &Settings,
    plot: Option<&std::path::Path>,
) -> Result<()> {
    match model {
        Model::Vae(model) => {
            let o = crate::eval::LikelihoodOptions {
                k: s.k,
                max_rows: s.max_rows,
                seed: s.seed,
                estimator: s.estimator,
                sweep: s.sweep.clone(),
            };
            let r = crate::device::with_cpu_threads(s.threads, || {
                crate::eval::evaluate(model, &data.test, s.limit, &o)
            })?;
            report.merge(&r)?;
            vae_lines(report, &r, data.test.len());
            if let Some(path) = plot {
                let title = format!(
                    "test NLL by k, {} estimator, {} images (same draws)",
                    r.estimator.as_str(),
                    r.n
                );
                let points: Vec<(usize, f64, f64)> = r
                    .k_sweep
                    .iter()
                    .map(|p| (p.k, p.nll, p.nll_stderr))
                    .collect();
                crate::report::plot::write_k_sweep(path, &title, &points)?;
                report
                    .lines
                    .push(format!("k-sweep plot: {}", path.display()));
            }
            report
                .lines
                .push(format!("bits/dim: {:.4}", r.bits_per_dim));
            report
                .lines
                .push(format!("active units per layer: {:?}", r.active_units));
        }
        Model::Flow(flow) => {
            let r = crate::device::with_cpu_threads(s.threads, || {
                crate::eval::evaluate_flow(flow, &data.test, s.limit, 1000)
            })?;
            report.merge(&r)?;
            report.lines.push(format!(
                "test NLL (exact, {} {}): {:.3} +- {:.3} nats",
                r.n,
                rows_word(data),
                r.nll,
                r.nll_stderr
            ));
            if let Some(b) = r.bits_per_dim {
                report.lines.push(format!("bits/dim: {b:.4}"));
            }
        }
        Model::Gan(_) => {
            report
                .lines
                .push("a GAN has no likelihood: sample metrics only".into());
        }
        Model::Diffusion(m) => diffusion_bound(report, m, data, s)?,
    }
    Ok(())
}

/// The text lines of a VAE's evaluation: the ELBO, the estimate with both of its errors named,
/// the effective sample size and the k-sweep.
fn vae_lines(report: &mut Report, r: &crate::eval::EvalReport, n_test: usize) {
    let what = match r.estimator {
        crate::eval::Estimator::Importance => "importance-sampled, z ~ q(z|x)",
        crate::eval::Estimator::Prior => "naive Monte Carlo, z ~ p(z)",
    };
    report.lines.push(format!(
        "test -ELBO ({} of {n_test} test images): {:.3} nats",
        r.n, r.test_elbo
    ));
    let mc = match r.nll_mc_stderr {
        Some(e) => format!(
            "Monte-Carlo error of the estimate at least {e:.3} nats (delta method from the drawn \
             weights: a lower bound when the ESS is small and the weights' tail is not sampled)"
        ),
        None => "no Monte-Carlo error from a single draw per image".into(),
    };
    report.lines.push(format!(
        "test NLL ({what}, k = {}, {} images): {:.3} +- {:.3} nats (standard error over images); \
         {mc}",
        r.k, r.n, r.nll, r.nll_stderr,
    ));
    report.lines.push(format!(
        "effective sample size: mean {:.1}, min {:.2} of k = {} ({:.2}%)",
        r.ess_mean,
        r.ess_min,
        r.k,
        100.0 * r.ess_fraction
    ));
    let sweep: Vec<String> = r
        .k_sweep
        .iter()
        .map(|p| format!("k={} {:.3}", p.k, p.nll))
        .collect();
    if !sweep.is_empty() {
        report
            .lines
            .push(format!("NLL by k (same draws): {}", sweep.join(", ")));
    }
}

/// Flags that only one family reads are refused for the others (one line, exit 2) rather than
/// silently ignored (`--limit` too on a GAN, which has no likelihood); `--plot` also needs a
/// `.png` name in an existing directory, checked before any work.
fn refuse_flags_of_other_families(a: &EvalArgs, family: crate::config::ModelFamily) -> Result<()> {
    use crate::config::ModelFamily;
    let vae_only = [
        ("--k", a.k.is_some()),
        ("--k-sweep", a.k_sweep.is_some()),
        ("--estimator", a.estimator.is_some()),
        ("--plot", a.plot.is_some()),
    ];
    let diffusion_only = [("--t-draws", a.t_draws.is_some())];
    // A GAN has no likelihood, so nothing reads the test images' count.
    let likelihood_only = [("--limit", a.limit.is_some())];
    for (flags, owner, applies) in [
        (&vae_only[..], "VAE-family", family == ModelFamily::Vae),
        (
            &diffusion_only[..],
            "diffusion",
            family == ModelFamily::Diffusion,
        ),
        (
            &likelihood_only[..],
            "VAE, flow and diffusion",
            family != ModelFamily::Gan,
        ),
    ] {
        if let Some((flag, _)) = flags.iter().find(|(_, given)| *given).filter(|_| !applies) {
            bail!(
                "{flag} applies to {owner} models only; this checkpoint is a {} model",
                family.as_str()
            );
        }
    }
    if let Some(p) = a.plot.as_deref() {
        let png = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !png {
            bail!("--plot {}: the plot is a PNG; name it *.png", p.display());
        }
    }
    if let Some(dir) = a.plot.as_deref().and_then(|p| p.parent()) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!(
                "--plot {}: no directory {}",
                a.plot.as_ref().expect("some").display(),
                dir.display()
            );
        }
    }
    Ok(())
}
