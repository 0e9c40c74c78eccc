//! Data: the IDX reader, image data sets (MNIST and any IDX image set), binarization, and the
//! synthetic 2-D sets.

pub mod batches;
pub mod idx;
pub mod images;
pub mod synthetic;

pub use batches::{Binarization, DataSource};
pub use images::ImageSet;
