#!/usr/bin/env bash
# Every GPU check of gentrain in ONE command, for a lent GPU machine (no Rust there; python3 with
# PyTorch, NVIDIA driver, maybe no xz). Build here first (scripts/build-cuda.sh) and carry
# target-cuda/carry (trainer.xz and tests/gpu_kernels.xz); then, from the repository root there,
# with a wall timeout of about 570 s:
#
#     bash scripts/gpu-first-contact.sh [--dry-run-cpu] [--out DIR] [--budget SECONDS]
#
#   --out DIR        where the results go (default: $OUT when set, else bench/results/gpu-<date>
#                    under the repository root, with -dry-run-cpu appended for a dry run and
#                    -<time> when it exists); a relative DIR or $OUT is taken from the directory
#                    the script was called from
#   --budget S       seconds from the script's start that the steps may use (default 510); a
#                    step is skipped when less than its minimum is left, and each command's
#                    timeout is cut to what is left of its step's cap and of the budget. When the
#                    device tool's limit for the command (limit_s) is below 570 s, pass
#                    --budget <limit_s - 60> so that the script ends on its own
#   --dry-run-cpu    the same steps with the CPU build (target/release/trainer, from
#                    `cargo build --release`) on --device cpu at reduced sizes: checks every
#                    step's plumbing on any machine (CI runs it); what needs CUDA, NCCL,
#                    nvidia-smi, the carried test executable or PyTorch is reported as skipped,
#                    with the reason (the nccl step's names the outcome of its TCP stand-in,
#                    which fails the step when it fails); the kernels step, CPU against CPU
#                    there, says so in its reason
#
# Steps, by value (each has a minimum and a cap in seconds; a failing step is recorded and the
# next one runs):
#   1. preflight      unpack the carried trainer (scripts/gpu-env.sh), ldd -r, trainer --version,
#                     nvidia-smi, and whether PyTorch sees CUDA; unless it succeeds, overall is
#                     fail (nothing was checked) and the later steps need the trainer to run
#   2. kernels        every fused kernel, forward and backward, device against CPU with outputs
#                     poisoned: the carried gpu_kernels test executable (--ignored) and
#                     `trainer check-kernels --json` (a group that panicked is a failed entry
#                     "<group> (group)")
#   3. vae            the 10-epoch VAE (configs/vae-examples.toml) on cuda:0; its test NLL
#                     (k = 1000, 2000 images) must be within 0.5 nats of the CPU's 96.92
#                     (docs/results.md)
#   4. bench_kernels  kernel bandwidth against a device copy at 64M elements
#   5. flows_gans     one epoch each of configs/realnvp-moons.toml, sngan-grid25.toml and
#                     ddpm-grid25.toml, 300 steps (--max-steps) of sngan-dcgan-mnist.toml and
#                     200 of ddpm-mnist.toml (the U-Net) on cuda:0, then
#                     `trainer eval --json` on each (also on the checkpoint of a run that its
#                     time limit stopped: the trainer checkpoints on SIGTERM)
#   6. nccl           a world of 1 over NCCL (`trainer launch --gpus 0`) against the plain run,
#                     300 steps: the weights must agree within 1e-5 (relative); in a dry run the
#                     TCP stand-in (`launch --processes 1`) runs and the step reads skipped
#   7. pytorch        gentrain vs PyTorch eager on every case of scripts/bench_pytorch.py,
#                     one round of 200 steps
#   8. iwae           IWAE 1-layer k = 50 throughput at batch 20, 100, 250, 1000 and the paper's
#                     3280-pass schedule's projected wall-clock
#   9. torch_compile  torch.compile on vae-b128, if time remains
#
# Output (at most 7 files, flat; rewritten after every step, so a kill leaves the finished steps):
#   summary.json  per step: name, status (ok / fail / skipped / timeout), seconds, key figures,
#                 reason; machine (GPU, driver, trainer, torch), budget, total seconds, overall.
#                 Before a step starts it is recorded as timeout ("the script was stopped during
#                 this step") and the steps not yet reached as skipped, with overall incomplete,
#                 so files left by a kill (even SIGKILL) say where the script was stopped
#   results.md    the same as a readable table;  log.txt  every command and its output
#   kernels.json, training.json, bench.json, pytorch.json   the full JSON of steps 2, 3/5/6,
#                 4/8 and 7/9
# Run directories and scratch files live in a temporary folder outside DIR, removed at the end
# (GENTRAIN_KEEP_WORK=1 keeps it). Exit status: 0 when the preflight succeeded and no step
# failed or timed out, else 1 (overall fail); 2 for a bad command line.
set -uo pipefail
CALLER=$PWD # a relative --out or $OUT is relative to here, not to the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
START=$SECONDS
T0=$(date +%s.%N)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DRY=0 BUDGET=510 DIR=""
while (($#)); do
  case $1 in
    --dry-run-cpu) DRY=1; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "error: --out needs a folder" >&2; exit 2; }; DIR=$2; shift 2 ;;
    --out=*) DIR=${1#*=}; shift ;;
    --budget) [[ $# -ge 2 ]] || { echo "error: --budget needs seconds" >&2; exit 2; }; BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "error: --budget $BUDGET: expected whole seconds" >&2; exit 2; }
if [[ -n $DIR ]]; then
  [[ $DIR == /* ]] || DIR=$CALLER/$DIR
else
  if [[ -n ${OUT:-} ]]; then
    DIR=$OUT
    [[ $DIR == /* ]] || DIR=$CALLER/$DIR
  else
    DIR=bench/results/gpu-$(date -u +%Y-%m-%d)
    ((DRY)) && DIR=$DIR-dry-run-cpu
    [[ -e $DIR ]] && DIR=$DIR-$(date -u +%H%M%S)
  fi
fi
if ! mkdir -p "$DIR" || ! DIR=$(cd "$DIR" && pwd); then echo "error: cannot create $DIR" >&2; exit 2; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-first-contact.XXXXXX") || exit 2
case $WORK/ in "$DIR"/*) echo "error: the temporary folder $WORK is inside $DIR" >&2; exit 2 ;; esac
LOG=$DIR/log.txt
: >"$LOG"
STEPS=preflight,kernels,vae,bench_kernels,flows_gans,nccl,pytorch,iwae,torch_compile
if ((DRY)); then MODE=dry-run-cpu DEV=cpu; else MODE=gpu DEV=cuda:0; fi

# ------------------------------------------------------------------------------- helpers
py() { python3 "$ROOT/scripts/gpu_first_contact.py" "$@" --dir "$DIR"; }
say() { printf '%s\n' "$*" | tee -a "$LOG"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
left() { local l=$((BUDGET - (SECONDS - START))); echo $((l < 0 ? 0 : l)); }

# clip FILE: the file, long outputs cut to their first 60 and last 200 lines, lines to 2000 chars.
clip() {
  local n
  n=$(wc -l <"$1")
  if ((n > 300)); then
    head -n 60 "$1" | cut -c1-2000
    echo "[... $((n - 260)) lines cut ...]"
    tail -n 200 "$1" | cut -c1-2000
  else
    cut -c1-2000 "$1"
  fi
}

STEP="" STEP_DIR="" STEP_T0="" STEP_END=0 CHILD=""
# begin NAME MIN CAP: starts a step that needs at least MIN s and may take at most CAP s;
# returns 1 (the step recorded as skipped) when less than MIN s of the budget is left.
begin() {
  local name=$1 min=$2 cap=$3 l
  l=$(left)
  if ((l < min)); then
    py skip --step "$name" --reason "budget: $l s left of $BUDGET s, the step needs at least $min s"
    say "=== $name: skipped (budget: $l s left, needs $min s)"
    return 1
  fi
  STEP=$name STEP_DIR=$WORK/$name STEP_T0=$(now)
  mkdir -p "$STEP_DIR"
  STEP_END=$((SECONDS + (cap < l ? cap : l)))
  py start --step "$name" --cap "$cap"
  say ""
  say "=== $name ($(date -u +%H:%M:%S) UTC, $l s of the budget left, step cap $cap s)"
}
# skip_step NAME REASON: records a step as skipped without starting it.
skip_step() {
  py skip --step "$1" --reason "$2"
  say ""
  say "=== $1: skipped ($2)"
}
# end_step: parses the step's outputs into the result files and prints its status.
end_step() {
  py finish --step "$STEP" --work "$WORK" --seconds "$(since "$STEP_T0")"
  say "=== $STEP: $(python3 -c 'import json, sys
s = next(x for x in json.load(open(sys.argv[1]))["steps"] if x["name"] == sys.argv[2])
print(s["status"], "(%.1f s)" % (s["seconds"] or 0), ("- " + s["reason"][:600]) if s["reason"] else "")' \
    "$DIR/summary.json" "$STEP")"
  STEP=""
}
# skip_sub LABEL REASON: a command of the step that is not run (a note, not a failure).
skip_sub() {
  echo "$2" >"$STEP_DIR/$1.skip"
  say "--- $1: skipped ($2)"
}
# mark LABEL RC: records a step part run in this shell (its .out/.err written by the caller).
mark() {
  echo "$2" >"$STEP_DIR/$1.rc"
  echo 0 >"$STEP_DIR/$1.secs"
  say "--- $1: exit $2"
  for f in "$STEP_DIR/$1.out" "$STEP_DIR/$1.err"; do [[ -s $f ]] && clip "$f" >>"$LOG"; done
}
# sub LABEL CAP CMD...: runs CMD under `timeout` with at most CAP s (less when the step's cap or
# the budget ends sooner); leaves LABEL.{cmd,out,err,rc,secs} in the step's folder and the
# output in the log; returns CMD's exit status (124/137: timed out; 125: no time was left).
sub() {
  local label=$1 cap=$2 t l t0 rc
  shift 2
  t=$cap
  l=$((STEP_END - SECONDS)); ((l < t)) && t=$l
  l=$(left); ((l < t)) && t=$l
  if ((t < 2)); then
    skip_sub "$label" "no time left in the step or the budget"
    return 125
  fi
  printf '%q ' "$@" >"$STEP_DIR/$label.cmd"
  say "--- $label (timeout $t s): $(cat "$STEP_DIR/$label.cmd")"
  t0=$(now)
  timeout -k 10 "$t" "$@" >"$STEP_DIR/$label.out" 2>"$STEP_DIR/$label.err" </dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  echo "$rc" >"$STEP_DIR/$label.rc"
  since "$t0" >"$STEP_DIR/$label.secs"
  say "--- $label: exit $rc after $(cat "$STEP_DIR/$label.secs") s$( ((rc == 124 || rc == 137)) && echo " (timed out)")"
  {
    [[ -s $STEP_DIR/$label.out ]] && { echo "[stdout]"; clip "$STEP_DIR/$label.out"; }
    [[ -s $STEP_DIR/$label.err ]] && { echo "[stderr]"; clip "$STEP_DIR/$label.err"; }
  } >>"$LOG"
  return "$rc"
}

finish_all() {
  local total rc files
  total=$(since "$T0")
  rc=$(py close --seconds "$total") || rc=1
  [[ $rc == 0 ]] || rc=1
  say ""
  # The device tool brings back at most 8 files, two folders deep: this script writes 7, flat.
  files=$(find "$DIR" -mindepth 1 | wc -l)
  if ((files > 8)) || [[ -n $(find "$DIR" -mindepth 1 -type d) ]]; then
    say "error: $DIR holds $files entries or a folder (at most 8 files, flat, come back)"
    rc=1
  fi
  say "=== done in $total s (budget $BUDGET s), exit $rc; results in $DIR:"
  say "$(find "$DIR" -mindepth 1 -printf '%f ')"
  sed -n '1,/^## Key figures/p' "$DIR/results.md"
  if [[ ${GENTRAIN_KEEP_WORK:-0} == 1 ]]; then say "scratch kept in $WORK"; else rm -rf "$WORK"; fi
  return "$rc"
}
# shellcheck disable=SC2317  # (invoked by the traps below)
on_signal() {
  trap - TERM INT
  say "=== stopped by SIG$1 during ${STEP:-no step}"
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null
  finish_all
  exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

TRAINER_OK=0 TORCH_CUDA=0 TORCH_WHY="PyTorch not probed (the preflight step did not run)"
NO_TRAINER="the preflight step did not run (budget), so the trainer was never set up"
# need_trainer NAME: 0 when the trainer runs; else records the step as skipped.
need_trainer() {
  ((TRAINER_OK)) && return 0
  skip_step "$1" "$NO_TRAINER"
  return 1
}

py init --mode "$MODE" --budget "$BUDGET" --steps "$STEPS" || { echo "error: cannot write $DIR" >&2; exit 2; }
py set-machine "mode=$MODE" "device=$DEV" "repo=$ROOT"
say "gpu-first-contact: mode $MODE, device $DEV, budget $BUDGET s, results in $DIR, scratch in $WORK"

# ----------------------------------------------------------------------------- 1. preflight
TORCH_PROBE='import importlib, json, sys
r = {"python": sys.version.split()[0]}
for m in ("numpy", "safetensors"):
    try:
        r[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        r[m] = "missing: %s" % e
try:
    import torch
    r.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if r["cuda_available"]:
        r["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as e:
    r["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(r))'
if begin preflight 10 90; then
  NO_TRAINER="the trainer does not run (see the preflight step)"
  if ((DRY)); then
    TRAINER=${TRAINER:-target/release/trainer}
    if [[ -x $TRAINER ]]; then
      echo "CPU build: $TRAINER" >"$STEP_DIR/env.out"
      mark env 0
    else
      echo "error: $TRAINER missing: run cargo build --release first" >"$STEP_DIR/env.err"
      mark env 2
    fi
  else
    # In this shell: gpu-env.sh exports TRAINER and LD_LIBRARY_PATH and defines gt_unxz.
    # shellcheck source=scripts/gpu-env.sh
    { source scripts/gpu-env.sh; } >"$STEP_DIR/env.out" 2>"$STEP_DIR/env.err"
    rc=$?
    echo "TRAINER=${TRAINER:-}; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$STEP_DIR/env.out"
    mark env "$rc"
  fi
  py set-machine "trainer=${TRAINER:-}"
  if [[ -n ${TRAINER:-} && -x $TRAINER ]]; then
    sub ldd 30 ldd -r "$TRAINER"
    sub version 30 "$TRAINER" --version && TRAINER_OK=1
  fi
  if ((!DRY)); then
    sub nvidia-smi-query 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    sub nvidia-smi 30 nvidia-smi
  fi
  sub torch 60 python3 -c "$TORCH_PROBE"
  if grep -q '"cuda_available": true' "$STEP_DIR/torch.out" 2>/dev/null; then
    TORCH_CUDA=1
  else
    TORCH_WHY="PyTorch does not see CUDA: $(python3 -c 'import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(r.get("error") or "torch %s, CUDA %s, cuda_available %s" % (r.get("torch"), r.get("cuda"), r.get("cuda_available")))
except Exception as e:
    print("no probe result (%s)" % e)' "$STEP_DIR/torch.out" 2>&1 | head -c 300)"
  fi
  end_step
fi

# ------------------------------------------------------------------------------- 2. kernels
if need_trainer kernels && begin kernels 20 150; then
  if ((DRY)); then
    skip_sub gpu_kernels "dry run: needs CUDA and the carried test executable"
  elif [[ -f target-cuda/carry/tests/gpu_kernels.xz ]]; then
    # Unpacked beside the trainer (an ignored build folder, not /tmp, which may be noexec).
    exe=target-cuda/release/gpu_kernels
    if [[ -x $exe && ! target-cuda/carry/tests/gpu_kernels.xz -nt $exe ]] ||
      gt_unxz target-cuda/carry/tests/gpu_kernels.xz "$exe" 2>>"$LOG"; then
      # tests/gpu_kernels.rs reads no path (no CARGO_MANIFEST_DIR, no CARGO_BIN_EXE_trainer):
      # the executable runs from any folder, with nothing to link or create outside the checkout.
      sub gpu_kernels 75 "$exe" --ignored --test-threads=1
    else
      echo "cannot unpack target-cuda/carry/tests/gpu_kernels.xz" >"$STEP_DIR/gpu_kernels.err"
      mark gpu_kernels 2
    fi
  else
    skip_sub gpu_kernels "target-cuda/carry/tests/gpu_kernels.xz was not carried (scripts/build-cuda.sh packs it)"
  fi
  sub check_kernels 75 "$TRAINER" check-kernels --device "$DEV" --json
  end_step
fi

# ----------------------------------------------------------------------------------- 3. vae
if need_trainer vae && begin vae 40 150; then
  small=()
  ((DRY)) && small=(--epochs 1 --set eval.final_k=20 --set eval.final_limit=200)
  sub train 150 "$TRAINER" train --config configs/vae-examples.toml --device "$DEV" \
    --out "$WORK/runs/vae" --json "${small[@]}"
  end_step
fi

# ------------------------------------------------------------------------- 4. bench_kernels
if need_trainer bench_kernels && begin bench_kernels 15 60; then
  if ((DRY)); then n=200704 r=3; else n=67108864 r=20; fi
  sub bench 60 "$TRAINER" bench-kernels --device "$DEV" --elements "$n" --repeats "$r" --json
  end_step
fi

# ---------------------------------------------------------------------------- 5. flows_gans
if need_trainer flows_gans && begin flows_gans 40 260; then
  models="realnvp-moons sngan-grid25 sngan-dcgan-mnist ddpm-grid25 ddpm-mnist"
  echo "$models" >"$STEP_DIR/models"
  # One epoch is 79 steps of realnvp-moons and 200 of sngan-grid25 (each well under 10 s even on
  # the 2-core development CPU) and 938 of sngan-dcgan-mnist (about 220 ms a step on that CPU):
  # the DCGAN stops after 300 steps with a checkpoint (--max-steps), which ends cleanly within
  # its 90 s unless the GPU is slower than that CPU. Should a run still reach its time limit, the
  # trainer catches the SIGTERM, checkpoints and prints its summary ("interrupted": true): its
  # steps and samples/s are kept and that checkpoint is evaluated.
  for m in $models; do
    run=$WORK/runs/$m
    if ((DRY)); then
      steps=20; [[ $m == sngan-dcgan-mnist || $m == ddpm-mnist ]] && steps=4
      short=(--max-steps "$steps") evalf=(--samples 200) tcap=60
      # --limit bounds a likelihood; a GAN has none and refuses the flag.
      [[ $m == sngan-* ]] || evalf+=(--limit 500)
      [[ $m == ddpm-* ]] && evalf=(--samples 200 --limit 50 --t-draws 4 --steps 5)
    else
      short=() evalf=(--samples 2000) tcap=45
      [[ $m == sngan-dcgan-mnist ]] && short=(--max-steps 300) tcap=90
      # The diffusion bound costs 17 network passes per image (16 strata + L_0): 1000 images.
      [[ $m == ddpm-* ]] && evalf=(--samples 2000 --limit 1000)
      [[ $m == ddpm-mnist ]] && short=(--max-steps 200) tcap=60
    fi
    sub "train-$m" "$tcap" "$TRAINER" train --config "configs/$m.toml" --device "$DEV" --epochs 1 \
      --out "$run" --json "${short[@]}"
    rc=$?
    if ((rc == 0)) || { ((rc == 124 || rc == 137)) && [[ -s $run/latest ]]; }; then
      ((rc == 0)) || say "--- train-$m: stopped by its time limit; evaluating its checkpoint $(cat "$run/latest")"
      sub "eval-$m" 45 "$TRAINER" eval --checkpoint "$run" --device "$DEV" --json "${evalf[@]}"
    elif ((rc == 125)); then
      skip_sub "eval-$m" "no time left in the step or the budget"
    elif ((rc == 124 || rc == 137)); then
      skip_sub "eval-$m" "training was stopped by its time limit before it wrote a checkpoint"
    else
      skip_sub "eval-$m" "training failed (exit $rc)"
    fi
  done
  end_step
fi

# ---------------------------------------------------------------------------------- 6. nccl
if need_trainer nccl && begin nccl 25 100; then
  if ((DRY)); then steps=30 placement=(--processes 1); else steps=300 placement=(--gpus 0); fi
  flags=(--config configs/vae-examples.toml --epochs 1000 --max-steps "$steps" --set train.eval_every=0
         --set eval.final_k=0 --set train.sample_every=0 --json)
  echo "$WORK/runs/plain $WORK/runs/group1" >"$STEP_DIR/runs"
  echo "$steps" >"$STEP_DIR/steps"
  sub plain 45 "$TRAINER" train --device "$DEV" --out "$WORK/runs/plain" "${flags[@]}"
  sub group 55 "$TRAINER" launch "${placement[@]}" -- --out "$WORK/runs/group1" "${flags[@]}"
  end_step
fi

# ------------------------------------------------------------------------------- 7. pytorch
bench_pt=(python3 scripts/bench_pytorch.py --trainer "${TRAINER:-target-cuda/release/trainer}"
          --device cuda:0 --repeats 1)
if ((DRY)); then
  if begin pytorch 5 60; then
    echo "dry run: needs PyTorch with CUDA (the GPU machine has it); its command lines were checked with bench_pytorch.py --dry-run (in pytorch.json)" \
      >"$STEP_DIR/skipped"
    sub dry_run 30 "${bench_pt[@]}" --steps 20 --warmup 2 --no-compile --dry-run \
      --out-dir "$STEP_DIR/pt" --name eager
    end_step
  fi
elif ((!TORCH_CUDA)); then
  skip_step pytorch "$TORCH_WHY"
elif need_trainer pytorch && begin pytorch 60 160; then
  sub bench_pytorch 160 "${bench_pt[@]}" --steps 200 --warmup 20 --no-compile --timeout 60 \
    --out-dir "$STEP_DIR/pt" --name eager
  end_step
fi

# ---------------------------------------------------------------------------------- 8. iwae
if need_trainer iwae && begin iwae 20 90; then
  if ((DRY)); then batches="20 100 250 1000" s=2 w=1; else batches="20 100 250 1000" s=300 w=30; fi
  echo "$batches" >"$STEP_DIR/batches"
  for b in $batches; do
    sub "b$b" 25 "$TRAINER" bench --config configs/iwae-table1/iwae-1layer-k50.toml --device "$DEV" \
      --batch-size "$b" --steps "$s" --warmup "$w" --json
  done
  end_step
fi

# ------------------------------------------------------------------------- 9. torch_compile
if ((DRY)); then
  skip_step torch_compile "dry run: needs PyTorch with CUDA"
elif ((!TORCH_CUDA)); then
  skip_step torch_compile "$TORCH_WHY"
elif need_trainer torch_compile && begin torch_compile 75 130; then
  sub bench_pytorch 130 "${bench_pt[@]}" --cases vae-b128 --variants compile --steps 200 \
    --warmup 30 --timeout 120 --out-dir "$STEP_DIR/pt" --name compile
  end_step
fi

finish_all
exit $?
