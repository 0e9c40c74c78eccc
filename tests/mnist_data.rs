//! The repository's copy of MNIST is intact: SHA-256 of each decompressed file matches
//! `data/mnist/README.md`, and the sanity figures there hold.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

fn readme_sums() -> Vec<(String, usize, String)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist/README.md"))
            .unwrap();
    text.lines()
        .filter(|l| l.contains("-ubyte |"))
        .map(|l| {
            let cols: Vec<&str> = l
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            (
                cols[0].to_string(),
                cols[1].parse().unwrap(),
                cols[2].to_string(),
            )
        })
        .collect()
}

#[test]
fn checksums_match_the_readme() {
    let sums = readme_sums();
    assert_eq!(sums.len(), 4, "the README lists four files");
    for (name, bytes, sha) in sums {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/mnist")
            .join(format!("{name}.gz"));
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), bytes, "{name}: size");
        let digest: String = Sha256::digest(&raw)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest, sha, "{name}: sha256");
    }
}

#[test]
fn sanity_figures_hold() {
    use gentrain::data::images::{ImageSet, Split};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    let train = ImageSet::load(&dir, Split::Train).unwrap();
    assert_eq!((train.n, train.rows, train.cols), (60_000, 28, 28));
    let mean = train.pixels.iter().map(|&p| p as f64).sum::<f64>() / train.pixels.len() as f64;
    assert!((mean - 33.318).abs() < 0.001, "mean pixel {mean}");
    let mut counts = [0usize; 10];
    for &l in train.labels.as_ref().unwrap() {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(ImageSet::load(&dir, Split::Test).unwrap().n, 10_000);
}
