"""Helpers the PyTorch reference scripts share: one-line errors and device selection.

`die` prints one line on stderr and exits with status 2 (bad input, or an environment that cannot
run the request), as `trainer` does; `resolve_device` turns `cpu`, `cuda` or `cuda:N` into a
`torch.device`, or dies saying why it cannot.
"""

from __future__ import annotations

import re
import sys


def die(msg: str, code: int = 2):
    """Prints `msg` as one line (`error: ...`, whitespace collapsed) on stderr; exits with `code`."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def resolve_device(spec: str, tf32: bool = True):
    """`cpu` (also for an empty spec), `cuda` or `cuda:N` as a `torch.device`; on CUDA the device
    is made current and TF32 matmuls and convolutions are allowed or not by `tf32`. An unknown
    spelling, no usable CUDA, or an index past the visible devices is a one-line error (exit 2)."""
    import torch

    s = (spec or "cpu").strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if not m:
        die(f"device {spec!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        die(f"device {spec}: CUDA is not available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}; no usable GPU or driver on this machine)")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        die(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    torch.cuda.set_device(idx)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    return torch.device("cuda", idx)
