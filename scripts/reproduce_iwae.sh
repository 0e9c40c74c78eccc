#!/usr/bin/env bash
# Reproduces Table 1 of Burda, Grosse & Salakhutdinov 2016 ("Importance Weighted Autoencoders"):
# VAE and IWAE, 1 and 2 stochastic layers, k = 1, 5, 50, dynamic binarization, the paper's
# schedule (3^i passes at lr 1e-3 * 10^(-i/7), i = 0..7: 3280 passes), test NLL with k = 5000.
# Every row is trained with `trainer train` (or `trainer launch` across GPUs), then evaluated with
# `trainer eval --k 5000`; results.json and results.md (our figures next to the paper's, with
# wall-clock times, the machine and the commands) are written to OUT.
#
#   scripts/reproduce_iwae.sh [options]
#     --schedule full|short|N   full: 3280 passes (the paper); short: the first three stages
#                               (1 + 3 + 9 = 13 passes, the CPU version in docs/reproduction.md);
#                               N: the schedule cut after N passes            (default full)
#     --rows "R ..."            rows to run, names of configs/iwae-table1/*.toml
#                               (default: all twelve; k = 1 rows are shared by VAE and IWAE)
#     --device D                cpu, cuda:0, ...                                (default cpu)
#     --gpus 0,1,...            train each row data-parallel over these GPUs (trainer launch)
#     --batch-size B            global batch (the paper's 20 by default)
#     --eval-limit N            evaluate on the first N test images only (0: all 10,000)
#     --trainer PATH            trainer binary (default target/release/trainer, built if missing)
#     --out DIR                 (default runs/iwae-table1-<schedule>)
#     --threads T               CPU threads per run (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS="$*"
SCHEDULE=full ROWS="" DEVICE=cpu GPUS="" BATCH="" EVAL_LIMIT=0 TRAINER="" OUT="" THREADS=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --schedule) SCHEDULE=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --eval-limit) EVAL_LIMIT=$2; shift 2 ;;
    --trainer) TRAINER=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case $SCHEDULE in
  full) PASSES=3280 ;;
  short) PASSES=13 ;;
  ''|*[!0-9]*) echo "error: --schedule must be full, short or a number of passes" >&2; exit 2 ;;
  *) PASSES=$SCHEDULE ;;
esac
[[ -n $ROWS ]] || ROWS="vae-1layer-k1 vae-1layer-k5 vae-1layer-k50 iwae-1layer-k5 iwae-1layer-k50 vae-2layer-k1 vae-2layer-k5 vae-2layer-k50 iwae-2layer-k5 iwae-2layer-k50"
OUT=${OUT:-runs/iwae-table1-$SCHEDULE}
if [[ -z $TRAINER ]]; then
  TRAINER=target/release/trainer
  [[ -x $TRAINER ]] || cargo build --release --bin trainer
fi
mkdir -p "$OUT"

for row in $ROWS; do
  cfg=configs/iwae-table1/$row.toml
  [[ -f $cfg ]] || { echo "error: no $cfg" >&2; exit 2; }
  run=$OUT/$row
  flags=(--config "$cfg" --epochs "$PASSES" --out "$run" --json --threads "$THREADS"
         --set eval.final_k=0 --set train.sample_every=0)
  [[ -n $BATCH ]] && flags+=(--batch-size "$BATCH")
  if [[ -f $run/latest ]]; then
    flags=(--resume "$run" --epochs "$PASSES" --json --threads "$THREADS" --set eval.final_k=0 --set train.sample_every=0)
  fi
  echo "=== $row: $PASSES passes ($(date -u +%H:%M:%S))" >&2
  t0=$(date +%s)
  if [[ -n $GPUS ]]; then
    "$TRAINER" launch --gpus "$GPUS" -- "${flags[@]}" >"$run.train.json"
  else
    "$TRAINER" train --device "$DEVICE" "${flags[@]}" >"$run.train.json"
  fi
  t1=$(date +%s)
  eval_dev=$DEVICE
  [[ -n $GPUS ]] && eval_dev=cuda:${GPUS%%,*}
  "$TRAINER" eval --checkpoint "$run" --k 5000 --limit "$EVAL_LIMIT" --samples 0 --device "$eval_dev" \
    --threads "$THREADS" --json >"$run.eval.json"
  t2=$(date +%s)
  printf '{"row":"%s","passes":%s,"train_s":%s,"eval_s":%s}\n' "$row" "$PASSES" $((t1 - t0)) $((t2 - t1)) >"$run.time.json"
done

python3 - "$OUT" "$PASSES" "$DEVICE" "$GPUS" "$EVAL_LIMIT" "$ARGS" <<'PY'
import json, pathlib, platform, subprocess, sys
out, passes, device, gpus, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
# Table 1 of Burda et al. 2016: test NLL (nats), 3280 passes, k = 5000 evaluation.
paper = {
    ("1", "vae", 1): 86.76, ("1", "vae", 5): 86.47, ("1", "vae", 50): 86.35,
    ("1", "iwae", 1): 86.76, ("1", "iwae", 5): 85.54, ("1", "iwae", 50): 84.78,
    ("2", "vae", 1): 85.33, ("2", "vae", 5): 85.01, ("2", "vae", 50): 84.78,
    ("2", "iwae", 1): 85.33, ("2", "iwae", 5): 83.89, ("2", "iwae", 50): 82.90,
}
def machine():
    if device.startswith("cuda") or gpus:
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        except Exception:
            return "GPU (nvidia-smi unavailable)"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    import os
    return f"{cpu}, {os.cpu_count()} cores (CPU)"
rows = []
for t in sorted(out.glob("*.time.json")):
    name = t.name[: -len(".time.json")]
    kind, layers, k = name.split("-")
    ev = json.loads((out / f"{name}.eval.json").read_text())
    tm = json.loads(t.read_text())
    nll = ev.get("nll")
    ref = paper[(layers[0], kind, int(k[1:]))]
    rows.append({"row": name, "objective": kind, "layers": int(layers[0]), "k": int(k[1:]),
                 "passes": tm["passes"], "nll": nll, "nll_stderr": ev.get("nll_stderr"),
                 "eval_images": ev.get("n"), "paper_nll": ref,
                 "gap": None if nll is None else round(nll - ref, 2),
                 "train_minutes": round(tm["train_s"] / 60, 1), "eval_minutes": round(tm["eval_s"] / 60, 1)})
summary = {"machine": machine(), "device": device, "gpus": gpus, "passes": passes,
           "eval_limit": limit, "command": "scripts/reproduce_iwae.sh " + sys.argv[6], "rows": rows}
rows.sort(key=lambda r: (r["layers"], r["objective"] == "iwae", r["k"]))
(out / "results.json").write_text(json.dumps(summary, indent=2))
md = [f"IWAE Table 1 reproduction: {passes} passes, {machine()}, eval k = 5000 on "
      f"{'all 10,000' if limit == 0 else f'the first {limit}'} test images.",
      f"Command: `{summary['command']}`", "",
      "| row | layers | objective | k | NLL (nats) | paper (3280 passes) | gap | train (min) | eval (min) |",
      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    nll = "n/a" if r["nll"] is None else f"{r['nll']:.2f} +- {r['nll_stderr']:.2f}"
    md.append(f"| {r['row']} | {r['layers']} | {r['objective']} | {r['k']} | {nll} | {r['paper_nll']:.2f} | "
              f"{r['gap']:+.2f} | {r['train_minutes']} | {r['eval_minutes']} |")
(out / "results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
