//! GAN checks: the discriminator's input gradient (built as a forward graph for the gradient
//! penalty) against autograd and finite differences; the penalty's gradient with respect to
//! the discriminator's weights against finite differences (the double-backward proof, with and
//! without spectral normalization); every loss on hand-computed values; spectral-norm buffers in
//! checkpoints and exact resume; and a short SN-GAN run that must find the modes of the ring.

mod common;
use common::{flat_f32, kink_checked_differences, latest_checkpoint, tensors_f32, var_function};

use candle_core::{Device, Tensor, Var};
use gentrain::config::{GanArchitecture, GanConfig, GanLoss, GanPenalty};
use gentrain::models::Gan;
use gentrain::rng::{normal_vec, stream_rng, Stream};

fn gan(cfg: GanConfig, dim: usize, seed: u64) -> Gan {
    Gan::new(
        &cfg,
        dim,
        None,
        0,
        &Device::Cpu,
        &mut stream_rng(seed, Stream::Init, 0),
    )
    .unwrap()
}

fn small(loss: GanLoss, spectral_norm: bool) -> GanConfig {
    small_with(loss, GanPenalty::None, spectral_norm)
}

fn small_with(loss: GanLoss, penalty: GanPenalty, spectral_norm: bool) -> GanConfig {
    GanConfig {
        latent: 3,
        gen_hidden: vec![6],
        disc_hidden: vec![7, 5],
        loss,
        penalty,
        r1_gamma: 3.0,
        spectral_norm,
        ..GanConfig::default()
    }
}

/// An MLP pair on 4-D rows and a DCGAN pair on 8x8 images, with and without spectral norm:
/// `(label, players, values per row)`.
fn cases(loss: GanLoss, seed: u64) -> Vec<(String, Gan, usize)> {
    cases_with(loss, GanPenalty::None, seed)
}

/// [`cases`] with a discriminator penalty.
fn cases_with(loss: GanLoss, penalty: GanPenalty, seed: u64) -> Vec<(String, Gan, usize)> {
    let small = |loss, sn| small_with(loss, penalty, sn);
    let mut out = Vec::new();
    for sn in [false, true] {
        out.push((format!("mlp sn={sn}"), gan(small(loss, sn), 4, seed), 4));
        let cfg = GanConfig {
            latent: 3,
            architecture: GanArchitecture::Dcgan,
            conv_channels: [3, 4],
            loss,
            penalty,
            r1_gamma: 3.0,
            spectral_norm: sn,
            ..GanConfig::default()
        };
        let g = Gan::new(
            &cfg,
            64,
            Some((1, 8, 8)),
            0,
            &Device::Cpu,
            &mut stream_rng(seed, Stream::Init, 0),
        )
        .unwrap();
        out.push((format!("dcgan sn={sn}"), g, 64));
        // A conditional MLP pair with a projection discriminator: 4 values and 3 classes.
        let g = Gan::new(
            &small(loss, sn),
            4,
            None,
            3,
            &Device::Cpu,
            &mut stream_rng(seed, Stream::Init, 0),
        )
        .unwrap();
        out.push((format!("conditional sn={sn}"), g, 4));
    }
    out
}

/// `n` random rows of `dim` values, followed by one-hot labels cycling through the classes of a
/// conditional `g`.
fn inputs(g: &Gan, seed: u64, n: usize, dim: usize) -> Tensor {
    let x = rows(seed, n, dim);
    if g.classes == 0 {
        return x;
    }
    let labels: Vec<u32> = (0..n).map(|i| (i % g.classes) as u32).collect();
    let y = gentrain::data::one_hot(&labels, g.classes, &Device::Cpu).unwrap();
    Tensor::cat(&[&x, &y], 1).unwrap()
}

fn rows(seed: u64, n: usize, d: usize) -> Tensor {
    Tensor::from_vec(
        normal_vec(&mut stream_rng(seed, Stream::Noise, 0), n * d),
        (n, d),
        &Device::Cpu,
    )
    .unwrap()
}

/// Finite-difference derivatives of `f` (a function of the flat f32 vector `x`) at `indices`
/// that the function's kinks cannot fake: central differences with steps 4e-3 and 1e-3 must
/// agree within 2%, otherwise a LeakyReLU kink lies within the step and `None` says so (these
/// networks are piecewise smooth); each compared with its entry of `analytic`:
/// `Some(relative error)`, or `None` at a kink.
fn fd_errors(
    f: impl Fn(&[f32]) -> f64,
    x: &[f32],
    indices: &[usize],
    analytic: impl Fn(usize) -> f64,
) -> Vec<Option<f64>> {
    kink_checked_differences(f, x, indices, 4e-3, 1e-3)
        .into_iter()
        .zip(indices)
        .map(|(fd, &i)| {
            let a = analytic(i);
            fd.map(|n| (n - a).abs() / (1e-3 + n.abs().max(a.abs())))
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    flat_f32(t).into_iter().map(|v| v as f64).collect()
}

/// candle's autograd of `sum_i D(x_i)` with respect to the rows `x` (full width, labels
/// included), the reference for the discriminator's hand-built input gradient.
fn autograd_input_gradient(g: &Gan, x: &Tensor) -> Tensor {
    let xv = Var::from_tensor(x).unwrap();
    let grads = g
        .discriminate(xv.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads.get(xv.as_tensor()).unwrap().clone()
}

#[test]
fn input_gradient_matches_autograd_and_finite_differences() {
    for (sn, mut g, dim) in cases(GanLoss::WganGp, 1) {
        for _ in 0..3 {
            g.update_spectral_vectors().unwrap();
        }
        let x = inputs(&g, 2, 9, dim);
        let width = x.dim(1).unwrap();
        let (d, grad) = g.input_gradient(&x).unwrap();
        assert_eq!(grad.dims(), [9, dim]);
        // The forward value equals the discriminator's.
        let d_plain = g.discriminate(&x).unwrap();
        for (a, b) in to_f64(&d).iter().zip(to_f64(&d_plain)) {
            assert!((a - b).abs() < 1e-6, "sn {sn}: {a} vs {b}");
        }
        // Autograd of sum D(x) with respect to x, the image part of each row only (labels are
        // not differentiated).
        let auto: Vec<f64> = to_f64(&autograd_input_gradient(&g, &x))
            .chunks(width)
            .flat_map(|r| r[..dim].to_vec())
            .collect();
        let ours = to_f64(&grad);
        for (a, b) in ours.iter().zip(&auto) {
            assert!(
                (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                "sn {sn}: {a} vs autograd {b}"
            );
        }
        // Finite differences in f32 (piecewise linear: exact away from kinks) of row r's
        // D(x) with respect to the image entries of row r.
        let xs = flat_f32(&x);
        let (mut worst, mut kinks) = (0f64, 0usize);
        for r in 0..9 {
            let row_d = |v: &[f32]| {
                let t = Tensor::from_vec(v.to_vec(), (9, width), &Device::Cpu).unwrap();
                to_f64(&g.discriminate(&t).unwrap())[r]
            };
            let entries: Vec<usize> = (0..dim).map(|c| r * width + c).collect();
            for err in fd_errors(row_d, &xs, &entries, |i| ours[r * dim + i % width]) {
                match err {
                    Some(e) => worst = worst.max(e),
                    None => kinks += 1,
                }
            }
        }
        assert!(
            worst < 2e-2,
            "{sn}: worst relative error vs finite differences {worst}"
        );
        assert!(
            kinks * 10 <= 9 * dim,
            "{sn}: {kinks} of {} entries at kinks",
            9 * dim
        );
    }
}

#[test]
fn gradient_penalty_parameter_gradient_matches_finite_differences() {
    // WGAN-GP; the same penalty with the non-saturating and hinge losses (Kurach et al.); R1
    // on the real rows (Mescheder et al.).
    let all = [
        (GanLoss::WganGp, GanPenalty::None),
        (GanLoss::NonSaturating, GanPenalty::Gp),
        (GanLoss::Hinge, GanPenalty::Gp),
        (GanLoss::NonSaturating, GanPenalty::R1),
    ];
    for (sn, mut g, dim) in all.into_iter().flat_map(|(l, p)| {
        cases_with(l, p, 3)
            .into_iter()
            .map(move |(s, g, d)| (format!("{l:?} + {p:?} {s}"), g, d))
    }) {
        g.update_spectral_vectors().unwrap();
        let x = inputs(&g, 4, 8, dim);
        let fake = inputs(&g, 5, 8, dim);
        let t = Tensor::from_vec(
            (0..8).map(|i| (i as f32 + 0.5) / 8.0).collect::<Vec<_>>(),
            (8, 1),
            &Device::Cpu,
        )
        .unwrap();
        let penalty = |g: &Gan| -> (Tensor, f64) {
            let gp = disc_loss(g, &x, &fake, &t).penalty;
            let gp = gp.unwrap();
            let v = gp.to_scalar::<f32>().unwrap() as f64;
            (gp, v)
        };
        let (gp, base) = penalty(&g);
        assert!(base > 0.0);
        let grads = gp.backward().unwrap();
        let params: Vec<(String, Var)> = g
            .disc_store
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let (mut checked, mut kinks) = (0, 0);
        for (name, var) in &params {
            // Biases move only the (piecewise constant) LeakyReLU slopes, so the penalty's
            // gradient is 0 for them almost everywhere and candle may hold none.
            let analytic = match grads.get(var.as_tensor()) {
                Some(g) => to_f64(g),
                None => vec![0.0; var.elem_count()],
            };
            // A few entries of each parameter, finite differences in f32.
            let n = var.elem_count();
            let entries = [0usize, n / 2, n - 1];
            let (x, f) = var_function(var, || penalty(&g).1);
            let errors = fd_errors(f, &x, &entries, |i| analytic[i]);
            for (&i, err) in entries.iter().zip(errors) {
                match err {
                    Some(e) => assert!(
                        e < 5e-2,
                        "{sn}: d penalty / d {name}[{i}]: autograd {} vs finite differences (error {e})",
                        analytic[i]
                    ),
                    None => kinks += 1,
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * params.len());
        // R1's values are small and its nets' kinks many: up to a third may fall at one (a
        // quarter for the gradient penalty).
        let allowed = if sn.contains("R1") { 3 } else { 4 };
        assert!(
            kinks * allowed <= checked,
            "{sn}: {kinks} of {checked} checks at kinks"
        );
    }
}

/// Sets every discriminator weight to 0 and the output bias to `c`, so that `D(x) = c`.
fn constant_discriminator(g: &Gan, c: f32) {
    let params: Vec<(String, Var)> = g
        .disc_store
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let last = params.last().unwrap().0.clone();
    for (name, var) in params {
        let value = if name == last { c } else { 0.0 };
        var.set(&(var.as_tensor().zeros_like().unwrap() + value as f64).unwrap())
            .unwrap();
    }
}

#[test]
fn losses_match_hand_computed_values() {
    let softplus = |v: f64| (1.0 + v.exp()).ln();
    let x = rows(6, 5, 2);
    let fake = rows(7, 5, 2);
    let t = Tensor::full(0.3f32, (5, 1), &Device::Cpu).unwrap();
    for c in [-1.7f32, 0.0, 0.4, 2.5] {
        let cd = c as f64;
        for (loss, want_d, want_g) in [
            (
                GanLoss::NonSaturating,
                softplus(-cd) + softplus(cd),
                softplus(-cd),
            ),
            (
                GanLoss::Hinge,
                (1.0 - cd).max(0.0) + (1.0 + cd).max(0.0),
                -cd,
            ),
            // D constant: its input gradient is 0, so the penalty is (0 - 1)^2 = 1.
            (GanLoss::WganGp, 10.0, -cd),
            // Minimax: G minimizes log(1 - sigmoid(c)) = -softplus(c).
            (
                GanLoss::Minimax,
                softplus(-cd) + softplus(cd),
                -softplus(cd),
            ),
        ] {
            let g = gan(small(loss, false), 2, 8);
            constant_discriminator(&g, c);
            let gentrain::objectives::gan::DiscriminatorLoss {
                loss: d_loss,
                d_real,
                d_fake,
                penalty: gp,
            } = disc_loss(&g, &x, &fake, &t);
            let d_loss = d_loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (d_loss - want_d).abs() < 1e-4,
                "{loss:?} c {c}: D loss {d_loss} vs {want_d}"
            );
            assert!((d_real.to_scalar::<f32>().unwrap() - c).abs() < 1e-6);
            assert!((d_fake.to_scalar::<f32>().unwrap() - c).abs() < 1e-6);
            if loss == GanLoss::WganGp {
                let gp = gp.unwrap().to_scalar::<f32>().unwrap();
                assert!((gp - 1.0).abs() < 1e-5, "penalty {gp}");
            } else {
                assert!(gp.is_none());
            }
            let g_loss = gentrain::objectives::gan::generator_loss(&g, &fake)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!(
                (g_loss - want_g).abs() < 1e-4,
                "{loss:?} c {c}: G loss {g_loss} vs {want_g}"
            );
        }
    }
    // Penalties with other losses, D constant (zero input gradient): the GP adds
    // gp_weight (0 - 1)^2 = 10, R1 adds gamma / 2 0^2 = 0.
    for (loss, penalty, want_d, want_pen) in [
        (
            GanLoss::NonSaturating,
            GanPenalty::Gp,
            softplus(-0.4) + softplus(0.4) + 10.0,
            1.0,
        ),
        (GanLoss::Hinge, GanPenalty::Gp, 0.6 + 1.4 + 10.0, 1.0),
        (
            GanLoss::NonSaturating,
            GanPenalty::R1,
            softplus(-0.4) + softplus(0.4),
            0.0,
        ),
    ] {
        let g = gan(small_with(loss, penalty, false), 2, 8);
        constant_discriminator(&g, 0.4);
        let r = disc_loss(&g, &x, &fake, &t);
        let d_loss = r.loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (d_loss - want_d).abs() < 1e-4,
            "{loss:?} + {penalty:?}: {d_loss} vs {want_d}"
        );
        let pen = r.penalty.expect("a penalty").to_scalar::<f32>().unwrap() as f64;
        assert!(
            (pen - want_pen).abs() < 1e-5,
            "{loss:?} + {penalty:?}: penalty {pen}"
        );
    }
    // The non-saturating losses stay finite where a naive log(sigmoid) would not.
    let g = gan(small(GanLoss::NonSaturating, false), 2, 8);
    constant_discriminator(&g, 200.0);
    let d_loss = disc_loss(&g, &x, &fake, &t).loss;
    assert!((d_loss.to_scalar::<f32>().unwrap() - 200.0).abs() < 1e-3);
}

#[test]
fn dcgan_generator_gradient_matches_finite_differences() {
    // The generator's gradient flows through candle's transposed-convolution backward.
    for (label, g, dim) in cases(GanLoss::NonSaturating, 12) {
        if dim != 64 {
            continue;
        }
        let z = rows(13, 6, 3);
        let out = g.generate(&z).unwrap();
        assert_eq!(out.dims(), [6, 64]);
        assert!(to_f64(&out).iter().all(|v| (0.0..=1.0).contains(v)));
        // A fixed random linear functional of G(z), reduced in f64, so that each weight's
        // derivative is far above f32 round-off.
        let r = rows(14, 6, 64).to_dtype(candle_core::DType::F64).unwrap();
        let loss = |g: &Gan| {
            let out = g
                .generate(&z)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap();
            (out * &r).unwrap().sum_all().unwrap()
        };
        let grads = loss(&g).backward().unwrap();
        let params: Vec<(String, Var)> = g
            .gen_store
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        assert_eq!(
            params.len(),
            6,
            "{label}: fc, two transposed convolutions, biases"
        );
        let mut checked = 0;
        for (name, var) in &params {
            let analytic: Vec<f64> = to_f64(grads.get(var.as_tensor()).unwrap());
            let n = var.elem_count();
            let entries = [0usize, n / 3, n - 1];
            let (x, f) = var_function(var, || loss(&g).to_scalar::<f64>().unwrap());
            let errors = fd_errors(f, &x, &entries, |i| analytic[i]);
            for (&i, err) in entries.iter().zip(errors) {
                // The generator is smooth except at ReLU kinks; a kink is rare here.
                if let Some(e) = err {
                    assert!(
                        e < 5e-2,
                        "{label}: d G loss / d {name}[{i}]: autograd {} (error {e})",
                        analytic[i]
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 15,
            "{label}: only {checked} of 18 entries checked"
        );
    }
}

#[test]
fn spectrally_normalized_layers_have_unit_spectral_norm() {
    // After enough power iterations every layer's W / sigma has largest singular value 1, so the
    // discriminator is 1-Lipschitz with LeakyReLU: |D(x) - D(y)| <= |x - y|.
    let mut cfg = small(GanLoss::Hinge, true);
    cfg.disc_hidden = vec![32, 16];
    let mut g = gan(cfg, 5, 9);
    for _ in 0..200 {
        g.update_spectral_vectors().unwrap();
    }
    let x = rows(10, 200, 5);
    let y = rows(11, 200, 5);
    let dx = to_f64(&g.discriminate(&x).unwrap());
    let dy = to_f64(&g.discriminate(&y).unwrap());
    let dist = to_f64(
        &(&x - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap(),
    );
    let mut tightest = 0f64;
    for i in 0..200 {
        let ratio = (dx[i] - dy[i]).abs() / dist[i];
        assert!(ratio <= 1.0 + 1e-4, "Lipschitz ratio {ratio} > 1");
        tightest = tightest.max(ratio);
    }
    assert!(tightest > 0.0);
    // The buffers are unit vectors under PyTorch's names.
    let names: Vec<String> = g.named_buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "disc.net.0.weight_u",
            "disc.net.0.weight_v",
            "disc.net.2.weight_u",
            "disc.net.2.weight_v",
            "disc.net.4.weight_u",
            "disc.net.4.weight_v"
        ]
    );
    for (n, b) in g.named_buffers() {
        let norm: f64 = to_f64(&b).iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{n}: norm {norm}");
    }
    assert!(g
        .disc_store
        .iter()
        .any(|(n, _)| n == "disc.net.0.weight_orig"));
}

fn ring_config(
    dir: &std::path::Path,
    epochs: usize,
    size: usize,
    extra: &str,
) -> gentrain::config::Config {
    let text = format!(
        r#"
[model]
family = "gan"
[model.gan]
latent = 8
gen_hidden = [128, 128]
disc_hidden = [128, 128]
spectral_norm = true
{extra}
[data]
dataset = "ring8"
synthetic_size = {size}
[train]
epochs = {epochs}
batch_size = 128
seed = 3
threads = 1
sample_every = 0
log_every = 1000
[optim]
kind = "adam"
lr = 1e-3
beta1 = 0.0
beta2 = 0.9
"#
    );
    let path = dir.join("ring.toml");
    std::fs::write(&path, text).unwrap();
    gentrain::config::Config::load(&path).unwrap()
}

fn options(
    out: std::path::PathBuf,
    resume: Option<std::path::PathBuf>,
) -> gentrain::train::TrainOptions {
    gentrain::train::TrainOptions {
        out,
        resume,
        progress: false,
        max_steps: None,
        handle_signals: false,
        parallel: None,
    }
}

/// The f32 tensors of `file` in a run's latest checkpoint, flattened, by name.
fn checkpoint_tensors(run: &std::path::Path, file: &str) -> Vec<(String, Vec<f32>)> {
    tensors_f32(&latest_checkpoint(run).join(file))
}

#[test]
fn spectral_norm_vectors_are_checkpointed_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ring_config(tmp.path(), 2, 1024, "loss = \"wgan_gp\"\nn_critic = 2");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    gentrain::train::train(&cfg, &options(straight.clone(), None)).unwrap();
    let mut one = cfg.clone();
    one.train.epochs = 1;
    gentrain::train::train(&one, &options(split.clone(), None)).unwrap();
    gentrain::train::train(&cfg, &options(split.clone(), Some(split.clone()))).unwrap();
    let a = checkpoint_tensors(&straight, "model.safetensors");
    assert!(
        a.iter().any(|(n, _)| n == "disc.net.0.weight_u"),
        "no u vector saved"
    );
    assert_eq!(
        a,
        checkpoint_tensors(&split, "model.safetensors"),
        "parameters or u, v differ"
    );
    assert_eq!(
        checkpoint_tensors(&straight, "optim.safetensors"),
        checkpoint_tensors(&split, "optim.safetensors"),
        "optimizer states differ"
    );
    // The loaded model carries the saved vectors.
    let ck = gentrain::session::load_checkpoint(&straight, &Device::Cpu).unwrap();
    let gentrain::session::Model::Gan(g) = ck.model else {
        panic!("not a GAN");
    };
    let saved: std::collections::HashMap<_, _> = a.into_iter().collect();
    for (n, b) in g.named_buffers() {
        assert_eq!(
            to_f64(&b).iter().map(|v| *v as f32).collect::<Vec<_>>(),
            saved[&n]
        );
    }
}

#[test]
fn sn_gan_learns_the_eight_gaussian_ring() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ring_config(tmp.path(), 40, 25_600, "loss = \"non_saturating\"");
    cfg.optim.schedule = gentrain::config::ScheduleKind::Linear;
    cfg.optim.step_epochs = 40;
    let s = gentrain::train::train(&cfg, &options(tmp.path().join("run"), None)).unwrap();
    let covered = s.final_figures["modes_covered"];
    let hq = s.final_figures["high_quality_fraction"];
    assert!(
        covered >= 7.0 && hq >= 0.5,
        "modes covered {covered} of 8, high quality {hq}"
    );
}

#[test]
fn conditional_gan_uses_its_labels() {
    let cfg = small(GanLoss::NonSaturating, true);
    let g = Gan::new(
        &cfg,
        4,
        None,
        3,
        &Device::Cpu,
        &mut stream_rng(20, Stream::Init, 0),
    )
    .unwrap();
    assert!(g.disc_store.iter().any(|(n, _)| n == "disc.embed.weight"));
    let x = rows(21, 1, 4);
    let d: Vec<f64> = (0..3)
        .map(|c| {
            let y = gentrain::data::one_hot(&[c], 3, &Device::Cpu).unwrap();
            to_f64(&g.discriminate(&Tensor::cat(&[&x, &y], 1).unwrap()).unwrap())[0]
        })
        .collect();
    assert!(
        d[0] != d[1] && d[1] != d[2],
        "the label must change D: {d:?}"
    );
    // Rows without their labels are refused with a clear error, not mis-read.
    assert!(g.discriminate(&x).is_err());
    // Samples cycle through the classes and have the image width.
    let s = g.sample(7, &mut stream_rng(22, Stream::Sample, 0)).unwrap();
    assert_eq!(s.dims(), [7, 4]);
    let z = g.noise(2, &mut stream_rng(23, Stream::Noise, 0)).unwrap();
    let y = gentrain::data::one_hot(&[0, 2], 3, &Device::Cpu).unwrap();
    let out: Vec<Vec<f32>> = g
        .generate(
            &Tensor::cat(
                &[&z.narrow(0, 0, 1).unwrap(), &z.narrow(0, 0, 1).unwrap()],
                0,
            )
            .and_then(|z| Tensor::cat(&[&z, &y], 1))
            .unwrap(),
        )
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_ne!(
        out[0], out[1],
        "the same noise with different labels must differ"
    );
}

/// The discriminator loss of `g` (see `gentrain::objectives::gan::discriminator_loss`).
fn disc_loss(
    g: &gentrain::models::Gan,
    x: &candle_core::Tensor,
    fake: &candle_core::Tensor,
    t: &candle_core::Tensor,
) -> gentrain::objectives::gan::DiscriminatorLoss {
    gentrain::objectives::gan::discriminator_loss(g, x, fake, t).unwrap()
}

#[test]
fn r1_is_the_mean_squared_input_gradient_at_the_real_rows() {
    // R1 = mean_i ||grad_x D(x_i)||^2 with the gradient from candle's autograd of sum_i D(x_i)
    // (the rows are independent), against the penalty the loss reports; the loss then adds
    // gamma / 2 times it to the non-saturating loss.
    for (label, g, dim) in cases_with(GanLoss::NonSaturating, GanPenalty::R1, 21) {
        let x = inputs(&g, 22, 6, dim);
        let fake = inputs(&g, 23, 6, dim);
        let t = Tensor::full(0.5f32, (6, 1), &Device::Cpu).unwrap();
        let r = disc_loss(&g, &x, &fake, &t);
        let reported = r.penalty.unwrap().to_scalar::<f32>().unwrap() as f64;
        let gx = autograd_input_gradient(&g, &x).narrow(1, 0, dim).unwrap();
        let want = to_f64(&gx).iter().map(|v| v * v).sum::<f64>() / 6.0;
        assert!(
            (reported - want).abs() <= 1e-4 * (1.0 + want),
            "{label}: R1 {reported} vs autograd {want}"
        );
        let ns = {
            let d_real = g.discriminate(&x).unwrap();
            let d_fake = g.discriminate(&fake).unwrap();
            let sp = |v: f64| (1.0 + v.exp()).ln();
            let mean = |t: &Tensor, f: &dyn Fn(f64) -> f64| {
                let v = to_f64(t);
                v.iter().map(|x| f(*x)).sum::<f64>() / v.len() as f64
            };
            mean(&d_real, &|v| sp(-v)) + mean(&d_fake, &sp)
        };
        let total = r.loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (total - (ns + 1.5 * reported)).abs() <= 1e-4 * (1.0 + total.abs()),
            "{label}: loss {total} vs {ns} + 3/2 {reported}"
        );
    }
}

/// A resume that changes the loss trains with the new loss (it used to keep the checkpoint's
/// settings while recording the new ones): the minimax generator loss `-softplus(D(G(z)))` is
/// negative, the non-saturating `softplus(-D(G(z)))` positive.
#[test]
fn a_resume_trains_with_the_loss_it_records() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ring_config(tmp.path(), 10, 1024, "loss = \"minimax\"");
    cfg.train.log_every = 2;
    let run = tmp.path().join("run");
    let mut o = options(run.clone(), None);
    o.max_steps = Some(6);
    gentrain::train::train(&cfg, &o).unwrap();
    let g_losses = |from_step: u64| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["event"] == "train" && v["step"].as_u64().unwrap() > from_step)
            .filter_map(|v| v["g_loss"].as_f64())
            .collect()
    };
    let before = g_losses(0);
    assert!(
        !before.is_empty() && before.iter().all(|&g| g < 0.0),
        "{before:?}"
    );
    let mut resumed = cfg.clone();
    resumed.model.gan.loss = GanLoss::NonSaturating;
    let mut o = options(run.clone(), Some(run.clone()));
    o.max_steps = Some(12);
    gentrain::train::train(&resumed, &o).unwrap();
    let after = g_losses(6);
    assert!(
        !after.is_empty() && after.iter().all(|&g| g > 0.0),
        "{after:?}"
    );
    // A GAN has no likelihood: `eval --limit` is refused rather than ignored.
    let out = common::trainer(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--limit",
        "10",
        "--samples",
        "0",
    ]);
    common::assert_user_error(
        &out,
        "--limit applies to VAE, flow and diffusion models only",
    );
}
