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
    std::env::set_var("GENTRAIN_POISON_OUTPUTS", "1");
    gentrain::device::set_tf32(false);
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

macro_rules! gpu_test {
    ($name:ident, $check:path) => {
        #[test]
        #[ignore = "needs a CUDA GPU: run this test executable with --ignored on a GPU machine"]
        fn $name() {
            for r in $check(&gpu()).unwrap_or_else(|e| panic!("{e}")) {
                println!(
                    "{} max rel err {:.2e} (tol {:.0e})",
                    r.check, r.max_rel_err, r.tolerance
                );
            }
        }
    };
}

gpu_test!(gaussian_kernels_match_cpu, kernel_check::check_gaussian);
gpu_test!(bernoulli_kernels_match_cpu, kernel_check::check_bernoulli);
gpu_test!(
    logsumexp_kernels_match_cpu_including_infinite_log_weights,
    kernel_check::check_logsumexp
);
gpu_test!(
    spectral_norm_power_iteration_matches_cpu,
    kernel_check::check_spectral_norm
);
gpu_test!(
    linear_gemm_and_epilogue_match_cpu,
    kernel_check::check_linear
);
gpu_test!(adam_kernels_match_cpu, kernel_check::check_adam);
gpu_test!(random_draws_match_cpu, kernel_check::check_random);
gpu_test!(a_training_step_matches_cpu, kernel_check::check_train_step);
