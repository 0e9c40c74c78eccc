//! The VAE's initialization and head options of the IWAE reference recipe (`model.init`,
//! `model.output_bias`, `model.gaussian_head`): Glorot-uniform bounds and zero biases, the
//! output bias at the logit of the data mean, and a `log_sigma` head that is the `logvar` model
//! with its scale head halved.

use candle_core::{Device, Tensor};
use gentrain::config::{
    Activation, DecoderKind, GaussianScale, LayerConfig, ModelConfig, WeightInit,
};
use gentrain::models::vae::Vae;
use gentrain::rng::{stream_rng, Stream};

const D: usize = 12;

/// A 2-layer tanh VAE on `D` inputs with the given options.
fn model(init: WeightInit, scale: GaussianScale, decoder: DecoderKind) -> Vae {
    let cfg = ModelConfig {
        activation: Activation::Tanh,
        decoder,
        layers: vec![
            LayerConfig {
                hidden: vec![9, 7],
                latent: 5,
            },
            LayerConfig {
                hidden: vec![6],
                latent: 3,
            },
        ],
        init,
        gaussian_head: scale,
        ..Default::default()
    };
    Vae::new(&cfg, D, &Device::Cpu, &mut stream_rng(4, Stream::Init, 0)).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn glorot_uniform_weights_lie_in_their_bound_and_biases_are_zero() {
    let vae = model(
        WeightInit::GlorotUniform,
        GaussianScale::Logvar,
        DecoderKind::Bernoulli,
    );
    let (mut weights, mut biases) = (0, 0);
    for (name, var) in vae.store.iter() {
        let v = values(var.as_tensor());
        if name.ends_with(".bias") {
            biases += 1;
            assert!(v.iter().all(|&b| b == 0.0), "{name}: {v:?}");
            continue;
        }
        weights += 1;
        let (d_out, d_in) = var.as_tensor().dims2().unwrap();
        let bound = (6.0 / (d_in + d_out) as f32).sqrt();
        let max = v.iter().fold(0f32, |a, &w| a.max(w.abs()));
        assert!(max <= bound, "{name}: |w| up to {max} > {bound}");
        // Uniform on [-bound, bound]: the largest of n draws is near the bound.
        assert!(max > 0.6 * bound, "{name}: |w| only up to {max} of {bound}");
    }
    assert_eq!(
        (weights, biases),
        (vae.store.len() / 2, vae.store.len() / 2)
    );
    // PyTorch's default draws the biases too, from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    let torch = model(
        WeightInit::Pytorch,
        GaussianScale::Logvar,
        DecoderKind::Bernoulli,
    );
    let b = values(torch.store.iter().nth(1).unwrap().1.as_tensor());
    assert!(b.iter().any(|&x| x != 0.0) && b.iter().all(|&x| x.abs() <= 1.0 / (D as f32).sqrt()));
}

#[test]
fn a_log_sigma_head_is_the_logvar_model_with_its_scale_head_halved() {
    let a = model(
        WeightInit::Pytorch,
        GaussianScale::Logvar,
        DecoderKind::Gaussian,
    );
    let b = model(
        WeightInit::Pytorch,
        GaussianScale::LogSigma,
        DecoderKind::Gaussian,
    );
    let names_b: Vec<String> = b.store.iter().map(|(n, _)| n.to_string()).collect();
    assert!(names_b.iter().any(|n| n == "encoders.1.log_sigma.weight"));
    assert!(names_b.iter().all(|n| !n.contains("logvar")), "{names_b:?}");
    // Copy a's parameters into b, the logvar heads halved into log_sigma heads.
    for (name, var) in a.store.iter() {
        let v = var.as_tensor();
        if name.contains(".logvar.") {
            b.store
                .set(
                    &name.replace(".logvar.", ".log_sigma."),
                    &(v * 0.5).unwrap(),
                )
                .unwrap();
        } else {
            b.store.set(name, v).unwrap();
        }
    }
    let mut rng = stream_rng(1, Stream::Eval, 0);
    let x = Tensor::rand(0f32, 1.0, (4, D), &Device::Cpu).unwrap();
    let eps = a.draw_noise(3, 4, &mut rng).unwrap();
    let (pa, pb) = (
        a.pass(&x, 3, &eps, true).unwrap(),
        b.pass(&x, 3, &eps, true).unwrap(),
    );
    for (ta, tb, what) in [
        (&pa.log_px, &pb.log_px, "log p(x|z)"),
        (
            pa.log_pz.as_ref().unwrap(),
            pb.log_pz.as_ref().unwrap(),
            "log p(z)",
        ),
        (
            pa.log_qz.as_ref().unwrap(),
            pb.log_qz.as_ref().unwrap(),
            "log q(z|x)",
        ),
        (&pa.q1.1, &pb.q1.1, "logvar of q(z1|x)"),
    ] {
        let (va, vb) = (values(ta), values(tb));
        for (x, y) in va.iter().zip(&vb) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{what}: {va:?} vs {vb:?}"
            );
        }
    }
}

#[test]
fn the_output_bias_starts_at_the_logit_of_the_data_mean() {
    let mean: Vec<f64> = (0..D).map(|d| d as f64 / (D - 1) as f64).collect();
    let vae = model(
        WeightInit::GlorotUniform,
        GaussianScale::LogSigma,
        DecoderKind::Bernoulli,
    );
    vae.set_output_bias_from_mean(&mean).unwrap();
    let bias = values(
        vae.store
            .iter()
            .find(|(n, _)| *n == "decoders.0.out.bias")
            .unwrap()
            .1
            .as_tensor(),
    );
    for (b, m) in bias.iter().zip(&mean) {
        // Means of 0 and 1 are clamped to [0.001, 0.999]: logit(0.001) = -6.9068.
        let m = m.clamp(0.001, 0.999);
        let want = (m / (1.0 - m)).ln();
        assert!((*b as f64 - want).abs() < 1e-5, "{b} vs {want}");
    }
    assert!((bias[0] as f64 + 6.906_754_778_648_554).abs() < 1e-5);
    // A Gaussian decoder's mean starts at the data mean.
    let gauss = model(
        WeightInit::Pytorch,
        GaussianScale::Logvar,
        DecoderKind::Gaussian,
    );
    gauss.set_output_bias_from_mean(&mean).unwrap();
    let mu = values(
        gauss
            .store
            .iter()
            .find(|(n, _)| *n == "decoders.0.mu.bias")
            .unwrap()
            .1
            .as_tensor(),
    );
    assert!(mu
        .iter()
        .zip(&mean)
        .all(|(a, b)| (*a as f64 - b).abs() < 1e-7));
    // A mean of the wrong length, or a NaN, is refused.
    assert!(vae.set_output_bias_from_mean(&mean[1..]).is_err());
    let mut nan = mean.clone();
    nan[2] = f64::NAN;
    assert!(vae.set_output_bias_from_mean(&nan).is_err());
}
