#!/usr/bin/env python3
"""Independent PyTorch reference implementation of gentrain's VAE / IWAE.

This script is the cross-check for the Rust trainer: it trains the same models, evaluates
gentrain checkpoints, and measures PyTorch's training throughput on the same machine.
The module tree, tensor names and math conventions are those of ``docs/checkpoints.md``;
``build(meta)`` below is copied from that document verbatim, so a model trained here and a
model written by gentrain load the same way.

Model (L >= 1 stochastic layers, z_0 = x, top prior p(z_L) = N(0, I)):

    q(z_1..z_L | x) = prod_l q(z_l | z_{l-1}),   q(z_l | z_{l-1}) = N(mu, diag(exp(logvar)))
    p(x, z_1..z_L)  = p(x | z_1) * prod_{l>=2} p(z_{l-1} | z_l) * p(z_L)

Reparameterised samples ``z = mu + exp(logvar / 2) * eps``, eps ~ N(0, I).

Log densities (sums over dimensions d):

    log N(z; mu, logvar)      = sum_d -0.5 * (ln 2 pi + logvar_d + (z_d - mu_d)^2 exp(-logvar_d))
    Bernoulli log p(x | z)    = sum_d x_d * l_d - softplus(l_d)           (l = decoder logits)
    Gaussian  log p(x | z)    = log N(x; mu(z), logvar(z))

Log importance weight of one joint sample z ~ q(z | x):

    log w = log p(x | z_1) + sum_{l>=2} log p(z_{l-1} | z_l) + log p(z_L) - sum_l log q(z_l | z_{l-1})

Objectives (per data point, k samples z^(1..k) ~ q):

    ELBO_k (kind "elbo") = 1/k sum_i log w_i
        for L = 1 with objective.kl = "analytic" (the default) the KL term is closed-form:
        1/k sum_i log p(x | z_1^(i)) - KL(q(z_1|x) || N(0,I)),
        KL = -0.5 * sum_d (1 + logvar_d - mu_d^2 - exp(logvar_d))
    IWAE_k (kind "iwae") = log (1/k sum_i w_i) = logsumexp_i(log w_i) - log k   (max-shifted)

Evaluation: the importance-sampled estimate of the marginal likelihood (Burda et al. 2016)

    log p(x) ~= logsumexp_{i=1..k}(log w_i) - log k,    NLL = -log p(x)  (nats, positive)

computed in chunks of samples with a running logsumexp so memory is bounded for any k.

Data: MNIST IDX files; dynamic binarization x ~ Bernoulli(pixel / 255) for every minibatch,
the test set binarized once with a fixed seed (numpy PCG64, seed ``TEST_BINARIZE_SEED``).
Gaussian decoders train on pixel / 255 without binarization.

Subcommands: ``train``, ``bench``, ``eval``, ``binarize`` (write a once-binarized IDX3 file, so
gentrain and PyTorch can be evaluated on exactly the same data). Run ``--help`` on each.

Devices: ``train``, ``bench`` and ``eval`` take ``--device cpu|cuda|cuda:N`` (default cpu; the CPU
path is exactly what it was before CUDA support, so CPU results reproduce). On CUDA the whole
training set lives on the GPU as uint8, the minibatch permutation, the dynamic binarization and
all noise are drawn on the GPU, nothing in the step loop waits for the host (the loss is
accumulated on the device; ``bench`` synchronizes only around the timed loop), and TF32 matmuls
are enabled (``torch.backends.cuda.matmul.allow_tf32``) unless ``--no-tf32``. Without a usable
GPU a CUDA device is refused with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import struct
import sys
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11 (the GPU machine's PyTorch Python may be older)
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
try:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ModuleNotFoundError as _missing_safetensors:  # only checkpoints need it, `bench` does not
    def _no_safetensors(*_args, **_kwargs):
        raise SystemExit(f"safetensors is not installed ({_missing_safetensors}): "
                         "pip install safetensors")
    safe_open = load_file = save_file = _no_safetensors

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "vae-examples.toml"
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "mnist"
TEST_BINARIZE_SEED = 12345
LN_2PI = math.log(2.0 * math.pi)

# The reference recipe (784-400-20 ReLU, Bernoulli decoder, ELBO, batch 128, Adam 1e-3,
# 10 epochs); used to fill keys a config leaves out, and as the model when no config exists.
DEFAULTS = {
    "model": {
        "activation": "relu",
        "decoder": "bernoulli",
        "classes": 0,
        "layers": [{"hidden": [400], "latent": 20}],
    },
    "objective": {"kind": "elbo", "k": 1},
    "train": {"batch_size": 128, "epochs": 10, "seed": 0},
    "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def device_info(device: torch.device) -> dict:
    """Fields recorded in results run on CUDA (empty on CPU, so CPU records stay as they were)."""
    if not is_cuda(device):
        return {}
    return {"gpu": torch.cuda.get_device_name(device), "cuda_version": torch.version.cuda,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def gather_batch(train: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of the training set as float pixel / 255 in [0, 1].

    On CPU the set is stored as float32 already (the original path); on CUDA it is the uint8
    set on the device, gathered with index_select (no host sync) and converted there.
    """
    if train.dtype == torch.uint8:
        return torch.index_select(train, 0, idx).to(torch.float32).div_(255.0)
    return train[idx]


def train_tensor(pixels: np.ndarray, decoder: str, device: torch.device) -> torch.Tensor:
    """The training set: float32 pixel / 255 on CPU; uint8 on the device for CUDA."""
    if is_cuda(device):
        return torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(device)
    return to_model_input(pixels, decoder)


# --------------------------------------------------------------------------------------------
# Module tree: verbatim from docs/checkpoints.md
# --------------------------------------------------------------------------------------------

ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def mlp(d_in, hidden, act):
    layers = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), ACT[act]()]
        d_in = h
    return nn.Sequential(*layers), d_in


class GaussianHead(nn.Module):
    def __init__(self, d_in, hidden, d_out, act, scale="logvar"):
        super().__init__()
        self.net, d = mlp(d_in, hidden, act)
        self.mu, self.scale = nn.Linear(d, d_out), scale
        # model.gaussian_head: a "logvar" head, or a "log_sigma" head with logvar = 2 log_sigma
        setattr(self, scale, nn.Linear(d, d_out))

    def forward(self, x):
        """Returns (mu, logvar) of a diagonal Gaussian."""
        h = self.net(x)
        raw = getattr(self, self.scale)(h)
        return self.mu(h), (raw if self.scale == "logvar" else 2.0 * raw)


class BernoulliHead(nn.Module):
    def __init__(self, d_in, hidden, d_out, act):
        super().__init__()
        self.net, d = mlp(d_in, hidden, act)
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        """Returns the Bernoulli logits."""
        return self.out(self.net(x))


def build(meta):
    cfg = json.loads(meta["config"]); m = cfg["model"]; D = int(meta["input_dim"])
    C = int(m.get("classes", 0)); act = m["activation"]; s = m.get("gaussian_head", "logvar")
    dims = [D] + [l["latent"] for l in m["layers"]]
    enc = nn.ModuleList(); dec = nn.ModuleList()
    for l, layer in enumerate(m["layers"]):
        extra = C if l == 0 else 0
        enc.append(GaussianHead(dims[l] + extra, layer["hidden"], dims[l + 1], act, s))
        rev = list(reversed(layer["hidden"]))
        if l == 0 and m["decoder"] == "bernoulli":
            dec.append(BernoulliHead(dims[1] + extra, rev, D, act))
        elif l == 0:
            dec.append(GaussianHead(dims[1] + extra, rev, D, act, s))
        else:
            dec.append(GaussianHead(dims[l + 1], rev, dims[l], act, s))
    model = nn.Module(); model.encoders = enc; model.decoders = dec
    return model


# --------------------------------------------------------------------------------------------
# Config and metadata
# --------------------------------------------------------------------------------------------


def resolve_config(raw: dict) -> dict:
    """Fills the keys a config leaves out with DEFAULTS and validates the VAE part."""
    cfg = json.loads(json.dumps(raw))  # deep copy of plain data
    for section, defaults in DEFAULTS.items():
        sec = cfg.setdefault(section, {})
        for key, value in defaults.items():
            sec.setdefault(key, json.loads(json.dumps(value)))
    m = cfg["model"]
    if m["activation"] not in ACT:
        raise SystemExit(f"unknown activation {m['activation']!r} (relu|tanh|softplus)")
    if m["decoder"] not in ("bernoulli", "gaussian"):
        raise SystemExit(f"unknown decoder {m['decoder']!r} (bernoulli|gaussian)")
    if not m["layers"]:
        raise SystemExit("[[model.layers]] must list at least one stochastic layer")
    for layer in m["layers"]:
        layer["hidden"] = [int(h) for h in layer.get("hidden", [])]
        layer["latent"] = int(layer["latent"])
    if cfg["objective"]["kind"] not in ("elbo", "iwae"):
        raise SystemExit(f"unknown objective {cfg['objective']['kind']!r} (elbo|iwae)")
    cfg["objective"]["k"] = int(cfg["objective"]["k"])
    o = cfg["objective"]
    if o.get("kl", "analytic") not in ("analytic", "monte_carlo"):
        raise SystemExit(f"unknown objective.kl {o['kl']!r} (analytic|monte_carlo)")
    if (float(o.get("beta", 1.0)) != 1.0 or float(o.get("warmup_epochs", 0.0)) != 0.0
            or float(o.get("free_bits", 0.0)) != 0.0):
        raise SystemExit("objective.beta / warmup_epochs / free_bits are not implemented in "
                         "torch_vae.py (plain ELBO / IWAE only)")
    return cfg


def data_dir_of(args, cfg: dict) -> Path:
    """--data-dir, else [data] dir of the config (relative to the repo root), else data/mnist."""
    if args.data_dir:
        return Path(args.data_dir)
    d = cfg.get("data", {}).get("dir")
    return (REPO_ROOT / d) if d else DEFAULT_DATA_DIR


def load_config(path: str | None) -> tuple[dict, Path | None]:
    """Reads a TOML config; without a path, configs/vae-examples.toml or the reference recipe."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return resolve_config({}), None
        path = str(DEFAULT_CONFIG)
    p = Path(path)
    with p.open("rb") as f:
        return resolve_config(tomllib.load(f)), p


def make_meta(cfg: dict, *, input_dim=784, image_shape=(28, 28), num_classes=10, step=0,
              epoch=0, seed=0) -> dict:
    """The `__metadata__` of model.safetensors (docs/checkpoints.md); all values are strings."""
    return {
        "format": "pt",
        "gentrain_format_version": "1",
        "model_family": "vae",
        "input_dim": str(input_dim),
        "image_shape": f"{image_shape[0]},{image_shape[1]}",
        "num_classes": str(num_classes),
        "config": json.dumps(cfg, sort_keys=True),
        "step": str(step),
        "epoch": str(epoch),
        "rng_state": json.dumps({"seed": seed, "writer": "scripts/torch_vae.py",
                                 "note": "torch global RNG; counters not tracked"}),
        "gentrain_version": "torch_vae.py",
    }


# --------------------------------------------------------------------------------------------
# Data: IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes; returns an ndarray of uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SystemExit(f"{path}: expected {int(np.prod(dims))} bytes of data, found {body.size}")
    return body.reshape(dims)


def write_idx3(path: str | Path, images: np.ndarray) -> None:
    """Writes an (n, rows, cols) uint8 array as IDX3 (magic 0x00000803), gzipped if *.gz."""
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    header = struct.pack(">IIII", 0x00000803, *images.shape)
    opener = (lambda p: gzip.GzipFile(p, "wb", mtime=0)) if path.suffix == ".gz" else (
        lambda p: open(p, "wb"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path) as f:
        f.write(header)
        f.write(images.tobytes())


def load_images(data_dir: Path, split: str) -> np.ndarray:
    """MNIST images of a split ('train' or 't10k') as (n, 784) uint8."""
    for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte"):
        if (data_dir / name).exists():
            x = read_idx(data_dir / name)
            return x.reshape(x.shape[0], -1)
    raise SystemExit(f"no {split}-images-idx3-ubyte(.gz) in {data_dir}")


def binarize_once(pixels: np.ndarray, seed: int) -> np.ndarray:
    """x ~ Bernoulli(pixel / 255) drawn once with numpy's PCG64(seed); returns uint8 0/1."""
    u = np.random.default_rng(seed).random(pixels.shape, dtype=np.float32)
    return (u < pixels.astype(np.float32) / 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LN_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_std_normal(z):
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (LN_2PI + z.pow(2)).sum(-1)


def log_px_given_z1(model, decoder: str, x, z1):
    """log p(x | z_1): Bernoulli (sum x*l - softplus(l)) or diagonal Gaussian."""
    if decoder == "bernoulli":
        logits = model.decoders[0](z1)
        return (x * logits - F.softplus(logits)).sum(-1)
    mu, logvar = model.decoders[0](z1)
    return log_normal(x, mu, logvar)


def sample(mu, logvar, k: int):
    """k reparameterised samples mu + exp(logvar/2) * eps; shape (k, *mu.shape)."""
    eps = torch.randn((k,) + tuple(mu.shape), dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def bound_terms(model, decoder: str, x, k: int, want_logw: bool = True,
                want_kl: bool = False):
    """Draws k joint samples z ~ q(z | x) for a batch x of shape (B, D).

    Returns (log_px, log_ratio, kl): log p(x | z_1) of shape (k, B); with ``want_logw`` the rest
    of the log weight, log p(z) - log q(z | x) over all layers, shape (k, B) (else None); with
    ``want_kl`` (L = 1 only) the analytic KL(q(z_1 | x) || N(0, I)), shape (B,) (else None).
    So log w = log_px + log_ratio, and the analytic-KL ELBO term is log_px - kl.
    """
    L = len(model.encoders)
    mu, logvar = model.encoders[0](x)
    z = sample(mu, logvar, k)  # (k, B, d_1)
    kl = None
    if want_kl:
        assert L == 1, "analytic KL is only used for one stochastic layer"
        kl = -0.5 * (1.0 + logvar - mu.pow(2) - torch.exp(logvar)).sum(-1)
    log_px = log_px_given_z1(model, decoder, x, z)
    if not want_logw:
        return log_px, None, kl
    log_q = log_normal(z, mu, logvar)
    zs = [z]
    for l in range(1, L):  # z_{l+1} ~ q(z_{l+1} | z_l)
        mu, logvar = model.encoders[l](zs[-1])
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        log_q = log_q + log_normal(z, mu, logvar)
        zs.append(z)
    log_p = log_std_normal(zs[-1])
    for l in range(1, L):  # p(z_l | z_{l+1}) is decoders[l] applied to z_{l+1}
        mu, logvar = model.decoders[l](zs[l])
        log_p = log_p + log_normal(zs[l - 1], mu, logvar)
    return log_px, log_p - log_q, kl


def objective(model, cfg: dict, x):
    """Per-example training objective (to maximise), shape (B,)."""
    kind, k = cfg["objective"]["kind"], cfg["objective"]["k"]
    decoder = cfg["model"]["decoder"]
    if kind == "iwae":
        log_px, log_ratio, _ = bound_terms(model, decoder, x, k)
        return torch.logsumexp(log_px + log_ratio, dim=0) - math.log(k)  # max-shifted
    analytic = cfg["objective"].get("kl", "analytic") == "analytic"
    if len(model.encoders) == 1 and analytic:  # analytic KL
        log_px, _, kl = bound_terms(model, decoder, x, k, want_logw=False, want_kl=True)
        return log_px.mean(0) - kl
    log_px, log_ratio, _ = bound_terms(model, decoder, x, k)
    return (log_px + log_ratio).mean(0)


def loss_fn(model, cfg: dict, x):
    return -objective(model, cfg, x).mean()


@torch.no_grad()
def estimate(model, decoder: str, X: torch.Tensor, k: int, batch: int = 100,
             max_floats: int = 1 << 24):
    """Per-image ELBO and importance-sampled log p(x) over k samples, in float64 numpy arrays.

    The k samples are drawn in chunks of ``s`` so that one chunk holds about ``max_floats``
    activations; log p(x) is accumulated with a running logsumexp. The ELBO is the mean over the
    same k samples (analytic KL for L = 1; Monte-Carlo log w for L >= 2).
    """
    L = len(model.encoders)
    widths = [X.shape[1]] + [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    s = max(1, min(k, max_floats // (batch * max(widths) * 2)))
    elbo, logpx = [], []
    for i in range(0, X.shape[0], batch):
        x = X[i:i + batch]
        run_lse = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        elbo_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        done = 0
        while done < k:
            n = min(s, k - done)
            log_px, log_ratio, kl = bound_terms(model, decoder, x, n, want_kl=L == 1)
            lw = (log_px + log_ratio).double()  # (n, B) log importance weights
            run_lse = torch.logaddexp(run_lse, torch.logsumexp(lw, 0))
            if L == 1:
                elbo_sum += (log_px.double() - kl.double()).sum(0)
            else:
                elbo_sum += lw.sum(0)
            done += n
        logpx.append(run_lse - math.log(k))
        elbo.append(elbo_sum / k)
    return torch.cat(elbo).cpu().numpy(), torch.cat(logpx).cpu().numpy()


def elbo_estimator(L: int, k: int) -> str:
    if L == 1:
        return f"analytic KL, reconstruction term averaged over {k} sample(s) of q"
    return f"Monte Carlo log w averaged over {k} sample(s) of q (L={L}, no analytic KL)"


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def to_model_input(pixels: np.ndarray, decoder: str) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def save_checkpoint(run_dir: Path, model, opt, cfg, step: int, epoch: int, seed: int,
                    config_path: Path | None) -> Path:
    """Writes RUN_DIR/ckpt-{step:08d}/{model,optim}.safetensors and RUN_DIR/latest."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}"
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata=make_meta(
        cfg, step=step, epoch=epoch, seed=seed))
    optim_t, names = {}, dict(model.named_parameters())
    pid = {id(p): n for n, p in names.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    optim_t[f"{pid[id(p)]}.{key}"] = st[key].detach().cpu().contiguous()
    save_file(optim_t, str(tmp / "optim.safetensors"), metadata={
        "optimizer": "adam", "step": str(step), "lr": str(opt.param_groups[0]["lr"]),
        "gentrain_format_version": "1"})
    final = run_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config_path is not None:
        shutil.copyfile(config_path, run_dir / "config.toml")
    (run_dir / "latest.tmp").write_text(name + "\n")
    os.replace(run_dir / "latest.tmp", run_dir / "latest")
    return final


def cmd_train(args) -> None:
    cfg, cfg_path = load_config(args.config)
    if args.epochs is not None:
        cfg["train"]["epochs"] = args.epochs
    if args.seed is not None:
        cfg["train"]["seed"] = args.seed
    if args.batch is not None:
        cfg["train"]["batch_size"] = args.batch
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, tf32=not args.no_tf32)
    cuda = is_cuda(device)
    seed = int(cfg["train"]["seed"])
    torch.manual_seed(seed)
    if int(cfg["model"].get("classes", 0)) > 0:
        raise SystemExit("conditional models are not implemented in torch_vae.py")
    decoder = cfg["model"]["decoder"]

    data_dir = data_dir_of(args, cfg)
    ev = cfg.get("eval", {})
    if args.eval_k is None:
        args.eval_k = int(ev.get("final_k", 1000))
    if args.eval_limit is None:
        args.eval_limit = int(ev.get("final_limit", 2000))
    train_raw = load_images(data_dir, "train")
    if args.train_limit:
        train_raw = train_raw[:args.train_limit]
    train_px = train_tensor(train_raw, decoder, device)  # float32 on CPU, uint8 on CUDA
    test_raw = load_images(data_dir, "t10k")
    test = (torch.from_numpy(binarize_once(test_raw, TEST_BINARIZE_SEED).astype(np.float32))
            if decoder == "bernoulli" else to_model_input(test_raw, decoder)).to(device)

    model = build(make_meta(cfg)).to(device)  # initialised on the CPU RNG on every device
    o = cfg["optim"]
    opt = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                           eps=o["eps"])
    bs, n = int(cfg["train"]["batch_size"]), train_px.shape[0]
    step, t0 = 0, time.perf_counter()
    history = []
    for epoch in range(1, int(cfg["train"]["epochs"]) + 1):
        perm = torch.randperm(n, device=device) if cuda else torch.randperm(n)
        te = time.perf_counter()
        # On CUDA the epoch loss is summed on the device: no host sync inside the epoch.
        total = torch.zeros((), dtype=torch.float64, device=device) if cuda else 0.0
        for i in range(0, n, bs):
            p = gather_batch(train_px, perm[i:i + bs])
            x = torch.bernoulli(p) if decoder == "bernoulli" else p
            loss = loss_fn(model, cfg, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if cuda:
                total += loss.detach().double() * x.shape[0]
            else:
                total += loss.item() * x.shape[0]
        total = float(total)  # on CUDA: the one sync of the epoch, before the clock is read
        dt = time.perf_counter() - te
        history.append({"epoch": epoch, "train_loss": total / n, "seconds": dt})
        print(f"epoch {epoch:3d}  train -{cfg['objective']['kind']} {total / n:9.3f} nats  "
              f"({dt:.1f}s, {n / dt:.0f} samples/s)", flush=True)
    train_s = time.perf_counter() - t0

    model.eval()
    L = len(model.encoders)
    torch.manual_seed(seed + 1)
    elbo_full, _ = estimate(model, decoder, test, k=1, batch=500)
    sub = test[:args.eval_limit] if args.eval_limit else test
    elbo_k, logpx = estimate(model, decoder, sub, k=args.eval_k, batch=args.eval_batch)
    nll = -logpx
    res = {
        "framework": "pytorch", "torch_version": torch.__version__, "device": str(device),
        **device_info(device), "config": cfg,
        "epochs": int(cfg["train"]["epochs"]), "steps": step, "train_seconds": train_s,
        "history": history,
        "test_elbo": float(-elbo_full.mean()), "test_elbo_n": int(test.shape[0]),
        "test_elbo_estimator": elbo_estimator(L, 1),
        "test_elbo_subset": float(-elbo_k.mean()),
        "test_elbo_subset_estimator": elbo_estimator(L, args.eval_k),
        "nll": float(nll.mean()), "nll_stderr": float(nll.std(ddof=1) / math.sqrt(len(nll)))
        if len(nll) > 1 else 0.0,
        "k": args.eval_k, "n": int(len(nll)),
        "test_binarization": f"numpy PCG64 seed {TEST_BINARIZE_SEED}"
        if decoder == "bernoulli" else "pixel/255",
    }
    print(f"test ELBO  {res['test_elbo']:.3f} nats  (-ELBO, {res['test_elbo_n']} images, "
          f"{res['test_elbo_estimator']})")
    print(f"test NLL   {res['nll']:.3f} +- {res['nll_stderr']:.3f} nats  "
          f"(k={res['k']}, first {res['n']} images; -ELBO on them {res['test_elbo_subset']:.3f})")
    if args.out:
        ck = save_checkpoint(Path(args.out), model, opt, cfg, step, int(cfg["train"]["epochs"]),
                             seed, cfg_path)
        res["checkpoint"] = str(ck)
        print(f"checkpoint {ck}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def bench_one(cfg: dict, train_px: torch.Tensor, mode: str, batch: int, steps: int,
              warmup: int, device: torch.device = CPU, compile_mode: str | None = None,
              fused_adam: bool = False, check_sync: bool = False) -> dict:
    """Times `steps` optimizer steps (after `warmup`) of the config's model; returns a record.

    `train_px` is the training set from ``train_tensor``: float32 on CPU, uint8 on the device
    for CUDA. On CUDA nothing in the step waits for the host: the permutation, the gather, the
    binarization and the noise are device ops and the loss stays on the device; the clock is read
    after ``torch.cuda.synchronize()`` only, before and after the timed loop. With `check_sync`,
    any synchronizing call inside the timed loop raises (torch.cuda.set_sync_debug_mode).
    """
    cuda = is_cuda(device)
    torch.manual_seed(0)
    decoder = cfg["model"]["decoder"]
    model = build(make_meta(cfg)).to(device)
    o = cfg["optim"]
    opt = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                           eps=o["eps"], **({"fused": True} if fused_adam else {}))
    fn = (lambda x: loss_fn(model, cfg, x))
    if mode == "compile":
        fn = torch.compile(fn, dynamic=False, **({"mode": compile_mode} if compile_mode else {}))
    # CUDA graphs (compile modes reduce-overhead / max-autotune): mark each step's start.
    mark_step = (torch.compiler.cudagraph_mark_step_begin
                 if cuda and mode == "compile" and compile_mode in ("reduce-overhead",
                                                                    "max-autotune") else None)
    n = train_px.shape[0]
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the training set ({n} images)")
    perm = torch.randperm(n, device=device) if cuda else torch.randperm(n)
    pos = 0

    def step():
        nonlocal pos, perm
        if pos + batch > n:
            perm, pos = (torch.randperm(n, device=device) if cuda else torch.randperm(n)), 0
        p = gather_batch(train_px, perm[pos:pos + batch])
        pos += batch
        x = torch.bernoulli(p) if decoder == "bernoulli" else p  # dynamic binarization
        if mark_step is not None:
            mark_step()
        loss = fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        if check_sync:
            torch.cuda.set_sync_debug_mode("error")
    t = time.perf_counter()
    try:
        for _ in range(steps):
            loss = step()
        if cuda:
            if check_sync:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(device)
        else:
            loss.item()
        dt = time.perf_counter() - t
    finally:
        if cuda and check_sync:
            torch.cuda.set_sync_debug_mode("default")
    rec = {"framework": "pytorch", "mode": mode, "samples_per_s": steps * batch / dt,
           "steps_per_s": steps / dt, "batch": batch, "steps": steps, "warmup": warmup,
           "warmup_seconds": warm_s, "seconds": dt, "threads": torch.get_num_threads(),
           "torch_version": torch.__version__, "final_loss": float(loss.item())}
    if cuda:
        rec.update(device=str(device), **device_info(device), k=int(cfg["objective"]["k"]),
                   ms_per_step=dt * 1e3 / steps,
                   max_memory_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20,
                   compile_mode=compile_mode if mode == "compile" else None,
                   adam="fused" if fused_adam else "default", sync_checked=bool(check_sync))
    return rec


def cmd_bench(args) -> None:
    cfg, _ = load_config(args.config)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, tf32=not args.no_tf32)
    if (args.fused_adam or args.check_sync) and not is_cuda(device):
        die("--fused-adam and --check-sync are for --device cuda only")
    batch = args.batch or int(cfg["train"]["batch_size"])
    train_px = train_tensor(load_images(data_dir_of(args, cfg), "train"),
                            cfg["model"]["decoder"], device)
    mode = "compile" if args.compile else args.mode
    modes = ["eager", "compile"] if mode == "both" else [mode]
    where = (f"{device}, {torch.cuda.get_device_name(device)}, TF32 "
             f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
             if is_cuda(device) else f"{args.threads} threads")
    failed = False
    for m in modes:
        try:
            r = bench_one(cfg, train_px, m, batch, args.steps, args.warmup, device=device,
                          compile_mode=args.compile_mode, fused_adam=args.fused_adam,
                          check_sync=args.check_sync)
        except Exception as e:  # torch.compile may be unavailable (no C++ compiler, ...)
            failed = True
            r = {"framework": "pytorch", "mode": m, "error": f"{type(e).__name__}: {e}"[:2000],
                 "batch": batch, "threads": args.threads, "torch_version": torch.__version__}
            if is_cuda(device):
                r["device"] = str(device)
        if is_cuda(device):
            torch.cuda.empty_cache()
        if args.json:
            print(json.dumps(r), flush=True)
        elif "error" in r:
            print(f"pytorch {m:8s} FAILED: {r['error']}", flush=True)
        else:
            print(f"pytorch {m:8s} {r['samples_per_s']:10.0f} samples/s  (batch {batch}, "
                  f"{where}, {args.steps} steps, torch {torch.__version__})",
                  flush=True)
    if failed:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A run dir (uses the name in `latest`), a ckpt-* dir, or a model.safetensors file."""
    try:
        return gentrain_files.resolve_checkpoint(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def load_model(path: Path, device: torch.device = CPU):
    """Loads model.safetensors exactly as docs/checkpoints.md shows; returns (model, meta, cfg).

    The state dict is read on the CPU and the model moved to `device` afterwards."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta is None:
        raise SystemExit(f"{path}: no __metadata__")
    if meta.get("model_family", "vae") != "vae":
        raise SystemExit(f"{path}: model_family {meta.get('model_family')!r} is not 'vae'")
    if meta.get("gentrain_format_version") != "1":
        print(f"warning: gentrain_format_version {meta.get('gentrain_format_version')!r}",
              file=sys.stderr)
    model = build(meta)
    model.load_state_dict(load_file(str(path)))
    cfg = json.loads(meta["config"])
    if int(cfg["model"].get("classes", 0)) > 0:
        raise SystemExit("conditional models need labels; not implemented in torch_vae.py")
    return model.to(device).eval(), meta, cfg


def cmd_eval(args) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, tf32=not args.no_tf32)
    torch.manual_seed(args.seed)
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    model, meta, cfg = load_model(ckpt, device)
    decoder = cfg["model"]["decoder"]
    raw = read_idx(args.data)
    raw = raw.reshape(raw.shape[0], -1)
    if raw.shape[1] != int(meta["input_dim"]):
        raise SystemExit(f"{args.data}: {raw.shape[1]} values per image, the model expects "
                         f"input_dim {meta['input_dim']}")
    if args.limit:
        raw = raw[:args.limit]
    if decoder == "bernoulli":
        if raw.max() > 1:
            if args.binarize_seed is None:
                raise SystemExit(f"{args.data} has pixel values up to {raw.max()}, but a "
                                 "Bernoulli decoder evaluates 0/1 data: pass --binarize-seed S "
                                 "or write a binarized file with `torch_vae.py binarize`")
            raw = binarize_once(raw, args.binarize_seed)
        X = torch.from_numpy(raw.astype(np.float32))
    else:
        X = torch.from_numpy(raw.astype(np.float32) / 255.0)
    X = X.to(device)
    t = time.perf_counter()
    elbo, logpx = estimate(model, decoder, X, k=args.k, batch=args.batch)
    nll = -logpx
    L = len(model.encoders)
    res = {
        "test_elbo": float(-elbo.mean()), "nll": float(nll.mean()), "k": args.k,
        "n": int(len(nll)),
        "nll_stderr": float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0,
        "elbo_estimator": elbo_estimator(L, args.k), "layers": L, "decoder": decoder,
        "checkpoint": str(ckpt), "data": str(args.data), "step": meta.get("step"),
        "seed": args.seed, "seconds": time.perf_counter() - t, "framework": "pytorch",
        "torch_version": torch.__version__, "device": str(device), **device_info(device),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"checkpoint {ckpt} (step {meta.get('step')}, L={L}, {decoder}, {device})")
        print(f"test ELBO  {res['test_elbo']:.3f} nats  ({res['elbo_estimator']})")
        print(f"NLL        {res['nll']:.3f} +- {res['nll_stderr']:.3f} nats  "
              f"(k={args.k}, n={res['n']})")


# --------------------------------------------------------------------------------------------
# binarize
# --------------------------------------------------------------------------------------------


def cmd_binarize(args) -> None:
    raw = read_idx(args.input)
    if raw.ndim != 3:
        raise SystemExit(f"{args.input}: expected an IDX3 image file")
    b = binarize_once(raw.reshape(raw.shape[0], -1), args.seed).reshape(raw.shape)
    write_idx3(args.out, b)
    print(f"wrote {args.out}: {b.shape[0]} images binarized with numpy PCG64 seed {args.seed} "
          f"(mean {b.mean():.4f})")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def device_args(p):
        p.add_argument("--device", default="cpu",
                       help="cpu, cuda or cuda:N (default cpu). Without a usable GPU a CUDA "
                            "device exits with status 2")
        p.add_argument("--no-tf32", action="store_true",
                       help="CUDA: disable TF32 matmuls (torch.backends.cuda.matmul.allow_tf32, "
                            "on by default, as in gentrain's train.tf32)")

    def common(p):
        device_args(p)
        p.add_argument("--config", default=None,
                       help="TOML config (default configs/vae-examples.toml, or the reference "
                            "784-400-20 recipe if that file does not exist)")
        p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
        p.add_argument("--data-dir", default=None,
                       help="MNIST IDX directory (default: [data] dir of the config, else "
                            "data/mnist)")

    p = sub.add_parser("train", help="train a VAE/IWAE and report test ELBO and NLL")
    common(p)
    p.add_argument("--epochs", type=int, default=None, help="override [train] epochs")
    p.add_argument("--seed", type=int, default=None, help="override [train] seed")
    p.add_argument("--batch", type=int, default=None, help="override [train] batch_size")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N train images")
    p.add_argument("--eval-k", type=int, default=None,
                   help="importance samples for the NLL (default [eval] final_k, else 1000)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="NLL on the first N test images, 0 = all (default [eval] final_limit, "
                        "else 2000)")
    p.add_argument("--eval-batch", type=int, default=100, help="test images per NLL batch")
    p.add_argument("--out", default=None, help="write a gentrain-layout run dir here")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="training-step throughput (samples/s)")
    common(p)
    p.add_argument("--batch", type=int, default=None, help="default: [train] batch_size (128)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--mode", choices=["eager", "compile", "both"], default="eager")
    p.add_argument("--compile", action="store_true", help="same as --mode compile")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: torch's default)")
    p.add_argument("--fused-adam", action="store_true",
                   help="CUDA: torch.optim.Adam(fused=True) instead of the default")
    p.add_argument("--check-sync", action="store_true",
                   help="CUDA: fail if anything in the timed loop synchronizes with the host "
                        "(torch.cuda.set_sync_debug_mode('error'))")
    p.add_argument("--json", action="store_true", help="one JSON object per line per mode")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="test ELBO and importance-sampled NLL of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run dir (uses `latest`) or ckpt-* dir")
    p.add_argument("--data", required=True, help="IDX3 file (.gz ok) of evaluation data")
    p.add_argument("--k", type=int, default=1000, help="importance samples per image")
    p.add_argument("--limit", type=int, default=2000, help="first N images (0 = all)")
    p.add_argument("--batch", type=int, default=100, help="images per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    device_args(p)
    p.add_argument("--binarize-seed", type=int, default=None,
                   help="binarize raw 0..255 pixels once with this seed (Bernoulli decoders)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("binarize", help="write a once-binarized copy of an IDX3 image file")
    p.add_argument("--input", default=str(DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz"))
    p.add_argument("--out", required=True, help="output IDX3 path (.gz to compress)")
    p.add_argument("--seed", type=int, default=TEST_BINARIZE_SEED)
    p.set_defaults(func=cmd_binarize)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
