//! Synthetic 2-D data sets used in the GAN and flow literature: the 8-Gaussian ring and the
//! 25-Gaussian grid (mode-collapse benchmarks of Srivastava et al. 2017 "VEEGAN" and
//! Azadi et al. 2019), two moons, and the checkerboard of Grathwohl et al. 2019 (FFJORD).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub use crate::config::Synthetic;

impl Synthetic {
    /// Mode centres and standard deviation of the mixture sets (`None` for the others).
    pub fn modes(self) -> Option<(Vec<[f32; 2]>, f32)> {
        match self {
            Synthetic::Ring8 => Some((
                (0..8)
                    .map(|i| {
                        let a = i as f32 * std::f32::consts::PI / 4.0;
                        [2.0 * a.cos(), 2.0 * a.sin()]
                    })
                    .collect(),
                0.02,
            )),
            Synthetic::Grid25 => Some((
                (0..25)
                    .map(|i| [((i / 5) as f32 - 2.0) * 2.0, ((i % 5) as f32 - 2.0) * 2.0])
                    .collect(),
                0.05,
            )),
            _ => None,
        }
    }

    /// A square `[lo, hi]^2` that holds practically all of the distribution's mass, for plots.
    pub fn extent(self) -> (f32, f32) {
        match self {
            Synthetic::Ring8 => (-3.0, 3.0),
            Synthetic::Grid25 => (-6.0, 6.0),
            Synthetic::Moons => (-1.5, 2.5),
            Synthetic::Checkerboard => (-4.5, 4.5),
        }
    }

    /// Draws `n` points.
    pub fn sample(self, n: usize, rng: &mut ChaCha8Rng) -> Vec<[f32; 2]> {
        let normal = |rng: &mut ChaCha8Rng| rng.sample::<f32, _>(rand_distr::StandardNormal);
        match self {
            Synthetic::Ring8 | Synthetic::Grid25 => {
                let (modes, std) = self.modes().expect("mixture");
                (0..n)
                    .map(|_| {
                        let m = modes[rng.random_range(0..modes.len())];
                        [m[0] + std * normal(rng), m[1] + std * normal(rng)]
                    })
                    .collect()
            }
            Synthetic::Moons => (0..n)
                .map(|_| {
                    let t = rng.random_range(0.0..std::f32::consts::PI);
                    let (x, y) = if rng.random_bool(0.5) {
                        (t.cos(), t.sin())
                    } else {
                        (1.0 - t.cos(), 0.5 - t.sin())
                    };
                    [x + 0.1 * normal(rng), y + 0.1 * normal(rng)]
                })
                .collect(),
            Synthetic::Checkerboard => (0..n)
                .map(|_| {
                    // FFJORD's construction, scaled by 2.
                    let x1 = rng.random_range(-2.0f32..2.0);
                    let x2 = rng.random_range(0.0f32..1.0) - 2.0 * rng.random_range(0..2) as f32
                        + x1.floor().rem_euclid(2.0);
                    [2.0 * x1, 2.0 * x2]
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{stream_rng, Stream};

    #[test]
    fn mixtures_put_points_near_their_modes() {
        for set in [Synthetic::Ring8, Synthetic::Grid25] {
            let (modes, std) = set.modes().unwrap();
            let pts = set.sample(2000, &mut stream_rng(1, Stream::Synthetic, 0));
            let mut hit = vec![0usize; modes.len()];
            for p in &pts {
                let (i, d) = modes
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (i, ((p[0] - m[0]).powi(2) + (p[1] - m[1]).powi(2)).sqrt()))
                    .fold((0, f32::MAX), |a, b| if b.1 < a.1 { b } else { a });
                assert!(d < 6.0 * std, "{set:?}: {p:?} is {d} from its mode");
                hit[i] += 1;
            }
            assert!(hit.iter().all(|&h| h > 0), "{set:?} misses a mode");
        }
    }

    #[test]
    fn checkerboard_lies_on_black_squares() {
        let pts = Synthetic::Checkerboard.sample(2000, &mut stream_rng(2, Stream::Synthetic, 0));
        for p in pts {
            assert!(
                (-4.0..4.0).contains(&p[0]) && (-4.0..4.0).contains(&p[1]),
                "{p:?}"
            );
            let parity = ((p[0] / 2.0).floor() + (p[1] / 2.0).floor()).rem_euclid(2.0);
            assert_eq!(parity, 0.0, "{p:?}");
        }
    }

    #[test]
    fn moons_are_bounded() {
        let pts = Synthetic::Moons.sample(1000, &mut stream_rng(3, Stream::Synthetic, 0));
        assert!(pts
            .iter()
            .all(|p| p[0] > -2.0 && p[0] < 3.0 && p[1] > -1.5 && p[1] < 2.0));
    }
}
