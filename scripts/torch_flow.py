#!/usr/bin/env python3
"""Independent PyTorch reference implementation of gentrain's RealNVP flow.

This script is the cross-check for the Rust trainer's flow family (``src/models/flow.rs``,
``src/objectives/flow.rs``, ``src/train/flow.rs``): it times PyTorch's training step on the same
machine (``bench``) and evaluates gentrain flow checkpoints (``eval``). The module tree and tensor
names are those of ``docs/checkpoints.md`` (section "RealNVP flow"), so a gentrain
``model.safetensors`` loads strictly, by name, into the modules built here.

Papers:

- Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP" (affine couplings,
  checkerboard masks, the logit transform of section 4.1, the change of variables, eq. 3);
- Kingma & Dhariwal 2018, "Glow: Generative flow with invertible 1x1 convolutions" (ActNorm and
  its data-dependent initialization, section 3.1);
- Papamakarios, Pavlakou & Murray 2017, "Masked autoregressive flow for density estimation"
  (the MNIST setting: uniform dequantization, logit margin alpha = 1e-6, bits/dim on the 8-bit
  scale); uniform dequantization as in Theis, van den Oord & Bethge 2016.

Model (data dimension D, L coupling layers, config ``[model.flow]``):

    for l = 0 .. L-1:
        ActNorm (actnorm = true):  h <- (h + bias) * exp(logs),   log|det| += sum_j logs_j
        coupling, mask m_j = (row_j + col_j + l) mod 2 (1: passed through):
            (a, t) = out(net(m * h))          net: Linear, ReLU per hidden width; out: 2D outputs
            s = scale * tanh(a) * (1 - m),    t = t * (1 - m)
            h <- h * exp(s) + t,              log|det| += sum_j s_j
    log p(x) = sum_j -0.5 (z_j^2 + ln 2 pi) + log|det|     (z = h at the end)

``out`` starts at zero and ``scale`` at one (every coupling starts as the identity); the hidden
Linear layers use PyTorch's default initialization, as gentrain's do (same distribution).
ActNorm's data-dependent initialization runs once, before the first optimizer step, on the
model-space values of the first batch (or, when the batch has under 128 rows, on the first 128
rows of the first epoch's order): per dimension, in float64, ``bias = -mean``,
``logs = -ln(std + 1e-6)`` (population std), except that a dimension whose spread is at or below
``1e-6 * max(1, |mean|)`` keeps ``logs = 0``; the ActNorm output then feeds the next layer's
statistics.

Images (rows > 1) are modelled through the logit transform
``y = logit(alpha + (1 - 2 alpha) x)`` with per-row log-Jacobian
``sum_j ln(1 - 2 alpha) - ln p_j - ln(1 - p_j)``, ``p = alpha + (1 - 2 alpha) x``; 2-D points are
modelled directly. Image training data: ``x = f32((pixel + u) / 256)`` (float64 arithmetic),
``u ~ U[0, 1)`` drawn afresh for every batch; gentrain accepts only ``data.binarize =
"dequantize"`` for image flows, and so does this script. The loss is the batch mean of
``-log p_x(x)`` (nats); for images ``bits/dim = (nll + D ln 256) / (D ln 2)`` (the 8-bit pixel
scale), for 2-D points the NLL itself. Optimizer: ``torch.optim.Adam`` (or SGD) with gentrain's
``[optim]`` settings (lr, betas, eps, weight_decay, momentum), its warm-up factor
``min(1, (step + 1) / warmup_steps)`` and ``clip_grad_norm``; like gentrain's step, this one reads
the loss on the host, skips the backward pass of a non-finite loss, and skips the update when a
gradient holds a NaN or infinity.

Exact evaluation data. ``trainer export-data`` refuses dequantized configs (the evaluation rows
are real values, which IDX bytes cannot hold), so ``eval`` takes the raw test pixels (e.g.
``data/mnist/t10k-images-idx3-ubyte.gz``) and dequantizes them exactly as
``DataSource::for_evaluation`` does: one ChaCha8 stream keyed by
``(TEST_BINARIZATION_SEED, Stream::FixedBinarize, 0)`` (SplitMix64 key derivation of
``src/rng.rs``), one 32-bit uniform ``r`` per pixel in row order, ``x = f32((p + r / 2^32) / 256)``
computed in float64. ChaCha8 and the key derivation are re-implemented below in numpy, so the
evaluation rows are bit-identical to gentrain's (the file's rows must be the test set from its
first row on, which is what ``--limit N`` of both tools takes; ``--seed`` selects another stream,
e.g. the run seed for a validation split, whose rows are the end of the training file). Checked:
a 20-step gentrain checkpoint of configs/realnvp-mnist.toml gives the same test NLL here and in
``trainer eval`` to 1.8e-4 nats of about 3000 (200 and 1000 images; 6e-8 relative, 3e-10
bits/dim), while rows dequantized with other noise move it by 0.6 nats.

Where this differs from gentrain (none of it changes the model, the loss or the evaluation):

- Random numbers: the Linear initialization, the epoch permutations (and so the rows ActNorm is
  initialized on), the per-batch dequantization noise and the 2-D training points are drawn from
  torch's / numpy's generators, not from gentrain's keyed ChaCha8 streams, so training here does
  not reproduce a gentrain run's numbers (same distributions; only the evaluation data above is
  reproduced exactly).
- The 2-D sets (``ring8``, ``grid25``, ``moons``, ``checkerboard``) are drawn with numpy by the
  constructions of ``src/data/synthetic.rs`` (same distributions, other points); ``eval`` of a 2-D
  flow reads the points from a ``.npy`` / text file of shape (n, 2) (they have no IDX form).
- Floating point: matmul and reduction orders differ (PyTorch's MKL kernels vs candle's gemm),
  so log-likelihoods agree to float32 rounding, not bit for bit.
- Kernels, which matter to ``bench``: gentrain's Adam is one fused in-place kernel per parameter
  (torch.optim.Adam's formula); ``bench`` uses torch's default (foreach) Adam unless
  ``--fused-adam`` asks for ``torch.optim.Adam(fused=True)``. The non-finite gradient check is
  torch's fused AMP check (one pass, like gentrain's bit test). ``--threads`` defaults to 2 here
  (as in torch_vae.py), to every core in gentrain: pass the same count to both.
- ``optim.second_moment_init`` (Adam's v_0) is not available in torch.optim.Adam: configs that set
  it are refused. ``bench`` runs at the schedule's epoch-0 rate (as ``trainer bench`` does).
- Data-parallel training, CUDA and conditional (``model.classes``) flows are not implemented here.

Subcommands (run ``--help`` on each):

    python scripts/torch_flow.py bench --config configs/realnvp-mnist.toml --threads 1 \\
        --steps 50 --warmup 5 [--batch-size B] [--fused-adam] [--json]
    python scripts/torch_flow.py eval --checkpoint RUN_OR_CKPT_DIR \\
        --data data/mnist/t10k-images-idx3-ubyte.gz [--limit N] [--json]

``bench`` times ``steps`` steps after ``warmup`` untimed ones, with gentrain's definitions
(``src/bench.rs``): ``samples_per_s = steps * batch / seconds``,
``ms_per_step = 1000 * seconds / steps``, where the timed loop includes batch gathering and
dequantization, forward, backward and the optimizer step; ActNorm's initialization runs in step 0
(a warm-up step unless ``--warmup 0``). ``--json`` prints one object with framework, family
("flow"), torch_version, threads, config, batch, steps, warmup, samples_per_s and ms_per_step.
Bad input (a missing or malformed file, a config that is not a flow, a checkpoint whose tensors do
not match its config, bad flags) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import sys
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gentrain_files  # noqa: E402  (where a run's checkpoint files are)
from torch_common import die  # noqa: E402

import numpy as np
import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent.parent
LN_2PI = math.log(2.0 * math.pi)

# src/rng.rs: TEST_BINARIZATION_SEED ("gentrain") and the stream numbers.
TEST_BINARIZATION_SEED = 0x6765_6E74_7261_696E
STREAM_FIXED_BINARIZE = 5

# src/models/flow.rs
ACTNORM_INIT_ROWS = 128
ACTNORM_MIN_ROWS = 32
ACTNORM_EPS = 1e-6

SYNTHETIC = ("ring8", "grid25", "moons", "checkerboard")

DEFAULTS = {
    "model": {"flow": {"coupling_layers": 8, "hidden": [512, 512], "actnorm": True,
                       "alpha": 1e-6}},
    "data": {"dataset": "mnist", "dir": "data/mnist", "binarize": "dynamic", "validation": 0,
             "limit_train": 0, "synthetic_size": 50_000},
    "train": {"batch_size": 128, "seed": 0},
    "optim": {"kind": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
              "weight_decay": 0.0, "momentum": 0.9, "warmup_steps": 0, "clip_grad_norm": 0.0,
              "second_moment_init": 0.0},
}


class BadInput(Exception):
    """Input this script cannot use: reported as one line on stderr, exit status 2."""


# --------------------------------------------------------------------------------------------
# gentrain's keyed ChaCha8 streams (src/rng.rs), for the exact evaluation rows
# --------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def stream_key(seed: int, stream: int, index: int) -> int:
    """`rng::stream_key(seed, stream, index)`."""
    return (splitmix64(seed & M64) ^ splitmix64(stream ^ 0xA5A5A5A5)
            ^ splitmix64(rotl64(index & M64, 17)))


def stream_key_words(seed: int, stream: int, index: int) -> list[int]:
    """The eight little-endian key words of `rng::stream_rng(seed, stream, index)`."""
    state = stream_key(seed, stream, index)
    words = []
    for _ in range(4):
        state = splitmix64(state)
        words += [state & 0xFFFFFFFF, state >> 32]
    return words


def chacha_words(key_words: list[int], n: int, rounds: int = 8) -> np.ndarray:
    """The first `n` 32-bit outputs of rand_chacha's ChaCha{rounds}Rng seeded with `key_words`
    (64-bit block counter from 0, stream 0): what `next_u32` / `fill` return in order."""
    blocks = -(-n // 16)
    ctr = np.arange(blocks, dtype=np.uint64)
    const = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
    init = [np.full(blocks, c, np.uint32) for c in const]
    init += [np.full(blocks, k, np.uint32) for k in key_words]
    init += [(ctr & np.uint64(0xFFFFFFFF)).astype(np.uint32),  # words 12-13: block counter
             (ctr >> np.uint64(32)).astype(np.uint32),
             np.zeros(blocks, np.uint32), np.zeros(blocks, np.uint32)]  # 14-15: stream 0
    x = [w.copy() for w in init]

    def rotl(v, r):
        return (v << np.uint32(r)) | (v >> np.uint32(32 - r))

    def qr(a, b, c, d):
        x[a] += x[b]; x[d] = rotl(x[d] ^ x[a], 16)
        x[c] += x[d]; x[b] = rotl(x[b] ^ x[c], 12)
        x[a] += x[b]; x[d] = rotl(x[d] ^ x[a], 8)
        x[c] += x[d]; x[b] = rotl(x[b] ^ x[c], 7)

    for _ in range(rounds // 2):
        qr(0, 4, 8, 12); qr(1, 5, 9, 13); qr(2, 6, 10, 14); qr(3, 7, 11, 15)
        qr(0, 5, 10, 15); qr(1, 6, 11, 12); qr(2, 7, 8, 13); qr(3, 4, 9, 14)
    out = np.stack([x[i] + init[i] for i in range(16)], axis=1)  # (blocks, 16)
    return out.reshape(-1)[:n]


def gentrain_uniforms(seed: int, stream: int, index: int, n: int) -> np.ndarray:
    """`n` u32 draws of gentrain's stream `(seed, stream, index)`."""
    return chacha_words(stream_key_words(seed, stream, index), n, rounds=8)


def dequantize_exact(pixels: np.ndarray, seed: int) -> np.ndarray:
    """`DataSource::for_evaluation` of dequantized rows: `f32((p + r / 2^32) / 256)`, the `r`
    drawn in row order from the stream `(seed, FixedBinarize, 0)`."""
    r = gentrain_uniforms(seed, STREAM_FIXED_BINARIZE, 0, pixels.size).reshape(pixels.shape)
    return ((pixels.astype(np.float64) + r.astype(np.float64) * (1.0 / 4294967296.0))
            / 256.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Module tree: docs/checkpoints.md, "RealNVP flow"
# --------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """`h' = (h + bias) * exp(logs)`; `log|det| = sum_j logs_j`."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.logs = nn.Parameter(torch.zeros(dim))


class Coupling(nn.Module):
    """Affine coupling: `net` (Linear, ReLU)*, `out` (2D outputs: pre-scales a, then shifts t),
    the per-dimension bound `scale`; the mask is a non-persistent buffer (not in checkpoints)."""

    def __init__(self, dim: int, hidden: list[int], mask: torch.Tensor):
        super().__init__()
        layers, d = [], dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(d, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.scale = nn.Parameter(torch.ones(dim))
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("inv_mask", 1.0 - mask, persistent=False)

    def scale_shift(self, h: torch.Tensor):
        """`(s, t)` given the layer input `h` (only `mask * h` is read)."""
        dim = h.shape[1]
        o = self.out(self.net(h * self.mask))
        s = torch.tanh(o[:, :dim]) * self.scale * self.inv_mask
        t = o[:, dim:] * self.inv_mask
        return s, t


class FlowStep(nn.Module):
    def __init__(self, dim: int, hidden: list[int], mask: torch.Tensor, actnorm: bool):
        super().__init__()
        if actnorm:
            self.actnorm = ActNorm(dim)
        self.coupling = Coupling(dim, hidden, mask)


class Flow(nn.Module):
    """gentrain's `Flow`: `layers.{l}.actnorm.{bias,logs}`, `layers.{l}.coupling.net.{2i}.*`,
    `layers.{l}.coupling.out.*`, `layers.{l}.coupling.scale`."""

    def __init__(self, flow_cfg: dict, shape: tuple[int, int]):
        super().__init__()
        rows, cols = shape
        dim = rows * cols
        if dim < 2:
            raise BadInput(f"a coupling flow needs at least 2 values per row, the data has {dim}")
        self.dim, self.shape = dim, (rows, cols)
        self.alpha = float(flow_cfg["alpha"])
        self.has_actnorm = bool(flow_cfg["actnorm"])
        i = torch.arange(dim)
        steps = []
        for l in range(int(flow_cfg["coupling_layers"])):
            mask = ((i // cols + i % cols + l) % 2).to(torch.float32).unsqueeze(0)
            steps.append(FlowStep(dim, [int(h) for h in flow_cfg["hidden"]], mask,
                                  self.has_actnorm))
        self.layers = nn.ModuleList(steps)

    @property
    def uses_logit(self) -> bool:
        return self.shape[0] > 1

    def forward(self, x: torch.Tensor):
        """`(z, log|det dz/dx|)` per row."""
        h = x
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for step in self.layers:
            if self.has_actnorm:
                an = step.actnorm
                h = (h + an.bias) * torch.exp(an.logs)
                log_det = log_det + an.logs.sum()
            s, t = step.coupling.scale_shift(h)
            h = h * torch.exp(s) + t
            log_det = log_det + s.sum(-1)
        return h, log_det

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        z, log_det = self(y)
        return -0.5 * (z * z + LN_2PI).sum(-1) + log_det

    def to_model_space(self, x: torch.Tensor):
        """Images: the logit transform and its per-row log-Jacobian; 2-D points: unchanged."""
        if not self.uses_logit:
            return x, None
        a = self.alpha
        p = x * (1.0 - 2.0 * a) + a
        log_p, log_1mp = torch.log(p), torch.log(1.0 - p)
        lj = (-(log_p + log_1mp) + math.log(1.0 - 2.0 * a)).sum(-1)
        return log_p - log_1mp, lj

    def data_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact per-row `log p(x)` (nats; images: a density on [0, 1)^D)."""
        y, lj = self.to_model_space(x)
        lp = self.log_prob(y)
        return lp if lj is None else lp + lj

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Glow's data-dependent ActNorm start on model-space rows `y` (gentrain's
        `Flow::initialize`, statistics in float64)."""
        h = y.detach()
        for step in self.layers:
            if self.has_actnorm:
                h64 = h.to(torch.float64)
                mean = h64.mean(0)
                std = (h64 - mean).square().mean(0).sqrt()
                const = std <= ACTNORM_EPS * mean.abs().clamp(min=1.0)
                logs = torch.where(const, torch.zeros_like(std), -torch.log(std + ACTNORM_EPS))
                step.actnorm.bias.copy_((-mean).to(torch.float32))
                step.actnorm.logs.copy_(logs.to(torch.float32))
                h = (h + step.actnorm.bias) * torch.exp(step.actnorm.logs)
            s, t = step.coupling.scale_shift(h)
            h = h * torch.exp(s) + t


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def resolve_config(raw: dict, where: str) -> dict:
    """Fills the keys a config leaves out with gentrain's defaults; checks the flow part."""
    cfg = json.loads(json.dumps(raw))
    for section, defaults in DEFAULTS.items():
        sec = cfg.setdefault(section, {})
        if not isinstance(sec, dict):
            raise BadInput(f"{where}: [{section}] is not a table")
        for key, value in defaults.items():
            if key == "flow":
                continue
            sec.setdefault(key, json.loads(json.dumps(value)))
    family = cfg["model"].get("family", "vae")
    if family != "flow":
        raise BadInput(f"{where}: model.family = {family!r}, this script runs flows only "
                       "(family = \"flow\")")
    f = cfg["model"].setdefault("flow", {})
    unknown = set(f) - set(DEFAULTS["model"]["flow"])
    if unknown:
        raise BadInput(f"{where}: unknown key(s) in [model.flow]: {', '.join(sorted(unknown))}")
    for key, value in DEFAULTS["model"]["flow"].items():
        f.setdefault(key, json.loads(json.dumps(value)))
    try:
        f["coupling_layers"] = int(f["coupling_layers"])
        f["hidden"] = [int(h) for h in f["hidden"]]
        f["alpha"] = float(f["alpha"])
        cfg["train"]["batch_size"] = int(cfg["train"]["batch_size"])
        cfg["train"]["seed"] = int(cfg["train"]["seed"])
        for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum", "clip_grad_norm",
                  "second_moment_init"):
            cfg["optim"][k] = float(cfg["optim"][k])
        cfg["optim"]["warmup_steps"] = int(cfg["optim"]["warmup_steps"])
        for k in ("validation", "limit_train", "synthetic_size"):
            cfg["data"][k] = int(cfg["data"][k])
    except (TypeError, ValueError) as e:
        raise BadInput(f"{where}: {e}")
    if f["coupling_layers"] < 1:
        raise BadInput(f"{where}: model.flow.coupling_layers must be at least 1")
    if not f["hidden"] or min(f["hidden"]) < 1:
        raise BadInput(f"{where}: model.flow.hidden: at least one hidden layer, every width "
                       "positive")
    if not (0.0 <= f["alpha"] < 0.5):
        raise BadInput(f"{where}: model.flow.alpha = {f['alpha']}: must be in [0, 0.5)")
    if (str(cfg["data"]["dataset"]) not in SYNTHETIC
            and str(cfg["data"]["binarize"]).lower() != "dequantize"):
        raise BadInput(f"{where}: a flow is a density on continuous data: set data.binarize = "
                       "\"dequantize\"")
    if int(cfg["model"].get("classes", 0) or 0) > 0:
        raise BadInput(f"{where}: conditional flows (model.classes > 0) are not implemented here")
    return cfg


def load_config(path: str) -> dict:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML ({e})")
    return resolve_config(raw, path)


def make_optimizer(cfg: dict, params, fused: bool = False):
    """gentrain's optimizer as torch.optim builds it; `fused`: Adam's single-kernel
    implementation (gentrain's Adam is fused too), else torch's default (foreach)."""
    o = cfg["optim"]
    kind = str(o["kind"]).lower()
    if kind == "adam":
        if o["second_moment_init"] != 0.0:
            raise BadInput("optim.second_moment_init != 0 (Adam's v_0) has no torch.optim.Adam "
                           "equivalent")
        return torch.optim.Adam(params, lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                                eps=o["eps"], weight_decay=o["weight_decay"],
                                **({"fused": True} if fused else {}))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"],
                               weight_decay=o["weight_decay"])
    raise BadInput(f"optim.kind = {o['kind']!r}: expected adam or sgd")


def learning_rate_at(cfg: dict, step: int) -> float:
    """`optim::learning_rate_at(cfg, 0, step)`: every schedule starts at `lr` in epoch 0."""
    o = cfg["optim"]
    if o["warmup_steps"] == 0:
        return o["lr"]
    return o["lr"] * min(1.0, (step + 1) / o["warmup_steps"])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes as a uint8 ndarray."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise BadInput(f"{path}: {getattr(e, 'strerror', None) or e}")
    if len(data) < 4:
        raise BadInput(f"{path}: not an IDX file ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim == 0 or len(data) < 4 + 4 * ndim:
        raise BadInput(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise BadInput(f"{path}: expected {int(np.prod(dims))} bytes of data, found {body.size}")
    return body.reshape(dims)


def load_images(data_dir: Path, split: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Images of a split ('train' or 't10k') as (n, rows * cols) uint8 and (rows, cols)."""
    for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte"):
        if (data_dir / name).exists():
            x = read_idx(data_dir / name)
            if x.ndim != 3 or min(x.shape) == 0:
                raise BadInput(f"{data_dir / name}: expected a non-empty (n, rows, cols) image "
                               f"file, found shape {x.shape}")
            return x.reshape(x.shape[0], -1), (int(x.shape[1]), int(x.shape[2]))
    raise BadInput(f"no {split}-images-idx3-ubyte(.gz) in {data_dir}")


def synthetic_points(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points of a 2-D set by the constructions of src/data/synthetic.rs."""
    if name in ("ring8", "grid25"):
        if name == "ring8":
            a = np.arange(8) * math.pi / 4.0
            modes, std = np.stack([2.0 * np.cos(a), 2.0 * np.sin(a)], 1), 0.02
        else:
            i = np.arange(25)
            modes, std = np.stack([(i // 5 - 2.0) * 2.0, (i % 5 - 2.0) * 2.0], 1), 0.05
        pts = modes[rng.integers(0, len(modes), n)] + std * rng.standard_normal((n, 2))
    elif name == "moons":
        t = rng.uniform(0.0, math.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        pts = np.stack([x, y], 1) + 0.1 * rng.standard_normal((n, 2))
    else:  # checkerboard, FFJORD's construction scaled by 2
        x1 = rng.uniform(-2.0, 2.0, n)
        x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.mod(np.floor(x1), 2.0)
        pts = np.stack([2.0 * x1, 2.0 * x2], 1)
    return pts.astype(np.float32)


class TrainData:
    """The training rows of a config and gentrain's per-batch input transform."""

    def __init__(self, cfg: dict):
        d = cfg["data"]
        name = str(d["dataset"])
        seed = cfg["train"]["seed"]
        if name in SYNTHETIC:
            self.shape = (1, 2)
            self.real = torch.from_numpy(synthetic_points(
                name, max(int(d["synthetic_size"]), 1), np.random.default_rng(seed)))
            self.pixels = None
            self.n = self.real.shape[0]
            return
        if name not in ("mnist", "idx"):
            raise BadInput(f"data.dataset = {name!r}: expected mnist, idx or one of "
                           f"{', '.join(SYNTHETIC)}")
        data_dir = Path(d["dir"])
        if not data_dir.is_absolute() and not data_dir.exists():
            data_dir = REPO_ROOT / data_dir
        px, self.shape = load_images(data_dir, "train")
        validation, limit = int(d["validation"]), int(d["limit_train"])
        if validation > 0:
            if validation >= px.shape[0]:
                raise BadInput(f"validation size {validation} leaves no training images (the "
                               f"set has {px.shape[0]})")
            px = px[:px.shape[0] - validation]
        if limit > 0:
            px = px[:limit]
        self.real = None
        self.pixels = torch.from_numpy(np.array(px))  # a writable copy
        self.n = px.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[0] * self.shape[1]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` as model inputs: 2-D points as stored; images dequantized afresh,
        `x = f32((p + u) / 256)`, `u ~ U[0, 1)`, computed in float64 as gentrain does."""
        if self.real is not None:
            return self.real[idx]
        p = self.pixels[idx]
        u = torch.rand(p.shape, dtype=torch.float64)
        return ((p.to(torch.float64) + u) / 256.0).to(torch.float32)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def init_rows(first: torch.Tensor, perm0: torch.Tensor, n: int) -> torch.Tensor:
    """`train::flow::init_rows`: the first batch when it has >= 128 rows (or is all of them),
    else the first 128 rows of the first epoch's order."""
    if len(first) >= ACTNORM_INIT_ROWS or len(first) >= n:
        return first
    return perm0[:ACTNORM_INIT_ROWS]


_FOUND_INF, _ONE = torch.zeros(1), torch.ones(1)


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """`optim::check_finite_grads`: no NaN or infinity in any gradient, in one fused pass (the
    AMP check, which multiplies by 1 in place: the values are unchanged); a per-tensor norm
    where that kernel is missing."""
    try:
        _FOUND_INF.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, _FOUND_INF, _ONE)
        return _FOUND_INF.item() == 0.0
    except (AttributeError, RuntimeError, NotImplementedError):
        return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


def train_step(model: Flow, opt, cfg: dict, x: torch.Tensor, lr: float):
    """gentrain's FlowTrainee::step after the batch is drawn: returns (loss, applied)."""
    loss = -model.data_log_prob(x).mean()
    lv = float(loss.item())
    if not math.isfinite(lv):
        return lv, False  # no backward pass for a non-finite loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if not grads_finite([p.grad for p in model.parameters() if p.grad is not None]):
        return lv, False
    clip = cfg["optim"]["clip_grad_norm"]
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return lv, True


def bench(cfg: dict, steps: int, warmup: int, batch: int | None,
          fused_adam: bool = False) -> dict:
    seed = cfg["train"]["seed"]
    torch.manual_seed(seed)
    data = TrainData(cfg)
    n = data.n
    if cfg["model"]["flow"]["actnorm"] and n < ACTNORM_MIN_ROWS:
        raise BadInput(f"model.flow.actnorm: ActNorm's initialization needs at least "
                       f"{ACTNORM_MIN_ROWS} training rows, the training set has {n}")
    model = Flow(cfg["model"]["flow"], data.shape)
    opt = make_optimizer(cfg, model.parameters(), fused_adam)
    bs = min(batch or cfg["train"]["batch_size"], n)
    if bs < 1:
        raise BadInput("--batch-size must be at least 1")
    per_epoch = max(n // bs, 1)
    perm0 = perm = torch.randperm(n)
    needs_init = bool(cfg["model"]["flow"]["actnorm"])
    skipped = 0
    loss = float("nan")
    t0 = time.perf_counter()
    for s in range(warmup + steps):
        if s == warmup:
            t0 = time.perf_counter()
        within = s % per_epoch
        if within == 0 and s > 0:
            perm = torch.randperm(n)
        idx = perm[within * bs:(within + 1) * bs]
        x = data.batch(idx)
        if needs_init:
            init = init_rows(idx, perm0, n)
            x_init = x if len(init) == len(idx) else data.batch(init)
            model.initialize(model.to_model_space(x_init)[0])
            needs_init = False
        loss, applied = train_step(model, opt, cfg, x, learning_rate_at(cfg, s))
        skipped += 0 if applied else 1
    secs = time.perf_counter() - t0
    return {
        "framework": "pytorch", "family": "flow", "mode": "cpu", "device": "cpu",
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "batch": bs, "steps": steps, "warmup": warmup,
        "samples_per_s": steps * bs / secs, "ms_per_step": secs * 1e3 / steps,
        "adam": "fused" if fused_adam else "default", "seconds": secs, "final_loss": loss,
        "skipped_steps": skipped,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def cmd_bench(args) -> None:
    if args.steps < 1:
        raise BadInput("--steps must be at least 1")
    if args.warmup < 0:
        raise BadInput("--warmup must be at least 0")
    if args.threads < 1:
        raise BadInput("--threads must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    cfg = load_config(args.config)
    torch.set_num_threads(args.threads)
    if args.fused_adam and str(cfg["optim"]["kind"]).lower() != "adam":
        raise BadInput("--fused-adam needs optim.kind = \"adam\"")
    r = bench(cfg, args.steps, args.warmup, args.batch_size, args.fused_adam)
    r["config"] = args.config
    if args.json:
        print(json.dumps(r), flush=True)
    else:
        print(f"pytorch flow {r['samples_per_s']:10.1f} samples/s  {r['ms_per_step']:8.2f} "
              f"ms/step  (batch {r['batch']}, {r['threads']} threads, {args.steps} steps after "
              f"{args.warmup} warm-up, torch {torch.__version__}, final loss "
              f"{r['final_loss']:.2f})", flush=True)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A run dir (uses the name in `latest`), a ckpt-* dir, or a model.safetensors file."""
    try:
        return gentrain_files.resolve_checkpoint(path)
    except ValueError as e:
        raise BadInput(str(e)) from None


def load_flow(path: Path) -> tuple[Flow, dict, dict]:
    """Builds the flow of a gentrain checkpoint and loads its tensors strictly by name."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ModuleNotFoundError as e:
        raise BadInput(f"safetensors is not installed ({e}): pip install safetensors")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise BadInput(f"{path}: not a readable safetensors file ({e})")
    if meta.get("model_family") != "flow":
        raise BadInput(f"{path}: model_family {meta.get('model_family')!r} is not 'flow'")
    try:
        cfg = resolve_config(json.loads(meta["config"]), str(path))
        rows, cols = (int(v) for v in meta["image_shape"].split(","))
        dim = int(meta["input_dim"])
    except (KeyError, ValueError) as e:
        raise BadInput(f"{path}: metadata without a usable config / image_shape / input_dim "
                       f"({e})")
    if rows * cols != dim:
        raise BadInput(f"{path}: image_shape {rows},{cols} does not match input_dim {dim}")
    model = Flow(cfg["model"]["flow"], (rows, cols))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadInput(f"{path}: the tensors do not match the flow of its config ({e})")
    return model.eval(), meta, cfg


def eval_rows(args, model: Flow, cfg: dict) -> tuple[torch.Tensor, bool, str]:
    """The evaluation rows of `--data` as gentrain's test DataSource holds them; returns
    (rows, dequantized, how)."""
    path = Path(args.data)
    if not model.uses_logit:
        try:
            pts = (np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2))
        except (OSError, ValueError) as e:
            raise BadInput(f"{path}: a 2-D flow reads points from a .npy or text file of shape "
                           f"(n, 2) ({e})")
        pts = np.asarray(pts, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != model.dim:
            raise BadInput(f"{path}: expected points of shape (n, {model.dim}), found "
                           f"{pts.shape}")
        if args.limit:
            pts = pts[:args.limit]
        return torch.from_numpy(pts), False, "points as given"
    raw = read_idx(path)
    if raw.ndim < 2:
        raise BadInput(f"{path}: expected an image file, found shape {raw.shape}")
    raw = raw.reshape(raw.shape[0], -1)
    if raw.shape[1] != model.dim:
        raise BadInput(f"{path}: {raw.shape[1]} values per image, the flow has {model.dim}")
    if args.limit:
        raw = raw[:args.limit]
    if raw.shape[0] == 0:
        raise BadInput(f"{path}: no images")
    if raw.max() <= 1:
        print(f"warning: {path} holds only 0/1 values, but the flow models dequantized 8-bit "
              "pixels: pass the raw test images", file=sys.stderr)
    seed = args.seed if args.seed is not None else TEST_BINARIZATION_SEED
    return (torch.from_numpy(dequantize_exact(raw, seed)), True,
            f"dequantized once, ChaCha8 stream (seed {seed:#x}, FixedBinarize, 0)")


def cmd_eval(args) -> None:
    if args.threads < 1:
        raise BadInput("--threads must be at least 1")
    if args.limit < 0:
        raise BadInput("--limit must be at least 0")
    if args.batch < 1:
        raise BadInput("--batch must be at least 1")
    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    model, meta, cfg = load_flow(ckpt)
    x, dequantized, how = eval_rows(args, model, cfg)
    t = time.perf_counter()
    ll = []
    with torch.no_grad():
        for start in range(0, x.shape[0], args.batch):
            ll.append(model.data_log_prob(x[start:start + args.batch]).to(torch.float64))
    ll = torch.cat(ll).numpy()
    n = len(ll)
    nll = float(-ll.sum() / n)
    stderr = (float(np.sqrt(((-ll - nll) ** 2).sum() / (max(n, 2) - 1) / n))
              if math.isfinite(nll) else float("nan"))
    d = model.dim
    bpd = ((nll + (d * math.log(256.0) if dequantized else 0.0)) / (d * math.log(2.0))
           if model.uses_logit else None)
    res = {"framework": "pytorch", "family": "flow", "torch_version": torch.__version__,
           "checkpoint": str(ckpt), "data": str(args.data), "step": meta.get("step"),
           "n": n, "nll": nll, "nll_stderr": stderr, "bits_per_dim": bpd, "rows": how,
           "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"checkpoint {ckpt} (step {meta.get('step')}, {len(model.layers)} couplings)")
        print(f"NLL        {nll:.4f} +- {stderr:.4f} nats  (n={n}; rows {how})")
        if bpd is not None:
            print(f"bits/dim   {bpd:.5f}")


# --------------------------------------------------------------------------------------------


def int_auto(text: str) -> int:
    """An integer in any base Python reads (`12`, `0x67656e747261696e`)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own status for usage errors)
        die(f"{self.prog}: {message}")


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    p = sub.add_parser("bench", help="training-step throughput (samples/s, ms/step)")
    p.add_argument("--config", required=True, help="gentrain TOML config of a flow")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--steps", type=int, default=300, help="timed steps (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed warm-up steps (default 30)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=None,
                   help="default: [train] batch_size")
    p.add_argument("--fused-adam", action="store_true",
                   help="torch.optim.Adam(fused=True) instead of torch's default (foreach) Adam")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="exact test NLL and bits/dim of a gentrain flow checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (uses `latest`), ckpt-* dir or model.safetensors")
    p.add_argument("--data", required=True,
                   help="IDX file (.gz ok) of the test images from the first one on (raw pixels "
                        "for dequantized flows; 0/1 from `trainer export-data` for binary "
                        "ones), or for a 2-D flow a .npy / text file of (n, 2) points")
    p.add_argument("--limit", type=int, default=0, help="first N rows (0 = all, the default)")
    p.add_argument("--batch", type=int, default=1000, help="rows per forward pass")
    p.add_argument("--seed", type=int_auto, default=None,
                   help="seed of the one-off dequantization / binarization stream (default "
                        "gentrain's test seed 0x67656e747261696e; a validation split uses the "
                        "run seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    args = ap.parse_args(argv)
    try:
        args.func(args)
    except BadInput as e:
        die(e)


if __name__ == "__main__":
    main()
