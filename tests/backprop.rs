//! The patches of the vendored candle-core (`vendor/candle-core/GENTRAIN.md`): sums over leading
//! dimensions add whole runs at once (bit-identical to the release), and in the backward pass a
//! tensor's first gradient contribution is stored as it is instead of being added onto zeros;
//! for the latter these check
//! that gradients are still summed over every use of a tensor, that a gradient that arrives as a
//! strided view (a transpose, a broadcast) is stored contiguous (the fused CPU ops require it),
//! and that the values equal the closed forms.

use candle_core::{Device, Tensor, Var};

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn every_use_of_a_tensor_adds_to_its_gradient() {
    let dev = Device::Cpu;
    let v = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
    let x = Var::from_slice(&v, (2, 3), &dev).unwrap();
    // loss = sum(x * x) + sum(exp(x)) + sum(3 x) + sum(x^T . ones(2, 1)):
    // d/dx = 2 x + exp(x) + 3 + 1.
    let t = x.as_tensor();
    let loss = ((t * t).unwrap().sum_all().unwrap()
        + t.exp().unwrap().sum_all().unwrap()
        + (t * 3.0).unwrap().sum_all().unwrap()
        + t.t()
            .unwrap()
            .matmul(&Tensor::ones((2, 1), candle_core::DType::F32, &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(t).unwrap();
    assert!(g.is_contiguous());
    let want: Vec<f32> = v.iter().map(|x| 2.0 * x + x.exp() + 4.0).collect();
    close(&g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want);
}

#[test]
fn a_first_gradient_that_is_a_strided_view_is_stored_contiguous() {
    let dev = Device::Cpu;
    let w = Var::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &dev).unwrap();
    let r = Tensor::from_slice(&[1f32, -2.0, 0.5, 3.0, 1.0, -1.0], (3, 2), &dev).unwrap();
    // The only use of w is through its transpose: its gradient arrives as (r)^T, a strided view.
    let loss = (w.as_tensor().t().unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap();
    assert!(g.is_contiguous(), "{:?}", g.layout());
    let want = r
        .t()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    close(&g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want);
    // A broadcast bias: its gradient is the sum over the broadcast rows.
    let b = Var::from_slice(&[0f32, 0.0], 2, &dev).unwrap();
    let x = Tensor::ones((4, 2), candle_core::DType::F32, &dev).unwrap();
    let loss = x
        .broadcast_add(b.as_tensor())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let g = g.get(b.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    close(&g.to_vec1::<f32>().unwrap(), &[8.0, 8.0]);
}

/// The sum over any set of dimensions (`gentrain-reduce.patch`: runs of the dimensions after the
/// last reduced one are added at once) equals, bit for bit, adding the values one at a time in
/// memory order onto zeros, which is what the release computes; including non-finite values.
#[test]
fn sums_over_any_dimensions_add_in_memory_order() {
    use candle_core::D;
    let dims = [3usize, 4, 5, 6];
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| match i % 97 {
            13 => f32::NAN,
            41 => f32::INFINITY,
            _ => ((i * 7919) % 1000) as f32 * 1e-3 - 0.4 + (i as f32) * 1e-7,
        })
        .collect();
    let x = Tensor::from_slice(&v, &dims, &Device::Cpu).unwrap();
    for mask in 1u32..16 {
        let reduced: Vec<usize> = (0..4).filter(|d| mask & (1 << d) != 0).collect();
        let got = x.sum_keepdim(reduced.as_slice()).unwrap();
        let out_dims: Vec<usize> = (0..4)
            .map(|d| if reduced.contains(&d) { 1 } else { dims[d] })
            .collect();
        let mut want = vec![0f32; out_dims.iter().product()];
        for (i, val) in v.iter().enumerate() {
            let (mut rest, mut at, mut scale) = (i, 0, 1);
            for d in (0..4).rev() {
                let idx = if reduced.contains(&d) {
                    0
                } else {
                    rest % dims[d]
                };
                at += idx * scale;
                scale *= out_dims[d];
                rest /= dims[d];
            }
            want[at] += *val;
        }
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "sum over {reduced:?}");
    }
    // A strided view (the release's other, unchanged path) sums as its contiguous copy does.
    let t = x.transpose(D::Minus1, 0).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (strided, copied) = (
        flat(t.sum_keepdim(0).unwrap()),
        flat(t.contiguous().unwrap().sum_keepdim(0).unwrap()),
    );
    assert!(strided
        .iter()
        .zip(&copied)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
