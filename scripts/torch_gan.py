#!/usr/bin/env python3
"""Independent PyTorch implementation of gentrain's GAN training step.

This script times PyTorch's GAN training step on the same machine as gentrain's
``trainer bench`` (``bench``), and loads gentrain GAN checkpoints strictly, by name, into the
modules built here (``check-checkpoint``), which proves that the two module trees match. It
re-implements ``src/models/gan.rs``, ``src/objectives/gan.rs`` and ``src/train/gan.rs`` from their
documented semantics; the tensor names are those of ``docs/checkpoints.md`` (section "GAN").

Papers:

- Goodfellow et al. 2014, "Generative Adversarial Nets": the game, alternating updates
  (algorithm 1), the minimax loss (eq. 1) and the non-saturating generator loss (section 3);
- Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative Adversarial
  Networks": ``W / sigma(W)`` with one persistent power-iteration vector (algorithm 1), and
  the hinge loss; Miyato & Koyama 2018, "cGANs with Projection Discriminator" (conditional D);
- Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville 2017, "Improved Training of Wasserstein
  GANs": WGAN-GP, the gradient penalty at random interpolates (algorithm 1);
- Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do actually Converge?":
  the R1 penalty ``gamma / 2 ||grad_x D(x)||^2`` on real data (eq. 9);
- Lim & Ye 2017, "Geometric GAN": the hinge loss;
- Radford, Metz & Chintala 2016 (DCGAN-style players); Kurach et al. 2019 (penalties with any
  loss).

Players (config ``[model.gan]``; ``dim`` values per row, ``C = model.classes``):

    MLP generator      gen.net:  Linear, ReLU per gen_hidden width; Linear -> dim; Sigmoid (images)
    MLP discriminator  disc.net: Linear, LeakyReLU(0.2) per disc_hidden width; Linear -> 1
    DCGAN generator    gen.net:  Linear(latent + C, C2 H/4 W/4), ReLU, Unflatten,
                                 ConvT(C2, C1, 4, 2, 1), ReLU, ConvT(C1, 1, 4, 2, 1), Sigmoid
    DCGAN discrim.     disc.net: Conv(1, C1, 4, 2, 1), LeakyReLU(0.2), Conv(C1, C2, 4, 2, 1),
                                 LeakyReLU(0.2), Flatten, Linear(C2 H/4 W/4, 1)
    conditional        generator input [z, one-hot y]; D(x, y) = w^T phi + b + <E^T y, phi>,
                       phi the last hidden features, E = disc.embed.weight (C, H), not normalized

With ``spectral_norm = true`` every discriminator layer is wrapped in
``torch.nn.utils.spectral_norm(..., n_power_iterations = sn_iterations)``, which stores
``weight_orig``, ``weight_u`` and ``weight_v`` exactly as gentrain's checkpoints do.

Losses (batch means; ``D`` the logit, ``x`` real, ``G(z)`` fake):

    non_saturating  D: softplus(-D(x)) + softplus(D(G(z)))       G: softplus(-D(G(z)))
    minimax         D: as non_saturating                         G: -softplus(D(G(z)))
    hinge           D: relu(1 - D(x)) + relu(1 + D(G(z)))        G: -D(G(z))
    wgan_gp         D: D(G(z)) - D(x) (+ the gradient penalty)   G: -D(G(z))

Penalties on D (``model.gan.penalty``; ``wgan_gp`` always has ``gp``):

    gp   gp_weight * mean (sqrt(||grad_x D(x_hat)||^2 + 1e-12) - 1)^2,
         x_hat = t x + (1 - t) G(z), t ~ U[0, 1) per row (labels left unchanged)
    r1   r1_gamma / 2 * mean ||grad_x D(x)||^2 on the real rows

What one step is (``src/bench.rs``, ``src/train/gan.rs``): gentrain's ``trainer bench`` counts one
``Trainee::step`` as one step, and a GAN's ``Trainee::step`` is ONE DISCRIMINATOR UPDATE on one
fresh minibatch of real rows, followed, on the steps ``s`` (0-based, warm-up steps included) with
``(s + 1) % n_critic == 0``, by one generator update on fresh noise. So with ``n_critic = 5`` a
step is not "one generator update and its five critic updates": five steps are. This script
counts steps the same way, and ``samples_per_s`` is, as in gentrain, ``steps * batch / seconds``:
real rows consumed per second (one batch per discriminator update). ``ms_per_step`` is the mean
time of one such step.

Each step, as gentrain's: gather the batch (an epoch permutation of the training rows, a new
permutation every ``n // batch`` steps, the last partial batch dropped), draw the fakes' noise
``z (B, latent)`` and the penalty's ``t (B, 1)`` (drawn every step, used only with ``gp``), run
one power iteration sweep (``sn_iterations`` iterations per layer), compute the discriminator
loss on real rows and detached fakes, read it on the host (a non-finite loss ends the step with
no backward pass and no update), backpropagate, skip the update if any discriminator gradient is
not finite, take the Adam (or SGD) step; then, every ``n_critic``-th step and only if the
discriminator update was applied, the generator update on fresh noise (same checks). Optimizers:
one per player, gentrain's ``[optim]`` settings with ``d_lr`` / ``g_lr`` and ``d_betas`` /
``g_betas`` in place of ``lr`` and ``beta1, beta2``, ``eps``, ``weight_decay`` (L2, as
``torch.optim.Adam``), ``clip_grad_norm``, ``second_moment_init`` and the warm-up factor
``min(1, (s + 1) / warmup_steps)``. Like ``trainer bench``, the learning rate is the schedule's
value at epoch 0 (every schedule starts at ``lr``).

Data, as gentrain's ``session::load_datasets``: the synthetic 2-D sets (``grid25``: 25 Gaussians
at {-4,-2,0,2,4}^2, std 0.05; ``ring8``: 8 Gaussians on the circle of radius 2, std 0.02;
``moons``: two half circles with Gaussian noise 0.1; ``checkerboard``: FFJORD's construction
scaled by 2) as a fixed training set of ``data.synthetic_size`` points drawn once; IDX image sets
(MNIST) from ``data.dir``, ``data.validation`` rows held out from the end, ``data.limit_train``,
pixels as ``p / 255`` (gentrain's GAN takes ``binarize = "none"`` only and refuses the other
modes; so does this script), one-hot labels appended for a conditional GAN.

Where this differs from gentrain (apart from the random values of item 1, nothing here changes
what a step computes beyond the last bits of floating point; items 3 and 5 change how much work
it takes, in opposite directions, by little):

1. Random numbers. gentrain draws everything from ChaCha8 streams keyed by (seed, stream, step);
   here torch's generator draws the noise, the penalty points, the permutations and the
   initialization, and numpy's PCG64 the synthetic points. Same distributions, different values:
   no run here reproduces a gentrain run number for number.
2. Initialization: torch's defaults (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and
   biases, fan_in of a ConvTranspose2d from ``weight.size(1) * 16``), the distributions gentrain
   uses; the projection embedding is re-drawn from gentrain's ``U(-1/sqrt(H), 1/sqrt(H))``
   instead of ``nn.Embedding``'s ``N(0, 1)``; the spectral-norm vectors start as torch's
   normalized ``N(0, I)`` draws, as gentrain's do.
3. Spectral norm is torch's own: the power iteration normalizes by ``max(||x||, 1e-12)`` where
   gentrain divides by ``||x|| + 1e-12`` (the same for any vector not near zero). It runs inside
   the first discriminator forward of each update (on the real rows, with the discriminator in
   training mode; every other forward runs in eval mode, which uses the stored ``u``, ``v``);
   gentrain runs it just before drawing the fakes, which does not involve D, so both apply the
   same ``u``, ``v`` to the same weights. torch's hook recomputes ``sigma = u^T W v`` and
   ``W / sigma`` at every forward (real, fake, penalty, generator update) where gentrain computes
   them once per loss: the same values, two matrix-vector products per layer more per forward.
4. Penalty gradients: ``torch.autograd.grad(..., create_graph=True)`` and double backward, where
   gentrain writes the discriminator's input gradient as a forward graph (the chain rule layer
   by layer). Both take LeakyReLU's derivative as 1 for ``a > 0`` and 0.2 otherwise, so the
   values and the weight gradients agree. As in gentrain the penalty runs its own forward (at
   ``x_hat``, or at the real rows for R1: three discriminator forwards per update).
5. The generator update freezes the discriminator's parameters (``requires_grad_(False)``), so
   backward computes no discriminator weight gradients; gentrain's backward computes them and
   discards them. The generator's gradients and update are the same.
6. One process only (no data parallelism); no training loop, evaluation or checkpoint writing;
   the step's logged figures (``d_real``, ``d_fake``, the penalty) are computed but not logged.
   ``--device cuda`` runs the same step on a GPU with torch's on-device random numbers (gentrain
   uses its counter-based draws there); the CPU path is the one checked against gentrain.

Subcommands:

    bench --config CONFIG [--threads T] [--steps S] [--warmup W] [--batch-size B] [--json]
        W untimed then S timed steps; prints samples_per_s and ms_per_step (wall clock, as
        gentrain's bench), with --json one object that also holds framework, torch_version,
        threads, config, batch, steps, family "gan", loss, penalty (the effective one),
        spectral_norm, sn_iterations, n_critic, architecture, classes, parameters (gentrain's
        count: trainable values of both players, spectral-norm vectors excluded),
        generator_updates and skipped_steps of the timed steps, and cpu_ms_per_step (process
        CPU time, which a loaded machine inflates less than the wall clock). --compile wraps
        the generator in torch.compile (the discriminator stays eager: its spectral-norm hooks
        switch between training and eval mode, and the penalties need double backward); pass a
        --warmup of at least n_critic so that both of its graphs are compiled before the clock
        starts. Eager PyTorch is the reference figure.
    check-checkpoint --checkpoint RUN_DIR|CKPT_DIR|model.safetensors [--json]
        builds the players from the checkpoint's own config and loads ``gen.*`` and
        ``disc.*`` with ``load_state_dict(strict=True)``; prints the tensor and parameter counts.

Bad input (a missing or unreadable config, a config that is not a GAN, an unknown loss, penalty
or architecture, data that is missing or does not fit the players) prints one line on stderr and
exits with status 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
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
from torch_common import die, resolve_device  # noqa: E402

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm as torch_spectral_norm

REPO_ROOT = Path(__file__).resolve().parent.parent

LOSSES = ("non_saturating", "hinge", "wgan_gp", "minimax")
PENALTIES = ("none", "gp", "r1")
ARCHITECTURES = ("mlp", "dcgan")
SYNTHETIC = ("ring8", "grid25", "moons", "checkerboard")
BINARIZE = ("dynamic", "fixed", "none", "dequantize")

# Defaults of src/config/model.rs (GanConfig), src/config/optim.rs, src/config/data.rs and
# src/config/train.rs, for the keys a config leaves out.
GAN_DEFAULTS = {
    "latent": 64,
    "architecture": "mlp",
    "conv_channels": [32, 64],
    "gen_hidden": [256, 256],
    "disc_hidden": [256, 256],
    "loss": "non_saturating",
    "n_critic": 1,
    "spectral_norm": False,
    "sn_iterations": 1,
    "gp_weight": 10.0,
    "penalty": "none",
    "r1_gamma": 10.0,
}
OPTIM_DEFAULTS = {
    "kind": "adam",
    "lr": 1e-3,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "momentum": 0.9,
    "schedule": "constant",
    "step_epochs": 10,
    "gamma": 0.5,
    "warmup_steps": 0,
    "clip_grad_norm": 0.0,
    "second_moment_init": 0.0,
    "d_lr": None,
    "g_lr": None,
    "d_betas": None,
    "g_betas": None,
}
DATA_DEFAULTS = {
    "dataset": "mnist",
    "dir": "data/mnist",
    "binarize": "dynamic",
    "validation": 0,
    "limit_train": 0,
    "synthetic_size": 50_000,
}
TRAIN_DEFAULTS = {"batch_size": 128, "seed": 0, "device": "cpu", "tf32": True}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _section(raw: dict, name: str, defaults: dict) -> dict:
    sec = raw.get(name, {})
    if not isinstance(sec, dict):
        die(f"[{name}] must be a table")
    out = dict(defaults)
    out.update(sec)
    return out


def _int(value, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        die(f"{key} = {value!r}: expected an integer >= {minimum}")
    return value


def _float(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        die(f"{key} = {value!r}: expected a finite number")
    return float(value)


def _widths(value, key: str) -> list[int]:
    if not isinstance(value, list):
        die(f"{key} = {value!r}: expected a list of widths")
    return [_int(v, key, 1) for v in value]


def resolve_config(raw: dict) -> dict:
    """The GAN config of a parsed TOML (or checkpoint JSON) file, defaults filled in and checked
    as gentrain checks it (`GanConfig::validate`); dies on anything else."""
    if not isinstance(raw, dict):
        die("the config is not a table")
    model = raw.get("model", {})
    if not isinstance(model, dict):
        die("[model] must be a table")
    family = model.get("family", "vae")
    if family != "gan":
        die(f"model.family = {family!r}: this script implements only GANs "
            "(model.family = \"gan\")")
    gan_raw = model.get("gan", {})
    if not isinstance(gan_raw, dict):
        die("[model.gan] must be a table")
    unknown = sorted(set(gan_raw) - set(GAN_DEFAULTS))
    if unknown:
        die(f"[model.gan]: unknown key(s) {', '.join(unknown)} (known: "
            f"{', '.join(GAN_DEFAULTS)})")
    g = dict(GAN_DEFAULTS)
    g.update(gan_raw)
    if g["loss"] not in LOSSES:
        die(f"model.gan.loss = {g['loss']!r}: expected one of {', '.join(LOSSES)}")
    if g["penalty"] not in PENALTIES:
        die(f"model.gan.penalty = {g['penalty']!r}: expected one of {', '.join(PENALTIES)}")
    if g["architecture"] not in ARCHITECTURES:
        die(f"model.gan.architecture = {g['architecture']!r}: expected one of "
            f"{', '.join(ARCHITECTURES)}")
    g["latent"] = _int(g["latent"], "model.gan.latent", 1)
    cc = g["conv_channels"]
    if not (isinstance(cc, list) and len(cc) == 2):
        die(f"model.gan.conv_channels = {cc!r}: expected [C1, C2]")
    g["conv_channels"] = [_int(c, "model.gan.conv_channels", 1) for c in cc]
    g["gen_hidden"] = _widths(g["gen_hidden"], "model.gan.gen_hidden")
    g["disc_hidden"] = _widths(g["disc_hidden"], "model.gan.disc_hidden")
    g["n_critic"] = _int(g["n_critic"], "model.gan.n_critic", 1)
    g["sn_iterations"] = _int(g["sn_iterations"], "model.gan.sn_iterations", 1)
    if not isinstance(g["spectral_norm"], bool):
        die(f"model.gan.spectral_norm = {g['spectral_norm']!r}: expected true or false")
    for key in ("gp_weight", "r1_gamma"):
        g[key] = _float(g[key], f"model.gan.{key}")
        if g[key] < 0:
            die(f"model.gan.{key} must be finite and >= 0")
    if g["loss"] == "wgan_gp" and g["penalty"] == "r1":
        die('model.gan.penalty = "r1" with loss = "wgan_gp": that loss has its gradient '
            "penalty already")
    classes = _int(model.get("classes", 0), "model.classes", 0)

    o = _section(raw, "optim", OPTIM_DEFAULTS)
    if o["kind"] not in ("adam", "sgd"):
        die(f"optim.kind = {o['kind']!r}: expected adam or sgd")
    for key in ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum", "clip_grad_norm",
                "second_moment_init"):
        o[key] = _float(o[key], f"optim.{key}")
    o["warmup_steps"] = _int(o["warmup_steps"], "optim.warmup_steps", 0)
    if o["lr"] <= 0:
        die(f"optim.lr = {o['lr']}: must be a positive number")
    if not (0 <= o["beta1"] < 1 and 0 <= o["beta2"] < 1):
        die("optim.beta1 and optim.beta2 must lie in [0, 1)")
    if o["eps"] <= 0 or o["weight_decay"] < 0 or not 0 <= o["momentum"] < 1:
        die("optim.eps must be > 0, optim.weight_decay >= 0, optim.momentum in [0, 1)")
    if o["clip_grad_norm"] < 0:
        die(f"optim.clip_grad_norm = {o['clip_grad_norm']}: must be >= 0 (0: off)")
    if o["second_moment_init"] < 0:
        die(f"optim.second_moment_init = {o['second_moment_init']}: must be >= 0")
    if o["second_moment_init"] != 0 and o["kind"] != "adam":
        die('optim.second_moment_init is Adam\'s: optim.kind is not "adam"')
    for key in ("d_lr", "g_lr"):
        if o[key] is not None:
            o[key] = _float(o[key], f"optim.{key}")
            if o[key] <= 0:
                die(f"optim.{key} = {o[key]}: must be a positive number")
    for key in ("d_betas", "g_betas"):
        if o[key] is not None:
            b = o[key]
            if not (isinstance(b, list) and len(b) == 2):
                die(f"optim.{key} = {b!r}: expected [beta1, beta2]")
            o[key] = [_float(v, f"optim.{key}") for v in b]
            if not all(0 <= v < 1 for v in o[key]):
                die(f"optim.{key} = {o[key]}: each must lie in [0, 1)")

    d = _section(raw, "data", DATA_DEFAULTS)
    if d["dataset"] not in SYNTHETIC + ("mnist", "idx"):
        die(f"data.dataset = {d['dataset']!r}: expected mnist, idx or one of "
            f"{', '.join(SYNTHETIC)}")
    if d["binarize"] not in BINARIZE:
        die(f"data.binarize = {d['binarize']!r}: expected one of {', '.join(BINARIZE)}")
    if d["dataset"] not in SYNTHETIC and d["binarize"] != "none":
        die('the GAN learns gray-level images: set data.binarize = "none"')
    if d["dataset"] in SYNTHETIC and classes > 0:
        die("model.classes: the synthetic 2-D sets have no labels to condition on")
    for key in ("validation", "limit_train", "synthetic_size"):
        d[key] = _int(d[key], f"data.{key}", 0)
    t = _section(raw, "train", TRAIN_DEFAULTS)
    t["batch_size"] = _int(t["batch_size"], "train.batch_size", 1)
    t["seed"] = _int(t["seed"], "train.seed", 0)
    return {"gan": g, "classes": classes, "optim": o, "data": d, "train": t}


def load_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        die(f"{path}: no such config file")
    try:
        with p.open("rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        die(f"{path}: {e}")
    return resolve_config(raw)


def effective_penalty(g: dict) -> str:
    """`wgan_gp` implies the gradient penalty (GanConfig::effective_penalty)."""
    return "gp" if g["loss"] == "wgan_gp" else g["penalty"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def synthetic_points(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points of a synthetic 2-D set (src/data/synthetic.rs), float32 (n, 2)."""
    if name in ("ring8", "grid25"):
        if name == "ring8":
            a = np.arange(8) * (math.pi / 4.0)
            modes, std = np.stack([2.0 * np.cos(a), 2.0 * np.sin(a)], 1), 0.02
        else:
            i = np.arange(25)
            modes, std = np.stack([(i // 5 - 2) * 2.0, (i % 5 - 2) * 2.0], 1), 0.05
        m = modes[rng.integers(0, len(modes), n)]
        return (m + std * rng.standard_normal((n, 2))).astype(np.float32)
    if name == "moons":
        t = rng.uniform(0.0, math.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        pts = np.stack([x, y], 1) + 0.1 * rng.standard_normal((n, 2))
        return pts.astype(np.float32)
    if name == "checkerboard":  # FFJORD's construction, scaled by 2
        x1 = rng.uniform(-2.0, 2.0, n)
        x2 = rng.random(n) - 2.0 * rng.integers(0, 2, n) + np.mod(np.floor(x1), 2.0)
        return (2.0 * np.stack([x1, x2], 1)).astype(np.float32)
    raise ValueError(name)


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped) as a uint8 ndarray."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"{path}: {e}")
    if len(data) < 4:
        die(f"{path}: not an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        die(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        die(f"{path}: expected {int(np.prod(dims))} bytes of data, found {body.size}")
    return body.reshape(dims)


def find_idx(data_dir: Path, stem: str, required: bool = True) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    if required:
        die(f"{data_dir}: no {stem}[.gz] in this directory")
    return None


def resolve_data_dir(spec: str | None, cfg: dict) -> Path:
    """--data-dir, else data.dir (relative paths from the working directory, as gentrain
    reads them, else from the repository root)."""
    p = Path(spec or cfg["data"]["dir"])
    if p.is_absolute() or p.is_dir():
        return p
    return REPO_ROOT / p


class Rows:
    """The training rows and how a minibatch is made of them (DataSource::batch)."""

    def __init__(self, cfg: dict, data_dir: Path, device: torch.device):
        d, seed = cfg["data"], cfg["train"]["seed"]
        self.device = device
        self.classes = cfg["classes"]
        self.mode = "real"
        self.labels = None
        if d["dataset"] in SYNTHETIC:
            if self.classes:
                die("a conditional model needs labels, this data set has none")
            n = max(1, d["synthetic_size"])
            pts = synthetic_points(d["dataset"], n, np.random.default_rng(seed))
            self.values = torch.from_numpy(pts).to(device)
            self.shape = (1, 2)
            return
        images = read_idx(find_idx(data_dir, "train-images-idx3-ubyte"))
        if images.ndim != 3:
            die(f"{data_dir}: expected 3 dimensions (n, rows, cols), found {images.shape}")
        n, rows, cols = images.shape
        pixels = images.reshape(n, rows * cols)
        label_path = find_idx(data_dir, "train-labels-idx1-ubyte", required=False)
        labels = read_idx(label_path) if label_path is not None else None
        if d["validation"] > 0:
            if d["validation"] >= n:
                die(f"validation size {d['validation']} leaves no training images "
                    f"(the set has {n})")
            n -= d["validation"]
            pixels = pixels[:n]
            labels = labels[:n] if labels is not None else None
        if 0 < d["limit_train"] < n:
            n = d["limit_train"]
            pixels = pixels[:n]
            labels = labels[:n] if labels is not None else None
        if self.classes:
            if labels is None:
                die("a conditional model needs labels, this data set has none")
            if int(labels.max()) >= self.classes:
                die(f"label {int(labels.max())} is out of range for model.classes = "
                    f"{self.classes}")
            self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.shape = (rows, cols)
        # binarize = "none" (resolve_config refuses the rest): bytes, scaled per batch as
        # gentrain's DataSource does.
        self.mode = "scaled"
        self.values = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(device)

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x (B, dim) float32, one-hot y (B, C) or None)."""
        v = self.values.index_select(0, idx)
        x = v if self.mode == "real" else v.to(torch.float32) * (1.0 / 255.0)
        if self.labels is None:
            return x, None
        y = F.one_hot(self.labels.index_select(0, idx), self.classes).to(torch.float32)
        return x, y


# --------------------------------------------------------------------------------------------
# Players (the module tree of docs/checkpoints.md, section "GAN")
# --------------------------------------------------------------------------------------------


def dcgan_image(dim: int, image: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of one-channel images whose sides are multiples of 4, else dies (as gentrain)."""
    if image is not None and image[0] % 4 == 0 and image[1] % 4 == 0 \
            and image[0] * image[1] == dim:
        return image
    if image is not None and image[0] * image[1] == dim:
        got = f"{image[0]}x{image[1]} images"
    elif image is not None:
        got = f"{image[0]}x{image[1]} images stored as {dim} values per row"
    else:
        got = f"rows of {dim} values that are not images"
    die('model.gan.architecture = "dcgan" needs one-channel images whose height and width are '
        f'multiples of 4; this data has {got} (use model.gan.architecture = "mlp")')


class Generator(nn.Module):
    """G([z, y]) -> rows of `dim` values (sigmoid outputs for images)."""

    def __init__(self, g: dict, g_in: int, dim: int, image: tuple[int, int] | None):
        super().__init__()
        layers: list[nn.Module] = []
        if g["architecture"] == "mlp":
            d = g_in
            for h in g["gen_hidden"]:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            layers.append(nn.Linear(d, dim))
            if image is not None:
                layers.append(nn.Sigmoid())
        else:
            h, w = dcgan_image(dim, image)
            c1, c2 = g["conv_channels"]
            layers = [nn.Linear(g_in, c2 * (h // 4) * (w // 4)), nn.ReLU(),
                      nn.Unflatten(1, (c2, h // 4, w // 4)),
                      nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
                      nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1), nn.Sigmoid(),
                      nn.Flatten(1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """D(x) or, with classes, the projection discriminator D(x, y); returns (B,) logits."""

    def __init__(self, g: dict, dim: int, image: tuple[int, int] | None, classes: int):
        super().__init__()
        if g["spectral_norm"]:
            def sn(m):
                return torch_spectral_norm(m, n_power_iterations=g["sn_iterations"])
        else:
            def sn(m):
                return m
        self.image = None
        if g["architecture"] == "mlp":
            layers: list[nn.Module] = []
            d = dim
            for h in g["disc_hidden"]:
                layers += [sn(nn.Linear(d, h)), nn.LeakyReLU(0.2)]
                d = h
            layers.append(sn(nn.Linear(d, 1)))
            features = d
        else:
            h, w = dcgan_image(dim, image)
            self.image = (h, w)
            c1, c2 = g["conv_channels"]
            features = c2 * (h // 4) * (w // 4)
            layers = [sn(nn.Conv2d(1, c1, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
                      sn(nn.Conv2d(c1, c2, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
                      nn.Flatten(1), sn(nn.Linear(features, 1))]
        self.net = nn.Sequential(*layers)
        # A tuple, so that the layers are not registered a second time under another name.
        self._layers = tuple(layers)
        if classes > 0:
            self.embed = nn.Embedding(classes, features)
            bound = 1.0 / math.sqrt(features)
            with torch.no_grad():
                self.embed.weight.uniform_(-bound, bound)
        else:
            self.embed = None

    def forward(self, x, y=None):
        h = x if self.image is None else x.reshape(x.shape[0], 1, *self.image)
        for layer in self._layers[:-1]:
            h = layer(h)
        d = self._layers[-1](h).squeeze(-1)
        if y is not None and self.embed is not None:
            d = d + ((y @ self.embed.weight) * h).sum(-1)
        return d


class Gan(nn.Module):
    """The two players under the checkpoint's top-level names `gen` and `disc`."""

    def __init__(self, g: dict, dim: int, image: tuple[int, int] | None, classes: int):
        super().__init__()
        if dim <= 0:
            die("a GAN needs at least one value per row")
        self.gen = Generator(g, g["latent"] + classes, dim, image)
        self.disc = Discriminator(g, dim, image, classes)


def parameter_count(module: nn.Module) -> int:
    """Trainable values (buffers such as the spectral-norm vectors excluded), as gentrain's
    `numel` counts them."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Objectives (src/objectives/gan.rs)
# --------------------------------------------------------------------------------------------


def discriminator_loss(gan: Gan, g: dict, x, y, fake, t):
    """(loss, d_real mean, d_fake mean, penalty before its weight or None). The first forward
    (on the real rows) runs in training mode: torch's spectral-norm hook takes its power
    iteration there, once per discriminator update; the others use the stored vectors."""
    disc = gan.disc
    disc.train()
    d_real = disc(x, y)
    disc.eval()
    d_fake = disc(fake, y)
    loss_kind = g["loss"]
    if loss_kind in ("non_saturating", "minimax"):
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    elif loss_kind == "hinge":
        loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    else:  # wgan_gp
        loss = d_fake.mean() - d_real.mean()
    penalty = effective_penalty(g)
    pen = None
    if penalty == "gp":
        x_hat = (x * t + fake * (1.0 - t)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(disc(x_hat, y).sum(), x_hat, create_graph=True)
        norm = (grad.pow(2).sum(-1) + 1e-12).sqrt()
        pen = (norm - 1.0).pow(2).mean()
        loss = loss + g["gp_weight"] * pen
    elif penalty == "r1":
        x_r = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(disc(x_r, y).sum(), x_r, create_graph=True)
        pen = grad.pow(2).sum(-1).mean()
        loss = loss + (g["r1_gamma"] / 2.0) * pen
    return loss, d_real.detach().mean(), d_fake.detach().mean(), pen


def generator_loss(gan: Gan, g: dict, fake, y):
    d = gan.disc(fake, y)
    if g["loss"] == "non_saturating":
        return F.softplus(-d).mean()
    if g["loss"] == "minimax":
        return -F.softplus(d).mean()
    return -d.mean()  # hinge, wgan_gp


# --------------------------------------------------------------------------------------------
# Optimizers (src/optim.rs, src/config/optim.rs)
# --------------------------------------------------------------------------------------------


def player_settings(o: dict, player: str) -> tuple[float, float, float]:
    """(lr, beta1, beta2) of `player` ("gen" or "disc"): d_lr / g_lr, d_betas / g_betas."""
    lr = o["g_lr"] if player == "gen" else o["d_lr"]
    betas = o["g_betas"] if player == "gen" else o["d_betas"]
    b1, b2 = betas if betas is not None else (o["beta1"], o["beta2"])
    return (o["lr"] if lr is None else lr), b1, b2


def make_optimizer(o: dict, params: list[nn.Parameter], player: str):
    lr, b1, b2 = player_settings(o, player)
    if o["kind"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o["momentum"],
                               weight_decay=o["weight_decay"])
    opt = torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=o["eps"],
                           weight_decay=o["weight_decay"])
    if o["second_moment_init"] != 0.0:  # v_0 of the IWAE code's Adam (0: torch's)
        for p in params:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.full_like(p, o["second_moment_init"])}
    return opt


def grads_finite(params: list[nn.Parameter]) -> bool:
    gs = [p.grad for p in params if p.grad is not None]
    if not gs:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in gs]).all().item())


def apply_update(opt, params, o: dict, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    if o["clip_grad_norm"] > 0.0:
        torch.nn.utils.clip_grad_norm_(params, o["clip_grad_norm"])
    opt.step()


# --------------------------------------------------------------------------------------------
# The training step (src/train/gan.rs) and its benchmark (src/bench.rs)
# --------------------------------------------------------------------------------------------


class Trainer:
    """Both players, both optimizers and gentrain's step."""

    def __init__(self, cfg: dict, rows: Rows, device: torch.device):
        self.cfg, self.g, self.o = cfg, cfg["gan"], cfg["optim"]
        self.device = device
        self.classes = cfg["classes"]
        image = rows.shape if rows.shape[0] > 1 else None
        self.gan = Gan(self.g, rows.dim, image, self.classes).to(device)
        self.gen_params = list(self.gan.gen.parameters())
        self.disc_params = list(self.gan.disc.parameters())
        self.gen_opt = make_optimizer(self.o, self.gen_params, "gen")
        self.disc_opt = make_optimizer(self.o, self.disc_params, "disc")
        self.gen_fn = self.gan.gen
        self.last_g_loss = None

    def compile(self, mode: str | None) -> None:
        kw = {"mode": mode} if mode else {}
        self.gen_fn = torch.compile(self.gan.gen, **kw)

    def lr(self, player: str, step: int) -> float:
        lr = player_settings(self.o, player)[0]
        w = self.o["warmup_steps"]
        return lr if w == 0 else lr * min(1.0, (step + 1) / w)

    def generate(self, z, y):
        return self.gen_fn(z if y is None else torch.cat([z, y], 1))

    def step(self, s: int, x, y) -> tuple[float, bool]:
        """One discriminator update and, every n_critic-th step, one generator update; returns
        (d_loss read on the host, whether the updates were applied)."""
        b, dev, g = x.shape[0], self.device, self.g
        z = torch.randn(b, g["latent"], device=dev)
        t = torch.rand(b, 1, device=dev)
        with torch.no_grad():
            fake = self.generate(z, y)
        loss, _d_real, _d_fake, _pen = discriminator_loss(self.gan, g, x, y, fake, t)
        value = loss.item()
        if not math.isfinite(value):  # one process: no backward pass for a non-finite loss
            return value, False
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        applied = grads_finite(self.disc_params)
        if applied:
            apply_update(self.disc_opt, self.disc_params, self.o, self.lr("disc", s))
        if applied and (s + 1) % g["n_critic"] == 0:
            applied = self.generator_update(s, b, y)
        return value, applied

    def generator_update(self, s: int, b: int, y) -> bool:
        z = torch.randn(b, self.g["latent"], device=self.device)
        for p in self.disc_params:
            p.requires_grad_(False)
        try:
            g_loss = generator_loss(self.gan, self.g, self.generate(z, y), y)
            self.gen_opt.zero_grad(set_to_none=True)
            g_loss.backward()
        finally:
            for p in self.disc_params:
                p.requires_grad_(True)
        value = g_loss.item()
        self.last_g_loss = value
        applied = math.isfinite(value) and grads_finite(self.gen_params)
        if applied:
            apply_update(self.gen_opt, self.gen_params, self.o, self.lr("gen", s))
        return applied


def set_threads(threads: int) -> int:
    """torch's intra-op threads (0: every core this process may use, as gentrain's 0)."""
    if threads < 0:
        die(f"--threads {threads}: expected 0 (all cores) or more")
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return n


def cmd_bench(args) -> None:
    cfg = load_config(args.config)
    if args.steps < 1:
        die("--steps must be at least 1")
    if args.warmup < 0:
        die("--warmup must be at least 0")
    if args.seed is not None:
        cfg["train"]["seed"] = args.seed
    threads = set_threads(args.threads)
    device = resolve_device(args.device or cfg["train"]["device"],
                            tf32=bool(cfg["train"]["tf32"]) and not args.no_tf32)
    cuda = device.type == "cuda"
    seed = cfg["train"]["seed"]
    torch.manual_seed(seed)
    rows = Rows(cfg, resolve_data_dir(args.data_dir, cfg), device)
    trainer = Trainer(cfg, rows, device)
    n = len(rows)
    bs = min(args.batch_size or cfg["train"]["batch_size"], n)
    per_epoch = max(1, n // bs)
    g = cfg["gan"]
    mode = "compile" if args.compile else "eager"
    rec = {"framework": "pytorch", "family": "gan", "mode": mode, "device": str(device),
           "threads": threads, "torch_version": torch.__version__, "config": args.config,
           "dataset": cfg["data"]["dataset"], "batch": bs, "steps": args.steps,
           "warmup": args.warmup, "loss": g["loss"], "penalty": effective_penalty(g),
           "spectral_norm": g["spectral_norm"], "sn_iterations": g["sn_iterations"],
           "n_critic": g["n_critic"], "architecture": g["architecture"],
           "classes": cfg["classes"], "parameters": parameter_count(trainer.gan),
           "gen_parameters": parameter_count(trainer.gan.gen),
           "disc_parameters": parameter_count(trainer.gan.disc)}
    try:
        if args.compile:
            trainer.compile(args.compile_mode)

        def new_perm():
            return torch.randperm(n, device=device)

        perm = new_perm()
        t0, c0 = time.perf_counter(), time.process_time()
        skipped = g_updates = 0
        d_loss = float("nan")
        for s in range(args.warmup + args.steps):
            if s == args.warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
            within = s % per_epoch
            if within == 0 and s > 0:
                perm = new_perm()
            x, y = rows.batch(perm[within * bs:(within + 1) * bs])
            d_loss, applied = trainer.step(s, x, y)
            if s >= args.warmup:
                skipped += not applied
                g_updates += applied and (s + 1) % g["n_critic"] == 0
        if cuda:
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t0
        cpu_secs = time.process_time() - c0
    except Exception as e:  # torch.compile may be unavailable (no C++ compiler, ...)
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"pytorch {mode:8s} FAILED: {rec['error']}", flush=True)
        sys.exit(1)
    rec.update(samples_per_s=args.steps * bs / secs, ms_per_step=secs * 1e3 / args.steps,
               seconds=secs, cpu_ms_per_step=cpu_secs * 1e3 / args.steps,
               generator_updates=int(g_updates), skipped_steps=int(skipped),
               final_d_loss=d_loss, final_g_loss=trainer.last_g_loss)
    if args.json:
        print(json.dumps(rec), flush=True)
    else:
        where = f"{device}" if cuda else f"{threads} thread(s)"
        print(f"pytorch {mode:8s} {rec['samples_per_s']:10.0f} samples/s  "
              f"{rec['ms_per_step']:8.3f} ms/step  (batch {bs}, {where}, {args.steps} steps "
              f"= discriminator updates, {g_updates} generator updates, "
              f"{rec['parameters']} parameters, torch {torch.__version__})", flush=True)


# --------------------------------------------------------------------------------------------
# check-checkpoint
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A run dir (the name in `latest`), a ckpt-* dir or a model.safetensors file."""
    try:
        return gentrain_files.resolve_checkpoint(path)
    except ValueError as e:
        die(str(e))


def cmd_check_checkpoint(args) -> None:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ModuleNotFoundError as e:
        die(f"safetensors is not installed ({e}): pip install safetensors")
    path = resolve_checkpoint(Path(args.checkpoint))
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # not a safetensors file
        die(f"{path}: {type(e).__name__}: {e}")
    if meta.get("model_family") != "gan":
        die(f"{path}: model_family {meta.get('model_family')!r} is not 'gan'")
    try:
        cfg = resolve_config(json.loads(meta["config"]))
        dim = int(meta["input_dim"])
        rows, cols = (int(v) for v in meta.get("image_shape", "1,2").split(","))
    except (KeyError, ValueError) as e:
        die(f"{path}: bad metadata ({type(e).__name__}: {e})")
    image = (rows, cols) if rows > 1 else None
    torch.manual_seed(0)
    gan = Gan(cfg["gan"], dim, image, cfg["classes"])
    result = {"checkpoint": str(path), "step": meta.get("step")}
    for name in ("gen", "disc"):
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(gan, name).load_state_dict(part, strict=True)
        except RuntimeError as e:
            die(f"{path}: the {name} tensors do not match this script's module tree: {e}")
        result[f"{name}_tensors"] = len(part)
        result[f"{name}_parameters"] = parameter_count(getattr(gan, name))
    rest = sorted(k for k in state if not k.startswith(("gen.", "disc.")))
    if rest:
        die(f"{path}: tensors outside gen.* and disc.*: {', '.join(rest[:5])}")
    gan.load_state_dict(state, strict=True)  # the whole tree, by name
    result["parameters"] = parameter_count(gan)
    result["tensors"] = len(state)
    # A forward pass of each player on a few rows (values not compared with gentrain's).
    with torch.no_grad():
        gan.eval()
        c = cfg["classes"]
        y = F.one_hot(torch.arange(4) % c, c).float() if c else None
        z = torch.randn(4, cfg["gan"]["latent"])
        fake = gan.gen(z if y is None else torch.cat([z, y], 1))
        d = gan.disc(fake, y)
    result["finite_forward"] = bool(torch.isfinite(fake).all() and torch.isfinite(d).all())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{path}: loaded strictly, {result['tensors']} tensors, {result['parameters']} "
              f"parameters (gen {result['gen_parameters']}, disc {result['disc_parameters']}), "
              f"forward finite: {result['finite_forward']}")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("bench", help="training-step throughput of a GAN config (samples/s)")
    p.add_argument("--config", required=True, help="TOML config with model.family = \"gan\"")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0, the default: every core, as gentrain)")
    p.add_argument("--steps", type=int, default=300,
                   help="timed steps, each one discriminator update (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=None,
                   help="minibatch rows (default: train.batch_size)")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--data-dir", default=None, help="IDX directory (default: data.dir)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: train.device of the config, else cpu)")
    p.add_argument("--no-tf32", action="store_true", help="CUDA: TF32 matmuls off")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator (the discriminator stays eager: its "
                        "spectral-norm hooks and the penalties' double backward); use a "
                        "--warmup of at least n_critic")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check-checkpoint",
                       help="load a gentrain GAN checkpoint strictly into this script's modules")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (uses `latest`), ckpt-* dir or model.safetensors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_checkpoint)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
