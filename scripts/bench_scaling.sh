#!/usr/bin/env bash
# Multi-GPU scaling of data-parallel training (trainer launch, NCCL): for every config and every
# n = 1..N GPUs, trains a fixed number of steps with a per-GPU batch held constant (global batch
# n * B, weak scaling) and reports samples/s and scaling efficiency samples/s(n) / (n samples/s(1)).
# A plain single-process run is measured too, so the cost of the data-parallel machinery at n = 1
# shows. Writes OUT/scaling.json and OUT/scaling.md (GPU, driver, commands). With one GPU it
# also gives the expected scaling from the measured step time and the per-step all-reduce volume
# (4 bytes per parameter) under a stated NVLink ring model.
#
#   scripts/bench_scaling.sh [--gpus 0,1,...] [--configs "C ..."] [--batch-per-gpu B]
#                            [--steps S] [--trainer PATH] [--out DIR] [--cpu-processes N]
# --cpu-processes N runs the same sweep with CPU ranks (tcp backend) instead of GPUs: a check
# of the script and of the TCP path on machines without GPUs, not a GPU benchmark.
# Defaults: every GPU nvidia-smi lists; configs/vae-examples.toml and the IWAE 1-layer k = 50
# row; B = 128; S = 600; target-cuda/release/trainer (unpacked from target-cuda/carry if needed);
# OUT = $OUT/scaling when $OUT is set, else bench/results/scaling.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"
CPU=0 GPUS="" CONFIGS="configs/vae-examples.toml configs/iwae-table1/iwae-1layer-k50.toml" B=128 STEPS=600 TRAINER="" DIR=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) GPUS=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --batch-per-gpu) B=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --trainer) TRAINER=$2; shift 2 ;;
    --out) DIR=$2; shift 2 ;;
    --cpu-processes) CPU=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
DIR=${DIR:-${OUT:+$OUT/scaling}}
DIR=${DIR:-bench/results/scaling}
mkdir -p "$DIR"
if ((CPU > 0)); then
  TRAINER=${TRAINER:-target/release/trainer}
  GPUS=$(seq -s, 0 $((CPU - 1)))
fi
if ((CPU == 0)); then
  # shellcheck source=scripts/gpu-env.sh
  source scripts/gpu-env.sh
fi
if [[ -z $GPUS ]] && ((CPU == 0)); then
  GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
IFS=, read -r -a GPU_LIST <<<"$GPUS"
N=${#GPU_LIST[@]}

common=(--set train.eval_every=0 --set eval.final_k=0 --set train.sample_every=0
        --set train.log_every=50 --epochs 1000 --max-steps "$STEPS" --json)
: >"$DIR/runs.jsonl"
for cfg in $CONFIGS; do
  name=$(basename "$cfg" .toml)
  run=$DIR/$name-plain
  rm -rf "$run"
  echo "=== $name: plain, 1 GPU ($(date -u +%H:%M:%S))" >&2
  device=cuda:${GPU_LIST[0]}
  ((CPU > 0)) && device=cpu
  cmd=("$TRAINER" train --config "$cfg" --device "$device" --batch-size "$B" --out "$run" "${common[@]}")
  "${cmd[@]}" >"$run.json"
  printf '{"config":"%s","mode":"plain","gpus":1,"run":"%s","command":"%s"}\n' "$cfg" "$run" "${cmd[*]}" >>"$DIR/runs.jsonl"
  for ((n = 1; n <= N; n++)); do
    gpus=$(IFS=,; echo "${GPU_LIST[*]:0:n}")
    run=$DIR/$name-dp$n
    rm -rf "$run"
    echo "=== $name: launch --gpus $gpus ($(date -u +%H:%M:%S))" >&2
    place=(--gpus "$gpus")
    ((CPU > 0)) && place=(--processes "$n")
    cmd=("$TRAINER" launch "${place[@]}" -- --config "$cfg" --batch-size $((B * n)) --out "$run" "${common[@]}")
    "${cmd[@]}" >"$run.json"
    mode=nccl
    ((CPU > 0)) && mode=tcp
    printf '{"config":"%s","mode":"'"$mode"'","gpus":%d,"run":"%s","command":"%s"}\n' "$cfg" "$n" "$run" "${cmd[*]}" >>"$DIR/runs.jsonl"
  done
done

python3 - "$DIR" "$B" "$ARGS" <<'PY'
import json, pathlib, statistics, subprocess, sys
out, per_gpu, args = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
except FileNotFoundError:
    smi = []
gpu = smi[0] if smi else "CPU ranks (no nvidia-smi)"
def window_rates(run):
    # samples/s of each logging window after the first (which holds start-up and warm-up).
    rates = [json.loads(l).get("samples_per_s") for l in open(run / "metrics.jsonl") if '"event":"train"' in l]
    rates = [r for r in rates if isinstance(r, (int, float))]
    return rates[1:] or rates
rows = []
for line in open(out / "runs.jsonl"):
    r = json.loads(line)
    run = pathlib.Path(r["run"])
    summary = json.loads(pathlib.Path(str(run) + ".json").read_text())
    rates = window_rates(run)
    r.update({"samples_per_s": statistics.median(rates), "windows": len(rates),
              "parameters": summary.get("parameters"), "steps": summary.get("steps"),
              "global_batch": per_gpu * r["gpus"]})
    rows.append(r)
for r in rows:
    base = next(x for x in rows if x["config"] == r["config"] and x["mode"] != "plain" and x["gpus"] == 1)
    r["efficiency"] = r["samples_per_s"] / (r["gpus"] * base["samples_per_s"])
# Expected scaling where only one GPU was measured: a step takes t1 = B / sps(1); an NCCL ring
# all-reduce of V bytes over n GPUs takes about 2 (n - 1) (alpha + V / (n busbw_link)), with
# alpha = 8 us per hop and busbw_link = 150 GB/s (H100 SXM NVLink 4, one direction per peer,
# a conservative reading of nccl-tests' ~360-480 GB/s bus bandwidth at 8 GPUs).
alpha, bw = 8e-6, 150e9
expected = []
for r in rows:
    if r["mode"] != "nccl" or r["gpus"] != 1:
        continue
    t1 = per_gpu / r["samples_per_s"]
    v = 4 * (r["parameters"] or 0)
    for n in (2, 4, 8):
        t_ar = 2 * (n - 1) * (alpha + v / (n * bw))
        expected.append({"config": r["config"], "gpus": n, "step_s": t1, "allreduce_bytes": v,
                         "allreduce_s": t_ar, "expected_efficiency": t1 / (t1 + t_ar)})
result = {"gpu": gpu, "per_gpu_batch": per_gpu, "command": "scripts/bench_scaling.sh " + args,
          "rows": rows, "expected_from_model": expected,
          "model": {"alpha_s_per_hop": alpha, "link_bytes_per_s": bw}}
(out / "scaling.json").write_text(json.dumps(result, indent=2))
md = [f"Data-parallel scaling on {gpu}; per-GPU batch {per_gpu} (global batch = GPUs x {per_gpu}); "
      "samples/s = median of the logging windows after the first.", f"Command: `{result['command']}`", "",
      "| config | mode | GPUs | samples/s | efficiency |", "| --- | --- | ---: | ---: | ---: |"]
for r in rows:
    md.append(f"| {r['config']} | {r['mode']} | {r['gpus']} | {r['samples_per_s']:,.0f} | {r['efficiency']:.2f} |")
if expected:
    md += ["", "Expected scaling from the one-GPU step time and the all-reduce volume "
           f"(ring model, {alpha * 1e6:.0f} us per hop, {bw / 1e9:.0f} GB/s per link):", "",
           "| config | GPUs | step (ms) | all-reduce (MB) | all-reduce (ms) | expected efficiency |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in expected:
        md.append(f"| {e['config']} | {e['gpus']} | {e['step_s'] * 1e3:.2f} | {e['allreduce_bytes'] / 1e6:.2f} | "
                  f"{e['allreduce_s'] * 1e3:.3f} | {e['expected_efficiency']:.2f} |")
(out / "scaling.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
