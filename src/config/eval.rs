//! `[eval]`: the likelihood estimates of `trainer eval` and of the end of `trainer train`.
//! Every field may change on resume.

use serde::{Deserialize, Serialize};

/// Evaluation settings (`[eval]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Importance samples per test image of `trainer eval`'s log-likelihood estimate (VAEs;
    /// `--k` overrides it). Default: 5000.
    pub k: usize,
    /// Rows (samples x images) per forward pass; bounds memory at any k (`--max-rows`
    /// overrides it). Default: 16,384.
    pub max_rows: usize,
    /// Evaluate on the first N test images (0: all; `--limit` overrides it). Default: 0.
    pub limit: usize,
    /// Importance samples per test image of the end-of-training NLL that `train` prints (VAEs;
    /// 0: skip it). Default: 1000.
    pub final_k: usize,
    /// Test images of that estimate (0: all). Default: 2000.
    pub final_limit: usize,
    /// Samples behind the sample figures logged at epoch ends and at the end of training
    /// (MNIST-FID on labelled IDX images; precision, recall and MMD^2 on other data, from at
    /// most 2,000; mode coverage uses 2,500 on the 2-D mixtures); 0 skips them on images and
    /// other data. A diffusion model's samples cost a network pass per sampler step each,
    /// so its configs lower this. Default: 2000.
    pub epoch_samples: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            k: 5000,
            max_rows: 16_384,
            limit: 0,
            final_k: 1000,
            final_limit: 2000,
            epoch_samples: 2000,
        }
    }
}
