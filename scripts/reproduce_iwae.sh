#!/usr/bin/env bash
# Reproduces Table 1 of Burda, Grosse & Salakhutdinov 2016 ("Importance Weighted Autoencoders"):
# VAE and IWAE, 1 and 2 stochastic layers, k = 1, 5, 50, dynamic binarization, the paper's
# schedule (3^i passes at lr 1e-3 * 10^(-i/7), i = 0..7: 3280 passes), test NLL with k = 5000.
# Every row is trained with `trainer train` (or `trainer launch` across GPUs), then evaluated with
# `trainer eval --k 5000`; results.json and results.md (our figures next to the paper's, with
# wall-clock times, the machine and the commands) are written to OUT. Several invocations may
# share one OUT (other rows, other seeds): the tables then cover every run in it, and
# OUT/commands.txt keeps every invocation, which the tables list.
#
#   scripts/reproduce_iwae.sh [options]
#     --schedule full|short|N   full: 3280 passes (the paper); short: the first three stages
#                               (1 + 3 + 9 = 13 passes, the CPU version in docs/reproduction.md);
#                               N: the schedule cut after N passes            (default full)
#     --rows "R ..."            rows to run, names of configs/iwae-table1/*.toml
#                               (default: all twelve; k = 1 rows are shared by VAE and IWAE)
#     --variant default|reference  default: the configs as the paper's text gives the recipe;
#                               reference: configs/iwae-table1/reference/, the recipe as the
#                               paper's released code ran it (docs/reproduction.md)
#     --seeds "S ..."           train each row once per seed (run ROW-sS); the tables give the
#                               mean and the spread over seeds           (default: the config's)
#     --device D                cpu, cuda:0, ...                                (default cpu)
#     --gpus 0,1,...            train each row data-parallel over these GPUs (trainer launch)
#     --batch-size B            global batch (the paper's 20 by default)
#     --eval-limit N            evaluate on the first N test images only (0: all 10,000)
#     --trainer PATH            trainer binary (default target/release/trainer, built if missing)
#     --out DIR                 (default runs/iwae-table1-<schedule>)
#     --threads T               CPU threads per run (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS=$(printf "%q " "$@")
SCHEDULE=full ROWS="" DEVICE=cpu GPUS="" BATCH="" EVAL_LIMIT=0 TRAINER="" OUT="" THREADS=0
VARIANT=default SEEDS=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --schedule) SCHEDULE=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --eval-limit) EVAL_LIMIT=$2; shift 2 ;;
    --trainer) TRAINER=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --variant) VARIANT=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case $SCHEDULE in
  full) PASSES=3280 ;;
  short) PASSES=13 ;;
  ''|*[!0-9]*) echo "error: --schedule must be full, short or a number of passes" >&2; exit 2 ;;
  *) PASSES=$SCHEDULE ;;
esac
case $VARIANT in
  default) CONFIG_DIR=configs/iwae-table1 ;;
  reference) CONFIG_DIR=configs/iwae-table1/reference ;;
  *) echo "error: --variant must be default or reference" >&2; exit 2 ;;
esac
for s in $SEEDS; do
  [[ $s =~ ^[0-9]+$ ]] || { echo "error: --seeds takes non-negative integers, got $s" >&2; exit 2; }
done
[[ -n $ROWS ]] || ROWS="vae-1layer-k1 vae-1layer-k5 vae-1layer-k50 iwae-1layer-k5 iwae-1layer-k50 vae-2layer-k1 vae-2layer-k5 vae-2layer-k50 iwae-2layer-k5 iwae-2layer-k50"
OUT=${OUT:-runs/iwae-table1-$SCHEDULE-$VARIANT}
if [[ -z $TRAINER ]]; then
  TRAINER=target/release/trainer
  [[ -x $TRAINER ]] || cargo build --release --bin trainer
fi
mkdir -p "$OUT"

# One training run and its evaluation: train_row ROW RUN_NAME [SEED].
train_row() {
  local row=$1 name=$2 seed=${3:-}
  local cfg=$CONFIG_DIR/$row.toml run=$OUT/$2
  [[ -f $cfg ]] || { echo "error: no $cfg" >&2; exit 2; }
  local common=(--epochs "$PASSES" --json --threads "$THREADS" --set eval.final_k=0 --set train.sample_every=0)
  local flags=(--config "$cfg" --out "$run" "${common[@]}")
  [[ -n $seed ]] && flags+=(--seed "$seed")
  [[ -n $BATCH ]] && flags+=(--batch-size "$BATCH")
  [[ -f $run/latest ]] && flags=(--resume "$run" "${common[@]}")
  echo "=== $name ($VARIANT): $PASSES passes ($(date -u +%H:%M:%S))" >&2
  local t0 t1 t2 eval_dev=$DEVICE
  t0=$(date +%s)
  if [[ -n $GPUS ]]; then
    "$TRAINER" launch --gpus "$GPUS" -- "${flags[@]}" >"$run.train.json"
  else
    "$TRAINER" train --device "$DEVICE" "${flags[@]}" >"$run.train.json"
  fi
  t1=$(date +%s)
  [[ -n $GPUS ]] && eval_dev=cuda:${GPUS%%,*}
  "$TRAINER" eval --checkpoint "$run" --k 5000 --limit "$EVAL_LIMIT" --samples 0 --device "$eval_dev" \
    --threads "$THREADS" --json >"$run.eval.json"
  t2=$(date +%s)
  printf '{"row":"%s","seed":%s,"variant":"%s","passes":%s,"train_s":%s,"eval_s":%s}\n' \
    "$row" "${seed:-null}" "$VARIANT" "$PASSES" $((t1 - t0)) $((t2 - t1)) >"$run.time.json"
}

for row in $ROWS; do
  if [[ -z $SEEDS ]]; then
    train_row "$row" "$row"
  else
    for seed in $SEEDS; do train_row "$row" "$row-s$seed" "$seed"; done
  fi
done

# Every invocation into OUT, in order: the tables read every run in OUT, so they name them all.
printf 'scripts/reproduce_iwae.sh %s\n' "${ARGS% }" >>"$OUT/commands.txt"

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
runs = []
for t in sorted(out.glob("*.time.json")):
    name = t.name[: -len(".time.json")]
    tm = json.loads(t.read_text())
    row = tm.get("row", name)
    kind, layers, k = row.split("-")
    ev = json.loads((out / f"{name}.eval.json").read_text())
    nll = ev.get("nll")
    ref = paper[(layers[0], kind, int(k[1:]))]
    runs.append({"run": name, "row": row, "seed": tm.get("seed"), "variant": tm.get("variant", "default"),
                 "objective": kind, "layers": int(layers[0]), "k": int(k[1:]),
                 "passes": tm["passes"], "nll": nll, "nll_stderr": ev.get("nll_stderr"),
                 "test_elbo": ev.get("test_elbo"), "ess_fraction": ev.get("ess_fraction"),
                 "active_units": ev.get("active_units"),
                 "eval_images": ev.get("n"), "paper_nll": ref,
                 "gap": None if nll is None else round(nll - ref, 2),
                 "train_minutes": round(tm["train_s"] / 60, 1), "eval_minutes": round(tm["eval_s"] / 60, 1)})
runs.sort(key=lambda r: (r["layers"], r["objective"] == "iwae", r["k"], r["seed"] or 0))
# One line per row: the mean over its seeds, the sample standard deviation, the range.
rows = []
for key in dict.fromkeys((r["row"], r["variant"]) for r in runs):
    rs = [r for r in runs if (r["row"], r["variant"]) == key and r["nll"] is not None]
    if not rs:
        continue
    v = [r["nll"] for r in rs]
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None
    rows.append({"row": key[0], "variant": key[1], "layers": rs[0]["layers"], "objective": rs[0]["objective"],
                 "k": rs[0]["k"], "seeds": [r["seed"] for r in rs], "nll": [round(x, 2) for x in v],
                 "nll_mean": round(mean, 2), "nll_sd_over_seeds": None if sd is None else round(sd, 2),
                 "nll_stderr_over_images": round(max(r["nll_stderr"] for r in rs), 2),
                 "active_units": [r["active_units"] for r in rs], "paper_nll": rs[0]["paper_nll"],
                 "train_minutes": [r["train_minutes"] for r in rs]})
commands = list(dict.fromkeys((out / "commands.txt").read_text().splitlines()))
summary = {"machine": machine(), "device": device, "gpus": gpus, "passes": passes,
           "eval_limit": limit, "command": "scripts/reproduce_iwae.sh " + sys.argv[6].strip(),
           "commands": commands, "rows": rows, "runs": runs}
(out / "results.json").write_text(json.dumps(summary, indent=2))
md = [f"IWAE Table 1 reproduction: {passes} passes, {machine()}, eval k = 5000 on "
      f"{'all 10,000' if limit == 0 else f'the first {limit}'} test images.",
      "Commands (every invocation into this directory, in order):", "",
      *[f"- `{c}`" for c in commands], "",
      "| row | variant | seeds | NLL (nats): mean, sd over seeds | each seed | active units per layer | paper (3280 passes) | train (min) |",
      "| --- | --- | --- | ---: | --- | --- | ---: | --- |"]
for r in rows:
    sd = "" if r["nll_sd_over_seeds"] is None else f" (sd {r['nll_sd_over_seeds']:.2f})"
    seeds = ", ".join("-" if s is None else str(s) for s in r["seeds"])
    md.append(f"| {r['row']} | {r['variant']} | {seeds} | {r['nll_mean']:.2f}{sd} | "
              f"{', '.join(f'{x:.2f}' for x in r['nll'])} | {'; '.join(str(a) for a in r['active_units'])} | "
              f"{r['paper_nll']:.2f} | {', '.join(str(t) for t in r['train_minutes'])} |")
md.append("")
md.append(f"Image-level standard error of each NLL: at most {max(r['nll_stderr_over_images'] for r in rows):.2f} nats "
          "(the runs share the evaluation images, so differences between runs are more precise).")
(out / "results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
