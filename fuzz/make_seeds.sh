#!/usr/bin/env bash
# Regenerates the seed inputs under fuzz/seeds/ (they are committed; run this only to refresh
# them). Needs a built `trainer` (cargo build --release in the repository root) and python3.
# Usage: fuzz/make_seeds.sh [path/to/trainer]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
trainer="${1:-$root/target/release/trainer}"
seeds="$here/seeds"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$seeds/idx" "$seeds/checkpoint" "$seeds/checkpoint_meta" "$seeds/npy" "$seeds/cifar"

# --- checkpoints: tiny models trained for one epoch -------------------------------------------
common='[train]
epochs = 1
batch_size = 50
threads = 1
log_every = 5
[eval]
final_k = 2
final_limit = 20'
cat > "$tmp/moons.toml" <<TOML
[model]
activation = "relu"
decoder = "gaussian"
[[model.layers]]
hidden = [4]
latent = 2
[data]
dataset = "moons"
synthetic_size = 200
$common
TOML
cat > "$tmp/ring8.toml" <<TOML
[model]
activation = "tanh"
decoder = "gaussian"
[[model.layers]]
hidden = [3]
latent = 2
[[model.layers]]
hidden = [2]
latent = 1
[data]
dataset = "ring8"
synthetic_size = 100
[objective]
kl = "monte_carlo"
$common
TOML
cat > "$tmp/mnist.toml" <<TOML
[model]
activation = "softplus"
[[model.layers]]
hidden = [2]
latent = 2
[data]
dir = "$root/data/mnist"
limit_train = 100
$common
TOML
for c in moons ring8 mnist; do
  "$trainer" train --config "$tmp/$c.toml" --out "$tmp/run-$c" > /dev/null
done
ck() { ls -d "$tmp/run-$1"/ckpt-* | tail -1; }
cp "$(ck moons)/model.safetensors" "$seeds/checkpoint/moons-1layer.safetensors"
cp "$(ck moons)/optim.safetensors" "$seeds/checkpoint/moons-1layer-optim.safetensors"
cp "$(ck ring8)/model.safetensors" "$seeds/checkpoint/ring8-2layer.safetensors"
cp "$(ck mnist)/model.safetensors" "$seeds/checkpoint/mnist-784-2-2.safetensors"

# --- checkpoint_meta: the metadata of the seed checkpoints as key=value lines -------------------
# --- idx: mode byte + IDX payload ---------------------------------------------------------------
python3 - "$seeds" "$root/data/mnist" <<'PY'
import gzip, json, struct, sys, pathlib
seeds, mnist = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

def meta(path):
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n])["__metadata__"]

for name in ["moons-1layer", "ring8-2layer", "mnist-784-2-2"]:
    m = meta(seeds / "checkpoint" / f"{name}.safetensors")
    text = "".join(f"{k}={v}\n" for k, v in sorted(m.items()))
    (seeds / "checkpoint_meta" / f"{name}.txt").write_text(text)
(seeds / "checkpoint_meta" / "empty.txt").write_text("")

def idx(dims, data):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(data)

labels = gzip.decompress((mnist / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:8 + 16]
images = gzip.decompress((mnist / "t10k-images-idx3-ubyte.gz").read_bytes())[16:16 + 2 * 784]
out = seeds / "idx"
(out / "raw-labels-16").write_bytes(b"\x00" + idx([16], labels))
(out / "raw-images-2x28x28").write_bytes(b"\x00" + idx([2, 28, 28], images))
(out / "raw-3d-2x3x3").write_bytes(b"\x00" + idx([2, 3, 3], range(18)))
(out / "raw-4d-1x2x1x2").write_bytes(b"\x00" + idx([1, 2, 1, 2], [1, 2, 3, 4]))
(out / "raw-empty-0x5").write_bytes(b"\x00" + idx([0, 5], []))
(out / "gzip-mode-labels-16").write_bytes(b"\x0b" + idx([16], labels))
(out / "gzip-mode-images-1x28x28").write_bytes(b"\x13" + idx([1, 28, 28], images[:784]))
# Raw mode with a gzip stream as payload: read_idx decompresses it.
(out / "raw-gzip-stream-2x2").write_bytes(b"\x00" + gzip.compress(idx([2, 2], [9, 8, 7, 6]), mtime=0))
PY
# --- npy and cifar: mode byte + payload (written by hand, no NumPy needed) ----------------------
python3 - "$seeds" <<'PY'
import io, struct, sys, pathlib, zipfile
seeds = pathlib.Path(sys.argv[1])

def npy(descr, shape, data, fortran=False, version=1):
    dims = ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
    text = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (descr, fortran, dims)
    prefix = 10 if version == 1 else 12
    text += " " * ((64 - (prefix + len(text) + 1) % 64) % 64) + "\n"
    size = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text.encode() + bytes(data)

def npz(arrays, method):
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        for name, payload in arrays:
            z.writestr(zipfile.ZipInfo(name + ".npy", (1980, 1, 1, 0, 0, 0)), payload, method)
    return f.getvalue()

out = seeds / "npy"
x = npy("|u1", (2, 2, 2, 3), range(24))
y = npy("<i8", (2,), struct.pack("<2q", 1, 0))
(out / "u8-2x2x3").write_bytes(b"\x00" + npy("|u1", (2, 2, 3), range(12)))
(out / "u8-nhwc-2x2x2x3-deflate").write_bytes(b"\x01" + x)
(out / "u8-fortran-2x2x2x3-file-archive").write_bytes(b"\x02" + npy("|u1", (2, 2, 2, 3), range(24), True))
(out / "f4-rows-3x2").write_bytes(b"\x00" + npy("<f4", (3, 2), struct.pack("<6f", 0.5, -1, 2, 3.25, 4, 5)))
(out / "f8-be-rows-2x2").write_bytes(b"\x03" + npy(">f8", (2, 2), struct.pack(">4d", 1, 2, 3, 4)))
(out / "f2-rows-1x2-v2").write_bytes(b"\x00" + npy("<f2", (1, 2), struct.pack("<2e", 1, -2), version=2))
(out / "i8-labels-2").write_bytes(b"\x00" + y)
(out / "npz-xy-stored").write_bytes(b"\x00" + npz([("x", x), ("y", y)], zipfile.ZIP_STORED))
(out / "npz-xy-deflated").write_bytes(b"\x00" + npz([("x", x), ("y", y)], zipfile.ZIP_DEFLATED))

out = seeds / "cifar"
record = lambda label, k: bytes([label]) + bytes((k + 3 * i) % 256 for i in range(3072))
(out / "train-one-record").write_bytes(b"\x00" + record(3, 0))
(out / "test-two-records").write_bytes(b"\x01" + record(9, 1) + record(0, 2))
(out / "train-with-meta").write_bytes(b"\x02" + record(1, 5))
(out / "empty").write_bytes(b"\x00")
PY
ls -l "$seeds"/*
