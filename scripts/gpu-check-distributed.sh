#!/usr/bin/env bash
# The GPU checks of data parallelism and of the IWAE reproduction, in one command, on a machine
# with NVIDIA GPUs and no Rust (carry target-cuda/carry, as for scripts/gpu-check.sh):
#
#     scripts/gpu-check-distributed.sh [OUT_DIR]   (default: $OUT/gpu-check-distributed, else
#                                                   bench/results/gpu-check-distributed)
#
#   1. NCCL with a world of 1 against the plain run: configs/vae-examples.toml for 300 steps on
#      cuda:0, once with `trainer train` and once with `trainer launch --gpus 0` (the whole NCCL
#      path: rendezvous, broadcast, bucketed all-reduce); the checkpoints' tensors are compared
#      and the largest relative difference of the update is reported (must be <= 1e-5);
#   2. scripts/bench_scaling.sh over every GPU present (weak scaling, with the expected scaling
#      from the all-reduce volume where there is one GPU);
#   3. IWAE 1-layer k = 50 throughput at batch 20, 100, 250 and 1000 (`trainer bench`) and the
#      wall-clock the paper's 3280-pass schedule would take at each, so the batch of the full
#      reproduction (scripts/reproduce_iwae.sh --rows iwae-1layer-k50 --device cuda:0
#      --batch-size B) can be chosen to fit 60 minutes;
#   4. summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:+$OUT/gpu-check-distributed}}
OUT_DIR=${OUT_DIR:-bench/results/gpu-check-distributed}
mkdir -p "$OUT_DIR"
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

step "1. NCCL world of 1 vs the plain run"
flags=(--config configs/vae-examples.toml --epochs 1000 --max-steps 300 --set train.eval_every=0
       --set eval.final_k=0 --set train.sample_every=0 --json)
rm -rf "$OUT_DIR/plain" "$OUT_DIR/nccl1"
"$TRAINER" train --device cuda:0 --out "$OUT_DIR/plain" "${flags[@]}" >"$OUT_DIR/plain.json"
"$TRAINER" launch --gpus 0 -- --out "$OUT_DIR/nccl1" "${flags[@]}" >"$OUT_DIR/nccl1.json"
python3 - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/nccl1-vs-plain.json"
import json, struct, sys, pathlib
out = pathlib.Path(sys.argv[1])
def tensors(run):
    ck = run / (run / "latest").read_text().strip() / "model.safetensors"
    b = ck.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    body = b[8 + n:]
    res = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        s, e = v["data_offsets"]
        res[k] = struct.unpack(f"<{(e - s) // 4}f", body[s:e])
    return res
a, b = tensors(out / "plain"), tensors(out / "nccl1")
assert a.keys() == b.keys(), (sorted(a), sorted(b))
worst = max((abs(x - y) / (1e-3 + abs(x)) for k in a for x, y in zip(a[k], b[k])), default=0.0)
identical = all(a[k] == b[k] for k in a)
print(json.dumps({"tensors": len(a), "bit_identical": identical, "max_rel_diff": worst, "pass": worst <= 1e-5}))
sys.exit(0 if worst <= 1e-5 else 1)
PY

step "2. scaling over every GPU"
scripts/bench_scaling.sh --out "$OUT_DIR/scaling" --trainer "$TRAINER"

step "3. IWAE 1-layer k = 50: throughput and the full schedule's wall-clock"
: >"$OUT_DIR/iwae-k50-bench.jsonl"
for b in 20 100 250 1000; do
  "$TRAINER" bench --config configs/iwae-table1/iwae-1layer-k50.toml --device cuda:0 --batch-size "$b" \
    --steps 300 --warmup 30 --json | tee -a "$OUT_DIR/iwae-k50-bench.jsonl"
done

step "4. summary"
python3 - "$OUT_DIR" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
bench = [json.loads(l) for l in open(out / "iwae-k50-bench.jsonl") if l.strip()]
train_images = 60000
proj = [{"batch": b.get("batch"), "samples_per_s": b.get("samples_per_s"),
         "full_schedule_minutes": 3280 * train_images / b["samples_per_s"] / 60} for b in bench]
summary = {"gpu": (out / "gpu.txt").read_text().strip(),
           "nccl_world1_vs_plain": json.loads((out / "nccl1-vs-plain.json").read_text()),
           "scaling": json.loads((out / "scaling" / "scaling.json").read_text())["rows"],
           "iwae_1layer_k50_projection": proj}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
