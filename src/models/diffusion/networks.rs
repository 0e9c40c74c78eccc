//! The denoisers `eps_theta(x_t, t)`: an MLP for 2-D points and a U-Net for images.
//!
//! Layers hold the *positions* of their parameters in the model's [`ParamStore`], and every
//! forward pass takes the weights as a slice in that order, so the same network runs on the
//! trained weights, on their exponential moving average (a second store with the same names)
//! and on detached copies (no autograd graph while sampling).
//!
//! - Time embedding: the Transformer's sinusoidal embedding of the 0-based step index as the
//!   DDPM code computes it (`[sin(t f_i), cos(t f_i)]`, `f_i = 10000^(-i / (half - 1))`).
//! - MLP (`net.0`, `net.2`, ...): `[x_t, emb(x_t), emb(t)] -> (Linear, SiLU)* -> Linear`, where
//!   `emb(x_t)` (optional) embeds each value `x_j` sinusoidally at `input_scale x_j`.
//! - U-Net (Ho et al. 2020, appendix B, after Ronneberger et al. 2015, small): `time_mlp`
//!   (Linear, SiLU, Linear to `4 channels`), `conv_in` (3x3), per level `res_blocks` residual
//!   blocks (GroupNorm, SiLU, 3x3 conv, plus the projected time embedding, GroupNorm, SiLU, 3x3
//!   conv zero-initialized, 1x1 skip when the channels change) then a stride-2 3x3 convolution
//!   (not after the last level); a middle of two blocks with optional self-attention (GroupNorm,
//!   1x1 `qkv`, softmax over positions, 1x1 `proj` zero-initialized, residual); the decoder
//!   mirrors the levels, concatenating each level's skip before its first block and
//!   up-sampling (nearest, then a 3x3 conv to the next level's channels) between levels; `norm_out`, SiLU and a
//!   zero-initialized 3x3 `conv_out` (so training starts from `eps_theta = 0`).
//!
//! Initialization: PyTorch's default for `nn.Linear` and `nn.Conv2d` (`U(+-1/sqrt(fan_in))`
//! for weights and biases), GroupNorm weight 1 and bias 0, the zero-initialized layers above.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{DenoiserKind, DiffusionConfig};
use crate::error::{Error, Result};
use crate::models::ParamStore;
use crate::ops::group_norm::group_norm;
use crate::ops::upsample::upsample_nearest;

/// GroupNorm's epsilon (PyTorch's default).
const GROUP_NORM_EPS: f64 = 1e-5;

/// The frequencies `f_i = 10000^(-i / (half - 1))`, `i < half`, of a sinusoidal embedding of
/// width `2 half`.
fn frequencies(half: usize) -> Vec<f64> {
    let scale = if half > 1 {
        (10000f64).ln() / (half - 1) as f64
    } else {
        0.0
    };
    (0..half).map(|i| (-(i as f64) * scale).exp()).collect()
}

/// Sinusoidal embeddings of the step indices `t`: (B, dim), `[sin(t f_i), cos(t f_i)]`,
/// computed in f64 on the host.
pub fn time_embedding(t: &[u32], dim: usize, device: &Device) -> Result<Tensor> {
    let f = frequencies(dim / 2);
    let mut v = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        v.extend(f.iter().map(|fi| (ti as f64 * fi).sin() as f32));
        v.extend(f.iter().map(|fi| (ti as f64 * fi).cos() as f32));
    }
    Ok(Tensor::from_vec(v, (t.len(), dim), device)?)
}

/// Sinusoidal embeddings of every value of x (B, D): (B, D width), value `j`'s block
/// `[sin(scale x_j f_i), cos(scale x_j f_i)]`, as tensor operations.
pub fn value_embedding(x: &Tensor, width: usize, scale: f64) -> Result<Tensor> {
    let (b, d) = x.dims2()?;
    let f: Vec<f32> = frequencies(width / 2)
        .iter()
        .map(|fi| (fi * scale) as f32)
        .collect();
    let f = Tensor::from_vec(f, (1, 1, width / 2), x.device())?;
    let a = x.unsqueeze(2)?.broadcast_mul(&f)?; // (B, D, half)
    Ok(Tensor::cat(&[a.sin()?, a.cos()?], 2)?.reshape((b, d * width))?)
}

/// Registers a parameter drawn from `U(-bound, bound)` (or constant `value` when `bound` is
/// `None`) and returns its position in the store.
fn param(
    store: &mut ParamStore,
    name: String,
    shape: &[usize],
    init: Init,
    rng: &mut ChaCha8Rng,
) -> Result<usize> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = match init {
        Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..=b)).collect(),
        Init::Constant(c) => vec![c; n],
    };
    let var = candle_core::Var::from_tensor(&Tensor::from_vec(v, shape, store.device())?)?;
    let index = store.len();
    store.push(name, var)?;
    Ok(index)
}

#[derive(Clone, Copy)]
enum Init {
    Uniform(f32),
    Constant(f32),
}

/// `nn.Linear` or `nn.Conv2d` weights and bias (positions in the store).
#[derive(Debug, Clone, Copy)]
struct Affine {
    weight: usize,
    bias: usize,
}

impl Affine {
    /// A layer `{prefix}.weight` of `shape` (`[out, in]` or `[out, in, k, k]`) and
    /// `{prefix}.bias`, PyTorch's default initialization or zeros.
    fn new(
        store: &mut ParamStore,
        prefix: &str,
        shape: &[usize],
        zero: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let init = if zero {
            Init::Constant(0.0)
        } else {
            Init::Uniform(bound)
        };
        let weight = param(store, format!("{prefix}.weight"), shape, init, rng)?;
        let bias = param(store, format!("{prefix}.bias"), &shape[..1], init, rng)?;
        Ok(Affine { weight, bias })
    }

    /// `x W^T + b` for x (B, in).
    fn linear(&self, w: &[Tensor], x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&w[self.weight].t()?)?
            .broadcast_add(&w[self.bias])?)
    }

    /// The convolution of x (B, C, H, W) with stride `stride` and "same" padding.
    fn conv(&self, w: &[Tensor], x: &Tensor, stride: usize) -> Result<Tensor> {
        let k = w[self.weight].dim(2)?;
        conv2d(x, &w[self.weight], &w[self.bias], stride, k / 2)
    }
}

/// `torch.nn.functional.conv2d(x, weight, bias, stride, padding)`: [`crate::ops::conv::conv2d`]
/// (im2col and GEMMs on the CPU, candle's convolution elsewhere).
fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    Ok(crate::ops::conv::conv2d(
        x,
        weight,
        Some(bias),
        stride,
        padding,
    )?)
}

/// `nn.GroupNorm(groups, channels)`.
#[derive(Debug, Clone, Copy)]
struct GroupNorm {
    groups: usize,
    weight: usize,
    bias: usize,
}

impl GroupNorm {
    fn new(
        store: &mut ParamStore,
        prefix: &str,
        groups: usize,
        channels: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let weight = param(
            store,
            format!("{prefix}.weight"),
            &[channels],
            Init::Constant(1.0),
            rng,
        )?;
        let bias = param(
            store,
            format!("{prefix}.bias"),
            &[channels],
            Init::Constant(0.0),
            rng,
        )?;
        Ok(GroupNorm {
            groups,
            weight,
            bias,
        })
    }

    /// Normalizes each group of `x (B, C, H, W)` (after adding `shift (B, C)` to each channel,
    /// when given) to zero mean and unit (biased) variance, scales and shifts each channel, and
    /// applies SiLU when `silu` is set: one fused op ([`group_norm`]).
    fn forward(
        &self,
        w: &[Tensor],
        x: &Tensor,
        shift: Option<&Tensor>,
        silu: bool,
    ) -> Result<Tensor> {
        Ok(group_norm(
            x,
            shift,
            &w[self.weight],
            &w[self.bias],
            self.groups,
            GROUP_NORM_EPS,
            silu,
        )?)
    }
}

/// A residual block `a -> b` channels with the time embedding added after its first conv.
#[derive(Debug, Clone, Copy)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Affine,
    time: Affine,
    norm2: GroupNorm,
    conv2: Affine,
    skip: Option<Affine>,
}

impl ResBlock {
    fn new(
        store: &mut ParamStore,
        p: &str,
        a: usize,
        b: usize,
        emb: usize,
        groups: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        Ok(ResBlock {
            norm1: GroupNorm::new(store, &format!("{p}.norm1"), groups, a, rng)?,
            conv1: Affine::new(store, &format!("{p}.conv1"), &[b, a, 3, 3], false, rng)?,
            time: Affine::new(store, &format!("{p}.time_proj"), &[b, emb], false, rng)?,
            norm2: GroupNorm::new(store, &format!("{p}.norm2"), groups, b, rng)?,
            conv2: Affine::new(store, &format!("{p}.conv2"), &[b, b, 3, 3], true, rng)?,
            skip: if a != b {
                Some(Affine::new(
                    store,
                    &format!("{p}.skip"),
                    &[b, a, 1, 1],
                    false,
                    rng,
                )?)
            } else {
                None
            },
        })
    }

    /// `emb` is the SiLU of the time MLP's output, (B, 4 channels).
    fn forward(&self, w: &[Tensor], x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .conv(w, &self.norm1.forward(w, x, None, true)?, 1)?;
        // The projected time embedding is added to every position before norm2 (the shift).
        let t = self.time.linear(w, emb)?;
        let h = self
            .conv2
            .conv(w, &self.norm2.forward(w, &h, Some(&t), true)?, 1)?;
        let skip = match &self.skip {
            Some(s) => s.conv(w, x, 1)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// Single-head self-attention over the positions of a feature map, residual.
#[derive(Debug, Clone, Copy)]
struct Attention {
    norm: GroupNorm,
    qkv: Affine,
    proj: Affine,
}

impl Attention {
    fn forward(&self, w: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let qkv = self
            .qkv
            .conv(w, &self.norm.forward(w, x, None, false)?, 1)?
            .reshape((b, 3, c, h * wd))?;
        let q = qkv
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .transpose(1, 2)?
            .contiguous()?; // (B, HW, C)
        let k = qkv.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?; // (B, C, HW)
        let v = qkv
            .narrow(1, 2, 1)?
            .squeeze(1)?
            .transpose(1, 2)?
            .contiguous()?; // (B, HW, C)
        let att = (q.matmul(&k)? * (1.0 / (c as f64).sqrt()))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((x + self.proj.conv(w, &out, 1)?)?)
    }
}

/// One level of the U-Net's encoder or decoder.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResBlock>,
    /// The stride-2 convolution after an encoder level, or the convolution after the nearest
    /// up-sampling of a decoder level.
    resample: Option<Affine>,
}

/// The U-Net denoiser (see the module docs).
#[derive(Debug, Clone)]
pub struct Unet {
    time_mlp: (Affine, Affine),
    conv_in: Affine,
    down: Vec<Level>,
    mid: (ResBlock, Option<Attention>, ResBlock),
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Affine,
    embedding: usize,
}

/// What building a U-Net needs at every level: the store, the block settings and the
/// generator.
struct Builder<'a> {
    store: &'a mut ParamStore,
    rng: &'a mut ChaCha8Rng,
    /// Width of the time MLP's output.
    emb: usize,
    groups: usize,
    res_blocks: usize,
}

impl Builder<'_> {
    fn block(&mut self, name: &str, a: usize, b: usize) -> Result<ResBlock> {
        ResBlock::new(self.store, name, a, b, self.emb, self.groups, self.rng)
    }

    fn conv(&mut self, name: &str, shape: &[usize], zero: bool) -> Result<Affine> {
        Affine::new(self.store, name, shape, zero, self.rng)
    }

    /// The encoder from `c` channels: its levels, the channels of each level's skip and the
    /// channels it ends with.
    fn down(&mut self, chans: &[usize], mut c: usize) -> Result<(Vec<Level>, Vec<usize>, usize)> {
        let (mut levels, mut skips) = (Vec::new(), Vec::new());
        for (l, &cl) in chans.iter().enumerate() {
            let mut blocks = Vec::new();
            for i in 0..self.res_blocks {
                blocks.push(self.block(&format!("down.{l}.blocks.{i}"), c, cl)?);
                c = cl;
            }
            skips.push(c);
            let resample = if l + 1 < chans.len() {
                Some(self.conv(&format!("down.{l}.downsample"), &[c, c, 3, 3], false)?)
            } else {
                None
            };
            levels.push(Level { blocks, resample });
        }
        Ok((levels, skips, c))
    }

    /// The decoder from `c` channels, lowest level first, with the encoder's `skips`; returns
    /// its levels and the channels it ends with. Up-sampling changes the channels to the level
    /// above's (its convolution runs at the higher resolution, the decoder's costliest).
    fn up(
        &mut self,
        chans: &[usize],
        skips: &[usize],
        mut c: usize,
    ) -> Result<(Vec<Level>, usize)> {
        let mut levels = Vec::new();
        for (l, &cl) in chans.iter().enumerate().rev() {
            let mut blocks = Vec::new();
            for i in 0..self.res_blocks {
                let a = if i == 0 { c + skips[l] } else { c };
                blocks.push(self.block(&format!("up.{l}.blocks.{i}"), a, cl)?);
                c = cl;
            }
            let resample = if l > 0 {
                let to = chans[l - 1];
                let conv = self.conv(&format!("up.{l}.upsample"), &[to, c, 3, 3], false)?;
                c = to;
                Some(conv)
            } else {
                None
            };
            levels.push(Level { blocks, resample });
        }
        Ok((levels, c))
    }
}

impl Unet {
    /// Creates every parameter for `input`-channel images with `out` output channels.
    fn new(
        store: &mut ParamStore,
        cfg: &DiffusionConfig,
        input: usize,
        out: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (e, ch, g) = (cfg.time_embedding, cfg.channels, cfg.groups);
        let mut b = Builder {
            store,
            rng,
            emb: 4 * ch,
            groups: g,
            res_blocks: cfg.res_blocks,
        };
        let emb = b.emb;
        let time_mlp = (
            b.conv("time_mlp.0", &[emb, e], false)?,
            b.conv("time_mlp.2", &[emb, emb], false)?,
        );
        let conv_in = b.conv("conv_in", &[ch, input, 3, 3], false)?;
        let chans: Vec<usize> = cfg.channel_mult.iter().map(|m| ch * m).collect();
        let (down, skips, c) = b.down(&chans, ch)?;
        let mid1 = b.block("mid.block1", c, c)?;
        let attention = if cfg.attention {
            Some(Attention {
                norm: GroupNorm::new(b.store, "mid.attn.norm", g, c, b.rng)?,
                qkv: b.conv("mid.attn.qkv", &[3 * c, c, 1, 1], false)?,
                proj: b.conv("mid.attn.proj", &[c, c, 1, 1], true)?,
            })
        } else {
            None
        };
        let mid2 = b.block("mid.block2", c, c)?;
        let (up, c) = b.up(&chans, &skips, c)?;
        Ok(Unet {
            time_mlp,
            conv_in,
            down,
            mid: (mid1, attention, mid2),
            up,
            norm_out: GroupNorm::new(b.store, "norm_out", g, c, b.rng)?,
            conv_out: b.conv("conv_out", &[out, c, 3, 3], true)?,
            embedding: e,
        })
    }

    /// `eps_theta` for images x (B, 1, H, W): (B, out, H, W).
    fn forward(&self, w: &[Tensor], x: &Tensor, t: &[u32]) -> Result<Tensor> {
        let temb = time_embedding(t, self.embedding, x.device())?;
        let emb = self.time_mlp.0.linear(w, &temb)?.silu()?;
        let emb = self.time_mlp.1.linear(w, &emb)?.silu()?;
        let mut h = self.conv_in.conv(w, x, 1)?;
        let mut skips = Vec::new();
        for level in &self.down {
            for b in &level.blocks {
                h = b.forward(w, &h, &emb)?;
            }
            skips.push(h.clone());
            if let Some(d) = &level.resample {
                h = d.conv(w, &h, 2)?;
            }
        }
        h = self.mid.0.forward(w, &h, &emb)?;
        if let Some(a) = &self.mid.1 {
            h = a.forward(w, &h)?;
        }
        h = self.mid.2.forward(w, &h, &emb)?;
        for level in &self.up {
            let skip = skips.pop().expect("one skip per level");
            for (i, b) in level.blocks.iter().enumerate() {
                if i == 0 {
                    h = Tensor::cat(&[&h, &skip], 1)?;
                }
                h = b.forward(w, &h, &emb)?;
            }
            if let Some(u) = &level.resample {
                h = u.conv(w, &upsample_nearest(&h, 2)?, 1)?;
            }
        }
        let h = self.norm_out.forward(w, &h, None, true)?;
        self.conv_out.conv(w, &h, 1)
    }
}

/// The MLP denoiser (see the module docs).
#[derive(Debug, Clone)]
pub struct MlpDenoiser {
    layers: Vec<Affine>,
    embedding: usize,
    /// `(width, scale)` of the input values' embedding (width 0: none).
    inputs: (usize, f64),
}

impl MlpDenoiser {
    fn new(
        store: &mut ParamStore,
        cfg: &DiffusionConfig,
        dim: usize,
        out: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        let mut d = dim * (1 + cfg.input_embedding) + cfg.time_embedding;
        for (i, &h) in cfg.hidden.iter().chain(std::iter::once(&out)).enumerate() {
            layers.push(Affine::new(
                store,
                &format!("net.{}", 2 * i),
                &[h, d],
                false,
                rng,
            )?);
            d = h;
        }
        Ok(MlpDenoiser {
            layers,
            embedding: cfg.time_embedding,
            inputs: (cfg.input_embedding, cfg.input_scale),
        })
    }

    fn forward(&self, w: &[Tensor], x: &Tensor, t: &[u32]) -> Result<Tensor> {
        let temb = time_embedding(t, self.embedding, x.device())?;
        let mut h = if self.inputs.0 > 0 {
            let xe = value_embedding(x, self.inputs.0, self.inputs.1)?;
            Tensor::cat(&[x, &xe, &temb], 1)?
        } else {
            Tensor::cat(&[x, &temb], 1)?
        };
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.linear(w, &h)?;
            if i < last {
                h = h.silu()?;
            }
        }
        Ok(h)
    }
}

/// The denoiser of `model.diffusion.denoiser`.
#[derive(Debug, Clone)]
pub enum Denoiser {
    Mlp(MlpDenoiser),
    Unet(Box<Unet>),
}

impl Denoiser {
    /// Creates the network's parameters in `store` for rows of `dim` values (images of
    /// `image = (C, H, W)` for the U-Net, whose first and last convolutions take and give `C`
    /// and `C * cfg.output_multiplier()` channels), with `dim * cfg.output_multiplier()`
    /// outputs.
    ///
    /// # Errors
    /// [`Error::Config`] when the U-Net is asked for 2-D points or for images its levels
    /// cannot halve.
    pub fn new(
        store: &mut ParamStore,
        cfg: &DiffusionConfig,
        dim: usize,
        image: Option<(usize, usize, usize)>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let m = cfg.output_multiplier();
        match cfg.denoiser {
            DenoiserKind::Mlp => Ok(Denoiser::Mlp(MlpDenoiser::new(
                store,
                cfg,
                dim,
                dim * m,
                rng,
            )?)),
            DenoiserKind::Unet => {
                let shape = image.ok_or_else(|| {
                    Error::Config("model.diffusion.denoiser = \"unet\" needs images".into())
                })?;
                cfg.check_image_shape(shape)?;
                let c = shape.0;
                Ok(Denoiser::Unet(Box::new(Unet::new(
                    store,
                    cfg,
                    c,
                    c * m,
                    rng,
                )?)))
            }
        }
    }

    /// The network's output for `x_t` (B, D) (flattened images) at steps `t` with weights `w`
    /// (in store order): (B, D m), the noise prediction first and, with learned variances, the
    /// interpolation `v` (raw, in [-1, 1] once trained) after it.
    pub fn forward(
        &self,
        w: &[Tensor],
        x: &Tensor,
        t: &[u32],
        image: Option<(usize, usize, usize)>,
    ) -> Result<Tensor> {
        match self {
            Denoiser::Mlp(m) => m.forward(w, x, t),
            Denoiser::Unet(u) => {
                let (c, h, wd) = image.expect("a U-Net is only built for images");
                let b = x.dim(0)?;
                let out = u.forward(w, &x.reshape((b, c, h, wd))?, t)?;
                // (B, m C, H, W) -> (B, m C H W): eps's C H W values first, then v's.
                Ok(out.flatten_from(1)?)
            }
        }
    }
}
