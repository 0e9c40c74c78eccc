//! Spectral normalization (Miyato et al. 2018, "Spectral Normalization for Generative
//! Adversarial Networks", algorithm 1): `W_sn = W / sigma(W)`, with the largest singular value
//! `sigma(W)` estimated by power iteration on a persistent vector `u`:
//!
//! `v <- W^T u / ||W^T u||`, `u <- W v / ||W v||` (`iterations` times, no gradient), then
//! `sigma = u^T W v`, differentiable in `W` with `u`, `v` held fixed; the gradient of a loss
//! through `W / sigma` is the paper's eq. 12 (`(dL/dW_sn - (dL/dW_sn . W_sn) u v^T) / sigma`).
//! `u` and `v` are buffers carried from step to step (and in checkpoints), as in PyTorch's
//! `torch.nn.utils.spectral_norm`, whose `eps = 1e-12` normalization this follows.
//!
//! The iteration is two matrix-vector products per step composed of candle ops, so it runs on
//! every device (cuBLAS GEMV on CUDA); its cost next to the layer's GEMM is `1 / batch`.

use candle_core::{Result, Tensor, D};

/// PyTorch's normalization epsilon.
const EPS: f64 = 1e-12;

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_all()?.sqrt()?;
    x.broadcast_div(&(norm + EPS)?)
}

/// `w` as the matrix spectral normalization sees: `(out, in)` for a dense layer, and a
/// convolution kernel `(out, in, kh, kw)` flattened to `(out, in * kh * kw)` (PyTorch's
/// `dim = 0`).
fn as_matrix(w: &Tensor) -> Result<Tensor> {
    w.flatten_from(1)
}

/// `iterations` (at least 1) power-iteration steps for the weight `w` (any rank, see
/// [`as_matrix`]) from `u: (out)`; returns the new `(u, v)`, detached.
pub fn power_iteration(w: &Tensor, u: &Tensor, iterations: usize) -> Result<(Tensor, Tensor)> {
    let w = as_matrix(&w.detach())?;
    let mut u = u.detach();
    let mut v;
    let mut i = 0;
    loop {
        v = normalize(&w.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
        u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
        i += 1;
        if i >= iterations {
            return Ok((u, v));
        }
    }
}

/// `sigma = u^T W v` (differentiable in `w`, any rank).
pub fn sigma(w: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    u.unsqueeze(0)?
        .matmul(&as_matrix(w)?.matmul(&v.unsqueeze(1)?)?)?
        .squeeze(D::Minus1)?
        .squeeze(0)
}

/// `W / sigma(W)` with `sigma` from the (fixed) vectors `u`, `v`, in `w`'s own shape.
pub fn normalized(w: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    w.broadcast_div(&sigma(w, u, v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Largest singular value by many power iterations in f64.
    fn sigma_max(w: &[Vec<f64>]) -> f64 {
        let (m, n) = (w.len(), w[0].len());
        let mut v = vec![1.0; n];
        let mut s = 0.0;
        for _ in 0..5000 {
            let u: Vec<f64> = (0..m)
                .map(|i| (0..n).map(|j| w[i][j] * v[j]).sum())
                .collect();
            let nv: Vec<f64> = (0..n)
                .map(|j| (0..m).map(|i| w[i][j] * u[i]).sum())
                .collect();
            let norm = nv.iter().map(|x| x * x).sum::<f64>().sqrt();
            s = norm.sqrt();
            v = nv.iter().map(|x| x / norm).collect();
        }
        s
    }

    #[test]
    fn power_iteration_finds_the_largest_singular_value() {
        for (seed, (m, n)) in [(1u64, (5, 3)), (2, (17, 31)), (3, (64, 2)), (4, (1, 9))] {
            let w = crate::ops::testing::uniform(seed, &[m, n], -1.0, 1.0);
            let rows: Vec<Vec<f64>> = w
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as f64).collect())
                .collect();
            let exact = sigma_max(&rows);
            let u0 = normalize(&crate::ops::testing::uniform(seed + 10, &[m], -1.0, 1.0)).unwrap();
            let (u, v) = power_iteration(&w, &u0, 200).unwrap();
            let s = sigma(&w, &u, &v).unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((s - exact).abs() / exact < 1e-4, "{m}x{n}: {s} vs {exact}");
            // The normalized matrix has spectral norm 1.
            let wn = normalized(&w, &u, &v).unwrap();
            let rows: Vec<Vec<f64>> = wn
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as f64).collect())
                .collect();
            assert!((sigma_max(&rows) - 1.0).abs() < 1e-4);
        }
        let _ = Device::Cpu;
    }

    #[test]
    fn gradient_through_the_normalization_matches_finite_differences() {
        let w = crate::ops::testing::uniform(7, &[4, 3], -1.0, 1.0);
        let u0 = normalize(&crate::ops::testing::uniform(8, &[4], -1.0, 1.0)).unwrap();
        let (u, v) = power_iteration(&w, &u0, 50).unwrap();
        let c = crate::ops::testing::uniform(9, &[4, 3], -1.0, 1.0);
        // L(W) = sum(C * W / sigma(W)), u and v fixed.
        let loss = |w: &Tensor| -> Tensor {
            (normalized(w, &u, &v).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let var = candle_core::Var::from_tensor(&w).unwrap();
        let g = loss(var.as_tensor()).backward().unwrap();
        let g: Vec<f32> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..flat.len() {
            let at = |d: f32| {
                let mut x = flat.clone();
                x[i] += d;
                let t = Tensor::from_vec(x, (4, 3), &Device::Cpu).unwrap();
                loss(&t).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(1e-3) - at(-1e-3)) / 2e-3;
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "entry {i}: {} vs {fd}",
                g[i]
            );
        }
    }
}
