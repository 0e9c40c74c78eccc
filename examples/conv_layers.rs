//! Times the CPU convolution op on the MNIST U-Net's layer shapes (batch 128): the forward
//! pass, and the forward plus the backward of `sum(conv2d(x, w, b) * r)` to `x`, `w` and `b`,
//! in ms (best of `--repeats`). `scripts/conv_layers_torch.py` times PyTorch on the same shapes.
//!
//! `cargo run --release --example conv_layers -- [--repeats N]` (threads: `RAYON_NUM_THREADS`).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use gentrain::ops::conv::{conv2d, conv_transpose2d};

/// `(x dims, w dims, stride, padding)` of each layer shape of `configs/ddpm-mnist.toml`.
const SHAPES: [([usize; 4], [usize; 4], usize, usize); 10] = [
    ([128, 1, 28, 28], [32, 1, 3, 3], 1, 1),
    ([128, 32, 28, 28], [32, 32, 3, 3], 1, 1),
    ([128, 64, 28, 28], [32, 64, 3, 3], 1, 1),
    ([128, 32, 28, 28], [32, 32, 3, 3], 2, 1),
    ([128, 64, 14, 14], [64, 64, 3, 3], 1, 1),
    ([128, 128, 14, 14], [64, 128, 3, 3], 1, 1),
    ([128, 64, 7, 7], [64, 64, 3, 3], 1, 1),
    ([128, 128, 7, 7], [64, 128, 3, 3], 1, 1),
    ([128, 32, 28, 28], [1, 32, 3, 3], 1, 1),
    ([128, 64, 14, 14], [64, 64, 3, 3], 2, 1),
];

fn best(
    repeats: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    gentrain::device::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let repeats = args
        .iter()
        .position(|a| a == "--repeats")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(8);
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    let dev = Device::Cpu;
    println!("| x | w | s, p | forward ms | forward + backward ms | input grad ms | fwd + weight grad ms |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: |");
    for (n, (xd, wd, s, p)) in SHAPES.into_iter().enumerate() {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, &xd, &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, &wd, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, wd[0], &dev)?)?;
        let y = conv2d(&x, &w, Some(&b), s, p)?;
        let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
        let fwd = best(repeats, || conv2d(&x, &w, Some(&b), s, p).map(|_| ()))?;
        let both = best(repeats, || {
            let loss = (conv2d(&x, &w, Some(&b), s, p)? * &r)?.sum_all()?;
            loss.backward().map(|_| ())
        })?;
        let dy = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
        let hw = (xd[2], xd[3]);
        let dx = best(repeats, || {
            let t = conv_transpose2d(&dy, w.as_tensor(), None, s, p)?;
            // conv_transpose2d's output size may differ by the stride's remainder; only timed.
            let _ = (t, hw);
            Ok(())
        })?;
        let xc = x.as_tensor().detach();
        let dw = best(repeats, || {
            let loss = (conv2d(&xc, &w, Some(&b), s, p)? * &r)?.sum_all()?;
            loss.backward().map(|_| ())
        })?;
        println!("| {xd:?} | {wd:?} | {s}, {p} | {fwd:.1} | {both:.1} | {dx:.1} | {dw:.1} |");
    }
    Ok(())
}
