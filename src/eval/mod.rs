//! Evaluation of VAE-family models on held-out data:
//!
//! - test ELBO (one sample per point; closed-form KL for one stochastic layer, Monte-Carlo KL
//!   otherwise);
//! - the importance-sampled log-likelihood of Burda et al. 2016 (section 5.2):
//!   `log p(x) ~ LSE_i(log w_i) - ln k`, `i = 1..k`, `z_i ~ q(z|x)`, reported as the negative
//!   log-likelihood in nats (k = 5000 in the paper). Samples are processed in chunks whose running
//!   log-sum-exps are merged, so memory is bounded by `max_rows` at any k; with the effective
//!   sample size, the estimator's Monte-Carlo error, the k-sweep and the naive prior-sampling
//!   estimate for comparison ([`likelihood`]);
//! - active units (Burda et al. 2016, section 5.2): dimension `j` of layer `l` is active when
//!   `Cov_x(E_q[z_lj | x]) > 0.01`. For layers above the first, `E_q[z_l|x]` is approximated by
//!   propagating means (`z_{l-1} = mu_{l-1}`);
//! - bits per dimension `nll / (D ln 2)`, or `(nll + D ln 256) / (D ln 2)` on dequantized 8-bit data.

use candle_core::Tensor;
use serde::Serialize;

use crate::config::ObjectiveConfig;
use crate::data::DataSource;
use crate::error::Result;
use crate::models::{Diffusion, Flow, Vae};
use crate::objectives::{needs_densities, objective};
use crate::rng::{stream_rng, Stream};

pub mod likelihood;

pub use likelihood::{Estimator, LikelihoodOptions, LikelihoodSummary, SweepPoint};

/// Everything `trainer eval` reports for a VAE-family model.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Negative test ELBO in nats, as a positive number (an upper bound on `nll`).
    pub test_elbo: f64,
    /// `importance` (`z ~ q(z | x)`) or `prior` (`z ~ p(z)`): how `nll` was estimated.
    pub estimator: Estimator,
    /// Estimated negative log-likelihood in nats (positive).
    pub nll: f64,
    /// Standard error of `nll` over images (their spread / sqrt(n)), not the estimator's error.
    pub nll_stderr: f64,
    /// The estimator's own Monte-Carlo error of `nll` in nats (delta method from the effective
    /// sample sizes, a lower bound when they are small; `None` for k = 1; see
    /// [`likelihood::LikelihoodSummary`]).
    pub nll_mc_stderr: Option<f64>,
    /// Draws per image.
    pub k: usize,
    /// Images evaluated.
    pub n: usize,
    /// `nll / (D ln 2)`.
    pub bits_per_dim: f64,
    /// Mean effective sample size `(sum w)^2 / sum w^2` of the normalized weights over images.
    pub ess_mean: f64,
    /// Smallest effective sample size of any image.
    pub ess_min: f64,
    /// `ess_mean / k`.
    pub ess_fraction: f64,
    /// The estimate from the first k' draws of the same draws, ascending in k' (k' = 1: the
    /// one-sample ELBO estimate).
    pub k_sweep: Vec<SweepPoint>,
    /// Active units of each stochastic layer.
    pub active_units: Vec<usize>,
    /// Wall-clock seconds of the evaluation.
    pub seconds: f64,
}

/// Mean ELBO (nats) over the first `n` rows of `data`, in batches of `batch`.
pub fn mean_elbo(model: &Vae, data: &DataSource, n: usize, batch: usize, seed: u64) -> Result<f64> {
    let cfg = ObjectiveConfig {
        kl: if model.latents.len() == 1 {
            crate::config::KlEstimator::Analytic
        } else {
            crate::config::KlEstimator::MonteCarlo
        },
        ..Default::default()
    };
    let dens = needs_densities(&cfg, model.latents.len());
    let mut total = 0f64;
    let mut start = 0;
    let mut chunk = 0u64;
    while start < n {
        let b = batch.min(n - start);
        let x = data.range(start, b, model.device())?;
        let eps = model.draw_noise(1, b, &mut stream_rng(seed, Stream::Eval, chunk))?;
        let pass = model.pass(&x.detach(), 1, &eps, dens)?;
        let bound = objective(&pass, &cfg, 1, 1.0)?.bound.to_scalar::<f32>()? as f64;
        total += bound * b as f64;
        start += b;
        chunk += 1;
    }
    Ok(total / n.max(1) as f64)
}

/// Per-image importance-sampled `log p(x)` estimates with `k` samples for the first `n` rows
/// (see [`likelihood::estimate`] for the ESS, the k-sweep and the prior estimator).
pub fn importance_sampled_log_likelihood(
    model: &Vae,
    data: &DataSource,
    n: usize,
    k: usize,
    max_rows: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let o = LikelihoodOptions {
        k,
        max_rows,
        seed,
        estimator: Estimator::Importance,
        sweep: Vec::new(),
    };
    Ok(likelihood::estimate(model, data, n, &o)?.log_likelihood)
}

/// The mean negative log-likelihood of per-image log-likelihoods `ll` (nats) and its standard
/// error over images (sample standard deviation / sqrt(n)). When the mean is infinite (some
/// image has probability zero) the error is `+inf`; when it is NaN, NaN: never a finite-looking
/// figure beside a non-finite mean.
pub fn mean_nll_and_stderr(ll: &[f64]) -> (f64, f64) {
    let n = ll.len();
    let nll = -ll.iter().sum::<f64>() / n.max(1) as f64;
    if !nll.is_finite() {
        return (
            nll,
            if nll.is_nan() {
                f64::NAN
            } else {
                f64::INFINITY
            },
        );
    }
    let var = ll.iter().map(|v| (-v - nll).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
    (nll, (var / n.max(1) as f64).sqrt())
}

/// Active units per stochastic layer over the first `n` rows.
pub fn active_units(model: &Vae, data: &DataSource, n: usize, batch: usize) -> Result<Vec<usize>> {
    let mut means: Vec<Vec<Tensor>> = vec![Vec::new(); model.latents.len()];
    let mut start = 0;
    while start < n {
        let b = batch.min(n - start);
        let x = data.range(start, b, model.device())?;
        let layer_means = model.posterior_means(&x)?;
        for (acc, m) in means.iter_mut().zip(layer_means) {
            acc.push(m.detach());
        }
        start += b;
    }
    let mut counts = Vec::new();
    for layer in means {
        let m = Tensor::cat(&layer, 0)?;
        let centered = m.broadcast_sub(&m.mean_keepdim(0)?)?;
        let var: Vec<f32> = centered.sqr()?.mean(0)?.to_vec1()?;
        counts.push(var.iter().filter(|v| **v > 0.01).count());
    }
    Ok(counts)
}

/// Bits per dimension of a negative log-likelihood `nll` (nats per row) on `data`: `nll / (D ln 2)`
/// for binary data; for dequantized 8-bit data the density lives on `[0, 1)^D`, and on the pixel
/// scale (`[0, 256)^D`, bins of width 1) it is `(nll + D ln 256) / (D ln 2)`.
pub fn bits_per_dim(nll: f64, data: &DataSource) -> f64 {
    crate::objectives::bits_per_dim(nll, data.dim(), data.is_dequantized())
}

/// Runs the full evaluation on the first `limit` rows (0: all) of `data`: the test ELBO, the
/// likelihood estimate of `o` with its ESS, Monte-Carlo error and k-sweep, bits/dim and the
/// active units.
///
/// # Errors
/// As [`likelihood::estimate`], or a failure of the model.
pub fn evaluate(
    model: &Vae,
    data: &DataSource,
    limit: usize,
    o: &LikelihoodOptions,
) -> Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let n = if limit == 0 {
        data.len()
    } else {
        limit.min(data.len())
    };
    let test_elbo = mean_elbo(model, data, n, 1000, o.seed)?;
    let s = likelihood::estimate(model, data, n, o)?.summary(o.k, o.estimator);
    Ok(EvalReport {
        test_elbo: -test_elbo,
        estimator: s.estimator,
        nll: s.nll,
        nll_stderr: s.nll_stderr,
        nll_mc_stderr: s.nll_mc_stderr,
        k: o.k,
        n,
        bits_per_dim: bits_per_dim(s.nll, data),
        ess_mean: s.ess_mean,
        ess_min: s.ess_min,
        ess_fraction: s.ess_fraction,
        k_sweep: s.k_sweep,
        active_units: active_units(model, data, n, 1000)?,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What a flow's evaluation reports.
#[derive(Debug, Clone, Serialize)]
pub struct FlowEvalReport {
    /// Exact negative log-likelihood in nats per row (for images, of the density on `[0, 1)^D`
    /// of the dequantized data).
    pub nll: f64,
    /// Standard error of `nll` over rows.
    pub nll_stderr: f64,
    /// Bits per dimension on the 8-bit pixel scale (images only).
    pub bits_per_dim: Option<f64>,
    /// Rows evaluated.
    pub n: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The exact test log-likelihood of a flow (change of variables, no sampling) on the first
/// `limit` rows (0: all) of `data`, in batches of `batch`.
pub fn evaluate_flow(
    flow: &Flow,
    data: &DataSource,
    limit: usize,
    batch: usize,
) -> Result<FlowEvalReport> {
    let t0 = std::time::Instant::now();
    let n = if limit == 0 {
        data.len()
    } else {
        limit.min(data.len())
    };
    let mut ll = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let b = batch.min(n - start);
        let x = data.range(start, b, flow.device())?;
        let lp: Vec<f32> = flow.data_log_prob(&x)?.to_vec1()?;
        ll.extend(lp.into_iter().map(|v| v as f64));
        start += b;
    }
    let (nll, nll_stderr) = mean_nll_and_stderr(&ll);
    Ok(FlowEvalReport {
        nll,
        nll_stderr,
        bits_per_dim: flow.uses_logit().then(|| bits_per_dim(nll, data)),
        n,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What the diffusion bound's evaluation reports.
#[derive(Debug, Clone, Serialize)]
pub struct DiffusionBoundReport {
    /// The variational bound `L_vlb` on `-log p(x_0)` in nats per row (an upper bound on the
    /// negative log-likelihood; for images, of the 8-bit values).
    pub nll: f64,
    /// Standard error of `nll` over rows (it includes the Monte-Carlo error of the estimate).
    pub nll_stderr: f64,
    /// `nll / (D ln 2)`: bits per dimension on the 8-bit scale (images only).
    pub bits_per_dim: Option<f64>,
    /// Rows evaluated.
    pub n: usize,
    /// `exact` (all T terms per row) or `stratified` (the Monte-Carlo estimate of the KL
    /// terms from `t_draws` steps per row, one per geometric stratum).
    pub estimator: &'static str,
    /// The weights evaluated: `ema` (the exponential moving average, when the model keeps
    /// one) or `online` (the trained weights).
    pub weights: &'static str,
    /// Steps drawn per row for the `T - 1` KL terms, one per stratum (0: all of them, exactly).
    pub t_draws: usize,
    /// Mean prior term `L_T` in nats per row.
    pub prior: f64,
    /// Mean reconstruction term `L_0` in nats per row.
    pub reconstruction: f64,
    /// Mean of the KL terms' sum in nats per row.
    pub diffusion: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// At most `k` strata of `0..n`, as `(start, length)`, spaced geometrically (boundaries at
/// `round(n^(i/k))`), so the first steps, whose terms are the largest and vary the most, get
/// strata of their own; `k >= n` gives every step its own stratum.
fn strata(n: usize, k: usize) -> Vec<(usize, usize)> {
    if k >= n {
        return (0..n).map(|i| (i, 1)).collect();
    }
    let mut bounds = vec![0usize];
    for i in 1..=k {
        let b = ((n as f64).powf(i as f64 / k as f64).round() as usize).clamp(1, n);
        if b > *bounds.last().expect("starts with 0") {
            bounds.push(b);
        }
    }
    bounds.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// The diffusion model's variational bound on the first `limit` rows (0: all) of `data`, from
/// the evaluation (EMA) weights, every term as `objectives::diffusion` defines it:
///
/// - `t_draws = 0`: the exact sum over all T terms per row, each KL term with one draw of
///   `x_t ~ q(x_t | x_0)` (as the reference `calc_bpd_loop`): T network passes per row;
/// - `t_draws = K > 0`: an unbiased estimate that computes the prior term exactly and the
///   reconstruction term `L_0` with one draw, and estimates the sum of the `T - 1` KL terms by
///   stratified sampling: the steps `1..T` cut into at most `K` geometrically spaced strata
///   (the first steps alone, the last ones in long strata), one step drawn uniformly in each
///   per row, its term weighted by its stratum's length: at most `K + 1` passes per row. The
///   KL terms are largest and most variable near `t = 1`; uniform draws over `t` would be
///   unbiased but so skewed that small `K` underestimates in practice (measured on the
///   grid-25 model: 4 uniform draws gave 5.0 nats for an exact 6.6).
///
/// The draws come from streams keyed by `seed`, so the figure is reproducible.
pub fn diffusion_bound(
    model: &Diffusion,
    data: &DataSource,
    limit: usize,
    t_draws: usize,
    seed: u64,
) -> Result<DiffusionBoundReport> {
    use rand::Rng;
    let t0 = std::time::Instant::now();
    let n = if limit == 0 {
        data.len()
    } else {
        limit.min(data.len())
    };
    let steps = model.schedule.len();
    let w = model.eval_weights();
    let clip = model.image.is_some() && model.cfg.clip_denoised;
    let (mut total, mut prior_sum, mut rec_sum, mut diff_sum) =
        (Vec::with_capacity(n), 0.0, 0.0, 0.0);
    let chunk = crate::config::DIFFUSION_EVAL_ROWS;
    let mut start = 0;
    while start < n {
        let b = chunk.min(n - start);
        let x0 = model.to_model_space(&data.range(start, b, model.device())?)?;
        let mut rng = stream_rng(seed, Stream::Eval, start as u64);
        let mut term = |t: Vec<u32>| -> Result<Vec<f64>> {
            let eps = Tensor::from_vec(
                crate::rng::normal_vec(&mut rng, b * model.dim),
                (b, model.dim),
                model.device(),
            )?;
            let ids = Tensor::from_slice(&t, b, model.device())?;
            let x_t = crate::ops::diffusion::q_sample(&x0, &eps, &ids, &model.q_table)?;
            let out = model.forward(&w, &x_t, &t)?;
            let v: Vec<f32> =
                crate::objectives::diffusion::vb_terms(model, &out, &x0, &x_t, &t, clip)?
                    .to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        let prior: Vec<f32> =
            crate::objectives::diffusion::prior_kl(&model.schedule, &x0)?.to_vec1()?;
        let rec = term(vec![0; b])?;
        let mut kl = vec![0.0f64; b];
        if t_draws == 0 {
            for t in 1..steps {
                for (k, v) in kl.iter_mut().zip(term(vec![t as u32; b])?) {
                    *k += v;
                }
            }
        } else if steps > 1 {
            let mut trng = stream_rng(seed, Stream::Timestep, start as u64);
            for (lo, len) in strata(steps - 1, t_draws) {
                let t: Vec<u32> = (0..b)
                    .map(|_| 1 + (lo + trng.random_range(0..len)) as u32)
                    .collect();
                for (k, v) in kl.iter_mut().zip(term(t)?) {
                    *k += v * len as f64;
                }
            }
        }
        for i in 0..b {
            let p = f64::from(prior[i]);
            prior_sum += p;
            rec_sum += rec[i];
            diff_sum += kl[i];
            // As log-likelihoods, for the shared mean-and-error helper.
            total.push(-(p + rec[i] + kl[i]));
        }
        start += b;
    }
    let (nll, nll_stderr) = mean_nll_and_stderr(&total);
    let nf = n.max(1) as f64;
    Ok(DiffusionBoundReport {
        nll,
        nll_stderr,
        bits_per_dim: model
            .image
            .is_some()
            .then(|| nll / (model.dim as f64 * std::f64::consts::LN_2)),
        n,
        estimator: if t_draws == 0 { "exact" } else { "stratified" },
        weights: if model.ema.is_some() { "ema" } else { "online" },
        t_draws,
        prior: prior_sum / nf,
        reconstruction: rec_sum / nf,
        diffusion: diff_sum / nf,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::likelihood::log_add_exp;
    use super::*;

    #[test]
    fn strata_partition_the_steps_with_the_first_ones_alone() {
        for (n, k) in [
            (999, 16),
            (999, 4),
            (999, 1),
            (49, 8),
            (10, 10),
            (10, 50),
            (1, 3),
        ] {
            let s = strata(n, k);
            assert!(s.len() <= k.max(1) || k >= n, "{n} {k}: {s:?}");
            let mut next = 0;
            for &(a, len) in &s {
                assert_eq!(a, next, "{n} {k}: {s:?}");
                assert!(len >= 1);
                next = a + len;
            }
            assert_eq!(next, n, "{n} {k}: {s:?}");
            // Lengths never shrink: the short strata are the first steps.
            assert!(s.windows(2).all(|w| w[0].1 <= w[1].1 + 1), "{n} {k}: {s:?}");
        }
        assert_eq!(strata(999, 32)[0], (0, 1));
        assert!(strata(999, 16)[0].1 <= 2);
        assert_eq!(strata(5, 9).len(), 5);
    }

    #[test]
    fn log_add_exp_propagates_nan_and_infinities() {
        assert!(log_add_exp(f64::NAN, 1.0).is_nan() && log_add_exp(1.0, f64::NAN).is_nan());
        assert!(log_add_exp(f64::NEG_INFINITY, f64::NAN).is_nan());
        assert_eq!(log_add_exp(f64::INFINITY, 1.0), f64::INFINITY);
        assert_eq!(log_add_exp(f64::NEG_INFINITY, 1.5), 1.5);
        assert!((log_add_exp(0.0, 0.0) - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn the_error_of_a_non_finite_mean_is_not_finite_either() {
        let (m, e) = mean_nll_and_stderr(&[-1.0, f64::NEG_INFINITY]);
        assert_eq!((m, e), (f64::INFINITY, f64::INFINITY));
        let (m, e) = mean_nll_and_stderr(&[-1.0, f64::NAN]);
        assert!(m.is_nan() && e.is_nan());
        let (m, e) = mean_nll_and_stderr(&[-1.0, -3.0]);
        assert_eq!(m, 2.0);
        assert!((e - 1.0).abs() < 1e-12);
    }
}
