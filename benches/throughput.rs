//! Criterion benchmarks: each fused kernel at 1M and 16M elements, and one training step of the
//! benchmarked configurations. The device comes from `GENTRAIN_BENCH_DEVICE` (`cpu` by default,
//! `cuda:0` in a `cuda` build); every timed iteration ends with a device synchronize, so GPU
//! timings include the kernels, not just their launches. `trainer bench-kernels` reports the same
//! kernels as GB/s against a device copy, and `trainer bench` the training throughput.
//!
//!     cargo bench --bench throughput
//!     GENTRAIN_BENCH_DEVICE=cuda:0 cargo bench --features cuda --bench throughput

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gentrain::config::Config;
use gentrain::ops::{bernoulli, gaussian, linear, logsumexp};

fn device() -> Device {
    let spec = std::env::var("GENTRAIN_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    gentrain::device::open_device(&spec).expect("GENTRAIN_BENCH_DEVICE names a usable device")
}

fn timed(dev: &Device, iters: u64, f: &dyn Fn()) -> Duration {
    dev.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    t0.elapsed()
}

/// (name, bytes moved per element, one call).
type Case<'a> = (&'static str, usize, Box<dyn Fn() + 'a>);

fn kernels(c: &mut Criterion) {
    let dev = device();
    let mut g = c.benchmark_group("kernels");
    g.sample_size(10);
    for &n in &[1usize << 20, 1 << 24] {
        let rows = n / 784;
        let u = || Tensor::rand(-3f32, 3f32, (rows, 784), &dev).unwrap();
        let (a, b, e) = (u(), u(), u());
        let bits = u().ge(0.0).unwrap().to_dtype(DType::F32).unwrap();
        let bias = Tensor::rand(-1f32, 1f32, 784, &dev).unwrap();
        let cases: Vec<Case> = vec![
            (
                "reparameterize",
                16,
                Box::new(|| drop(gaussian::reparameterize(&a, &b, &e).unwrap())),
            ),
            (
                "gaussian_kl",
                8,
                Box::new(|| drop(gaussian::gaussian_kl(&a, &b).unwrap())),
            ),
            (
                "bernoulli_loglik",
                8,
                Box::new(|| drop(bernoulli::bernoulli_log_likelihood(&a, &bits).unwrap())),
            ),
            (
                "logsumexp",
                4,
                Box::new(|| drop(logsumexp::logsumexp(&a).unwrap())),
            ),
            (
                "bias_act_tanh",
                8,
                Box::new(|| drop(linear::bias_act(&a, &bias, linear::Activation::Tanh).unwrap())),
            ),
        ];
        for (name, bytes_per_elem, f) in &cases {
            g.throughput(Throughput::Bytes((rows * 784 * bytes_per_elem) as u64));
            g.bench_with_input(BenchmarkId::new(*name, n), &n, |bch, _| {
                bch.iter_custom(|iters| timed(&dev, iters, f.as_ref()))
            });
        }
    }
    g.finish();
}

fn train_steps(c: &mut Criterion) {
    let dev = device();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    for (name, file, batch) in [
        ("vae-784-400-20-b128", "configs/vae-examples.toml", 128usize),
        ("vae-784-400-20-b1024", "configs/vae-examples.toml", 1024),
        (
            "iwae-1layer-k50-b20",
            "configs/iwae-table1/iwae-1layer-k50.toml",
            20,
        ),
        (
            "iwae-2layer-k5-b20",
            "configs/iwae-table1/iwae-2layer-k5.toml",
            20,
        ),
    ] {
        let mut cfg = Config::load(&root.join(file)).unwrap();
        cfg.data.dir = root.join("data/mnist");
        cfg.train.batch_size = batch;
        let data = gentrain::session::load_datasets(&cfg).unwrap();
        let model = gentrain::session::build_vae(&cfg, data.dim(), &dev).unwrap();
        let mut opt = gentrain::optim::Optimizer::new(&cfg.optim, &model.store).unwrap();
        let idx: Vec<u32> = (0..batch as u32).collect();
        g.throughput(Throughput::Elements(batch as u64));
        let mut step = 0u64;
        g.bench_function(name, |bch| {
            bch.iter_custom(|iters| {
                dev.synchronize().unwrap();
                let t0 = Instant::now();
                for _ in 0..iters {
                    gentrain::train::train_step(
                        &model,
                        &mut opt,
                        &cfg,
                        &data.train,
                        &idx,
                        step,
                        1.0,
                        1e-3,
                        &dev,
                        None,
                        gentrain::rng::Draws::for_device(&dev),
                    )
                    .unwrap();
                    step += 1;
                }
                dev.synchronize().unwrap();
                t0.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, kernels, train_steps);
criterion_main!(benches);
