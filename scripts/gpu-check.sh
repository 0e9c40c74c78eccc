#!/usr/bin/env bash
# Every GPU check of the CUDA path, in one command, on a machine with an NVIDIA GPU and no Rust.
# Build here first (scripts/build-cuda.sh) and carry target-cuda/carry (the xz-compressed
# stripped trainer, ~8 MiB) to the GPU machine; then, from the repository root there:
#
#     scripts/gpu-check.sh [OUT_DIR]          (default: $OUT/gpu-check if $OUT is set, else bench/results/gpu-check)
#
# Steps (each writes its output under OUT_DIR; the script stops at the first failure):
#   1. nvidia-smi and the environment;
#   2. trainer check-kernels --device cuda:0: every fused kernel, forward and backward, against the
#      CPU reference on shapes that are not multiples of the block size, outputs poisoned with NaN;
#   3. trainer bench-kernels at 64M elements: achieved GB/s of each kernel against a device copy;
#   4. scripts/bench_pytorch.py: train-step throughput of gentrain vs PyTorch eager and
#      torch.compile on the benchmarked configurations (skipped when torch is missing);
#   5. a 10-epoch run of configs/vae-examples.toml on cuda:0 with the test NLL (k = 1000, 2000
#      images) to compare with the CPU run's 96.92 nats (docs/results.md);
#   6. one epoch each of the flow and the spectrally normalized GANs (MLP on the 25-Gaussian grid,
#      DCGAN on MNIST) on cuda:0, with their eval JSON: the non-VAE families' first GPU runs;
#   7. summary.json gathering the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:+$OUT/gpu-check}}
OUT_DIR=${OUT_DIR:-bench/results/gpu-check}
mkdir -p "$OUT_DIR"
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$OUT_DIR/env.txt"
ldd "$TRAINER" >>"$OUT_DIR/env.txt"

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "1. device"
nvidia-smi | tee "$OUT_DIR/nvidia-smi.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

step "2. kernels against the CPU"
"$TRAINER" check-kernels --device cuda:0 | tee "$OUT_DIR/check-kernels.txt"
"$TRAINER" check-kernels --device cuda:0 --json > "$OUT_DIR/check-kernels.json"

step "3. kernel bandwidth"
"$TRAINER" bench-kernels --device cuda:0 --elements 67108864 --repeats 20 | tee "$OUT_DIR/bench-kernels.md"
"$TRAINER" bench-kernels --device cuda:0 --elements 67108864 --repeats 20 --json > "$OUT_DIR/bench-kernels.json"

step "4. training throughput against PyTorch"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  python3 scripts/bench_pytorch.py --trainer "$TRAINER" --out-dir "$OUT_DIR" | tee "$OUT_DIR/bench_pytorch.log"
else
  echo "PyTorch with CUDA not importable: side-by-side throughput skipped" | tee "$OUT_DIR/bench_pytorch.log"
  for cfg in configs/vae-examples.toml configs/iwae-table1/iwae-1layer-k50.toml configs/iwae-table1/iwae-2layer-k5.toml; do
    "$TRAINER" bench --config "$cfg" --device cuda:0 --steps 300 --warmup 30 --json | tee -a "$OUT_DIR/bench-gentrain.jsonl"
  done
fi

step "5. 10-epoch VAE on cuda:0"
rm -rf "$OUT_DIR/run-cuda"
"$TRAINER" train --config configs/vae-examples.toml --device cuda:0 --out "$OUT_DIR/run-cuda" --json > "$OUT_DIR/train-cuda.json"
cat "$OUT_DIR/train-cuda.json"

step "6. flow and GANs on cuda:0 (1 epoch each)"
for cfg in realnvp-moons sngan-grid25 sngan-dcgan-mnist; do
  rm -rf "$OUT_DIR/run-$cfg"
  "$TRAINER" train --config "configs/$cfg.toml" --device cuda:0 --epochs 1 --out "$OUT_DIR/run-$cfg" --json > "$OUT_DIR/train-$cfg.json"
  "$TRAINER" eval --checkpoint "$OUT_DIR/run-$cfg" --device cuda:0 --samples 2000 --json > "$OUT_DIR/eval-$cfg.json"
  cat "$OUT_DIR/eval-$cfg.json"
done

step "7. summary"
python3 - "$OUT_DIR" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
train = json.loads((out / "train-cuda.json").read_text())
kernels = json.loads((out / "bench-kernels.json").read_text())
checks = json.loads((out / "check-kernels.json").read_text())
summary = {
    "gpu": (out / "gpu.txt").read_text().strip(),
    "checks_passed": len(checks),
    "kernels_fraction_of_copy": {k["kernel"]: round(k["fraction_of_copy"], 3) for k in kernels},
    "train_samples_per_s": train.get("samples_per_s"),
    "test_nll_k1000_2000": (train.get("final_eval") or {}).get("nll"),
    "cpu_reference_nll": 96.92,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
