//! Data: the IDX, NumPy, CIFAR-10 and image-folder readers, the sources `data.dataset` names
//! (`sources`), binarization and minibatches, and the synthetic 2-D sets.

pub mod batches;
pub mod cifar;
pub mod folder;
pub mod folder_cache;
pub mod idx;
pub mod images;
pub mod npy;
pub mod raw;
pub mod sources;
pub mod synthetic;

pub use batches::{Binarization, DataSource};
pub use folder::Fit;
pub use images::ImageSet;
pub use npy::NpyData;
pub use raw::{RawImages, RealRows};
pub use sources::{load_source, Loaded, SeededSplit};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// One-hot rows `(labels.len(), classes)` for `labels`, the class input of conditional models.
///
/// # Errors
/// [`Error::Data`] when a label is not below `classes`.
pub fn one_hot(labels: &[u32], classes: usize, device: &Device) -> Result<Tensor> {
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::Data(format!(
            "label {bad} is out of range for {classes} classes"
        )));
    }
    let mut y = vec![0f32; labels.len() * classes];
    for (r, &l) in labels.iter().enumerate() {
        y[r * classes + l as usize] = 1.0;
    }
    Ok(Tensor::from_vec(y, (labels.len(), classes), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hot_refuses_a_label_out_of_range() {
        // It used to write past the row (into the next row, or panic past the buffer).
        let y = one_hot(&[2, 0], 3, &Device::Cpu).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 0.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
        let e = one_hot(&[0, 3], 3, &Device::Cpu).unwrap_err();
        assert!(
            e.to_string()
                .contains("label 3 is out of range for 3 classes"),
            "{e}"
        );
        assert!(one_hot(&[0], 0, &Device::Cpu).is_err());
    }
}
