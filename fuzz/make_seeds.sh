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
mkdir -p "$seeds/idx" "$seeds/checkpoint" "$seeds/checkpoint_meta"

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
ls -l "$seeds"/*
