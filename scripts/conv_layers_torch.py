"""PyTorch's time on the shapes of examples/conv_layers.rs (the MNIST U-Net's convolutions at
batch 128): forward, and forward + backward of sum(conv2d(x, w, b) * r), in ms, best of N.

    .venv-torch/bin/python scripts/conv_layers_torch.py [--repeats N] [--threads T]
"""
import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ((128, 1, 28, 28), (32, 1, 3, 3), 1, 1),
    ((128, 32, 28, 28), (32, 32, 3, 3), 1, 1),
    ((128, 64, 28, 28), (32, 64, 3, 3), 1, 1),
    ((128, 32, 28, 28), (32, 32, 3, 3), 2, 1),
    ((128, 64, 14, 14), (64, 64, 3, 3), 1, 1),
    ((128, 128, 14, 14), (64, 128, 3, 3), 1, 1),
    ((128, 64, 7, 7), (64, 64, 3, 3), 1, 1),
    ((128, 128, 7, 7), (64, 128, 3, 3), 1, 1),
    ((128, 32, 28, 28), (1, 32, 3, 3), 1, 1),
    ((128, 64, 14, 14), (64, 64, 3, 3), 2, 1),
]


def best(repeats, f):
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out = min(out, (time.perf_counter() - t) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("| x | w | s, p | forward ms | forward + backward ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for xd, wd, s, p in SHAPES:
        x = torch.randn(xd, requires_grad=True)
        w = (0.1 * torch.randn(wd)).requires_grad_()
        b = (0.1 * torch.randn(wd[0])).requires_grad_()
        r = torch.randn(F.conv2d(x, w, b, s, p).shape)

        def fwd():
            with torch.no_grad():
                F.conv2d(x, w, b, s, p)

        def both():
            x.grad = w.grad = b.grad = None
            (F.conv2d(x, w, b, s, p) * r).sum().backward()

        print(f"| {list(xd)} | {list(wd)} | {s}, {p} | {best(a.repeats, fwd):.1f} | {best(a.repeats, both):.1f} |")


if __name__ == "__main__":
    main()
