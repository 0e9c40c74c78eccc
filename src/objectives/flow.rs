//! Flow objectives (Dinh et al. 2017, "Density estimation using Real NVP", eq. 3): the exact
//! negative log-likelihood by the change of variables is computed by the model
//! (`Flow::data_log_prob`); this module turns nats into the figure the literature reports.

/// The shift and divisor that turn a negative log-likelihood of `dim` values (nats per row)
/// into bits per dimension: `(nll + shift) / divisor`, `divisor = D ln 2`. For dequantized 8-bit
/// data the density lives on `[0, 1)^D`; on the pixel scale (`[0, 256)^D`, bins of width 1, the
/// scale of every published bits/dim figure) `shift = D ln 256`, else 0.
pub fn bits_per_dim_scale(dim: usize, dequantized: bool) -> (f64, f64) {
    let d = dim as f64;
    let shift = if dequantized { d * 256f64.ln() } else { 0.0 };
    (shift, d * std::f64::consts::LN_2)
}

/// Bits per dimension of a negative log-likelihood `nll` (nats per row of `dim` values); see
/// [`bits_per_dim_scale`]. The one formula every family's bits/dim comes from.
pub fn bits_per_dim(nll: f64, dim: usize, dequantized: bool) -> f64 {
    let (shift, divisor) = bits_per_dim_scale(dim, dequantized);
    (nll + shift) / divisor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_dim_on_both_scales() {
        // A uniform density on [0, 1)^D has nll 0: on the pixel scale that is 8 bits a pixel.
        assert!((bits_per_dim(0.0, 784, true) - 8.0).abs() < 1e-12);
        // Binary data: nats over D ln 2.
        let nll = 784.0 * std::f64::consts::LN_2;
        assert!((bits_per_dim(nll, 784, false) - 1.0).abs() < 1e-12);
    }
}
