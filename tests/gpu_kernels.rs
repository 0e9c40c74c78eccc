//! GPU tests of the fused kernels against their CPU references (feature `cuda`); the checks live
//! in `gentrain::kernel_check`, which `trainer check-kernels --device cuda:0` also runs.
//!
//! They are `#[ignore]`d, so a plain `cargo test --features cuda` reports them as ignored
//! (skipped), never as passed. With `--ignored` on a GPU machine each test fails loudly when the
//! device is missing or any kernel disagrees with the CPU.
#![cfg(feature = "cuda")]

use candle_core::Device;
use gentrain::kernel_check;

fn gpu() -> Device {
    gentrain::device::open_device("cuda:0").expect("these tests need a CUDA GPU")
}

/// Runs one group of `kernel_check::GROUPS`, prints every check, and fails naming each check
/// that disagrees with the CPU.
fn run(group: &str) {
    let reports = kernel_check::run_group(&gpu(), group);
    assert!(!reports.is_empty(), "group {group} ran no check");
    let mut failed = Vec::new();
    for r in &reports {
        match &r.error {
            None => println!(
                "ok   {} max rel err {:.2e} (tol {:.0e})",
                r.check, r.max_rel_err, r.tolerance
            ),
            Some(e) => {
                println!("FAIL {}: {e}", r.check);
                failed.push(format!("{}: {e}", r.check));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

macro_rules! gpu_test {
    ($name:ident, $group:literal) => {
        #[test]
        #[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
        fn $name() {
            run($group);
        }
    };
}

gpu_test!(gaussian_kernels_match_cpu, "gaussian");
gpu_test!(bernoulli_kernels_match_cpu, "bernoulli");
gpu_test!(
    logsumexp_kernels_match_cpu_including_non_finite_log_weights,
    "logsumexp"
);
gpu_test!(spectral_norm_power_iteration_matches_cpu, "spectral_norm");
gpu_test!(linear_gemm_and_epilogue_match_cpu, "linear");
gpu_test!(adam_kernels_match_cpu, "adam");
gpu_test!(random_draws_match_cpu, "random");
gpu_test!(
    diffusion_kernels_match_cpu_including_out_of_range_time_indices,
    "diffusion"
);
gpu_test!(a_training_step_matches_cpu, "train_step");

#[test]
fn every_check_group_has_a_test_here() {
    // A group added to kernel_check::GROUPS without a test above would go unrun on the GPU.
    let here = [
        "gaussian",
        "bernoulli",
        "logsumexp",
        "spectral_norm",
        "linear",
        "adam",
        "random",
        "diffusion",
        "train_step",
    ];
    let groups: Vec<&str> = kernel_check::GROUPS.iter().map(|(g, _)| *g).collect();
    assert_eq!(groups, here);
}
