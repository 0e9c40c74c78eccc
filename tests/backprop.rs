//! The backward pass of the vendored candle-core (`vendor/candle-core/GENTRAIN.md`): a tensor's
//! first gradient contribution is stored as it is instead of being added onto zeros. These check
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
