//! Sample metrics end to end on the shipped MNIST copy: the metric classifier is accurate and
//! cached (the reloaded copy gives identical features), identical image sets have MNIST-FID 0
//! and the Inception-Score analogue of the test images is high, a one-class set scores about 1
//! with its histogram on that class, and the duplicate test finds copied images.

mod common;
use common::flat_f32;

use std::path::Path;

use candle_core::{Device, Tensor};
use gentrain::data::images::{ImageSet, Split};
use gentrain::metrics::{classes, classifier, duplicates, frechet};

const DATA: &str = "data/mnist";

#[test]
fn mnist_metrics_on_known_cases() {
    let dir = Path::new(DATA);
    let trained = classifier::Classifier::for_data_dir(dir).unwrap();
    assert!(
        trained.test_accuracy > 0.97,
        "classifier test accuracy {}",
        trained.test_accuracy
    );
    let train = ImageSet::load(dir, Split::Train).unwrap();
    assert!(classifier::cache_path(dir, &train).is_file(), "not cached");
    let cached = classifier::Classifier::for_data_dir(dir).unwrap();
    let test = ImageSet::load(dir, Split::Test).unwrap();
    let x = classifier::scaled(&test, 0, 2000).unwrap();
    let (fa, pa) = trained.features_and_probs(&x).unwrap();
    let (fb, _) = cached.features_and_probs(&x).unwrap();
    assert_eq!(
        flat_f32(&fa),
        flat_f32(&fb),
        "the cached classifier differs from the trained one"
    );
    // Identical sets: FID 0. Two disjoint halves of the test set: small but positive.
    let s = frechet::gaussian_stats(&fa).unwrap();
    assert!(frechet::frechet_distance(&s, &s).unwrap() < 1e-6);
    let (fc, _) = cached
        .features_and_probs(&classifier::scaled(&test, 2000, 2000).unwrap())
        .unwrap();
    let halves = frechet::frechet_distance(&s, &frechet::gaussian_stats(&fc).unwrap()).unwrap();
    assert!(halves > 0.0 && halves < 5.0, "test halves FID {halves}");
    // Real digits: a high score and every class present.
    let pa: Vec<Vec<f32>> = pa.to_vec2().unwrap();
    assert!(classes::inception_score(&pa).unwrap() > 8.5);
    let hist = classes::class_histogram(&pa, 10).unwrap();
    assert!(hist.iter().all(|&f| f > 0.05), "{hist:?}");
    // Only the sevens: score near 1, the histogram on class 7, and far from the test set.
    let labels = test.labels.as_ref().unwrap();
    let sevens: Vec<f32> = (0..test.n)
        .filter(|&i| labels[i] == 7)
        .flat_map(|i| test.image(i).iter().map(|&p| p as f32 / 255.0))
        .collect();
    let n7 = sevens.len() / 784;
    let sevens = Tensor::from_vec(sevens, (n7, 784), &Device::Cpu).unwrap();
    let (f7, p7) = cached.features_and_probs(&sevens).unwrap();
    let p7: Vec<Vec<f32>> = p7.to_vec2().unwrap();
    assert!(classes::inception_score(&p7).unwrap() < 1.3);
    assert!(classes::class_histogram(&p7, 10).unwrap()[7] > 0.95);
    let fid7 = frechet::frechet_distance(&frechet::gaussian_stats(&f7).unwrap(), &s).unwrap();
    assert!(
        fid7 > 20.0 * halves,
        "sevens vs test FID {fid7}, halves {halves}"
    );
    // Duplicates: a sample holding copies is caught, a fresh one is not.
    let real = classifier::scaled(&test, 0, 500).unwrap();
    let fresh = classifier::scaled(&test, 500, 500).unwrap();
    assert_eq!(
        duplicates::duplicate_test(&fresh, &real)
            .unwrap()
            .duplicate_pairs,
        0
    );
    let copied = Tensor::cat(
        &[
            fresh.narrow(0, 0, 480).unwrap(),
            fresh.narrow(0, 0, 20).unwrap(),
        ],
        0,
    )
    .unwrap();
    assert!(
        duplicates::duplicate_test(&copied, &real)
            .unwrap()
            .duplicate_pairs
            >= 20
    );
}
