//! `trainer export-data`: the exact evaluation images of a config or checkpoint as an IDX file.

use anyhow::{bail, Context, Result};

use crate::cli::resolve::export_config;
use crate::cli::ExportArgs;
use crate::config::Config;
use crate::data::idx::encode_idx;

/// Writes the test images as the evaluation sees them (binarized with their fixed seed) to
/// `--out` as uncompressed IDX and names the file.
///
/// # Errors
/// A config that does not resolve, data of another shape than `--checkpoint`'s model, data with
/// no IDX form (2-D points, dequantized pixels:
/// nothing is written), unreadable data, or a file that cannot be written.
pub(crate) fn run(a: &ExportArgs) -> Result<()> {
    let cfg = export_config(a)?;
    if let Some(reason) = no_idx_form(&cfg) {
        bail!("export-data: {reason}");
    }
    let data = crate::session::load_datasets(&cfg)?;
    if let Some(path) = &a.checkpoint {
        // The images a checkpoint's evaluation would refuse are not its evaluation images.
        let ck = crate::session::load_checkpoint(path, &candle_core::Device::Cpu)?;
        ck.check_data(&data)?;
    }
    let bytes = data
        .test
        .bytes()
        .context("export-data: the evaluation rows are real values, not bytes")?;
    // Grey images stay `(n, rows, cols)` as MNIST's; colour images are `(n, C, H, W)`.
    let dims = if data.channels == 1 {
        vec![data.test.len(), data.rows, data.cols]
    } else {
        vec![data.test.len(), data.channels, data.rows, data.cols]
    };
    let encoded = encode_idx(&dims, bytes);
    std::fs::write(&a.out, encoded).with_context(|| format!("{}", a.out.display()))?;
    outln!(
        "wrote {} ({} images, {}{}x{})",
        a.out.display(),
        data.test.len(),
        if data.channels == 1 {
            String::new()
        } else {
            format!("{}x", data.channels)
        },
        data.rows,
        data.cols
    );
    Ok(())
}

/// Why the evaluation data of `cfg` cannot be written as IDX bytes, if it cannot.
fn no_idx_form(cfg: &Config) -> Option<String> {
    if cfg.data.synthetic().is_some() {
        return Some(format!(
            "data.dataset = \"{}\" is a set of 2-D points with real coordinates, not images: \
             IDX bytes cannot hold them",
            cfg.data.dataset
        ));
    }
    if cfg.data.binarize == crate::data::Binarization::Dequantize {
        return Some(format!(
            "data.binarize = \"dequantize\": the evaluation images are pixels plus uniform noise, \
             real values that IDX bytes cannot hold (the pixels before the noise are the test \
             images in {} as they stand)",
            cfg.data.dir.display()
        ));
    }
    None
}
