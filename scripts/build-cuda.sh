#!/usr/bin/env bash
# Builds the `trainer` binary with `--features cuda` into target-cuda/ (kept apart from the CPU
# build's target/ so the two never rebuild each other), on a machine without a GPU.
#
#   scripts/build-cuda.sh                 # release build of bin `trainer`, then the test
#                                         # executables named in PACK_TESTS (default gpu_kernels),
#                                         # all packed into target-cuda/carry
#   scripts/build-cuda.sh --tests         # extra args go to `cargo build` (after --bin trainer)
#   scripts/build-cuda.sh --test-exes     # instead: `cargo test --release --features cuda --no-run`,
#                                         # list the test executables' paths (further args go to
#                                         # `cargo test`, e.g. `--test gpu_kernels`), pack them
#
# Outputs (all under target-cuda/, which .gitignore ignores):
#   release/trainer            unstripped, as cargo leaves it (~134 MiB: debug line tables)
#   release/trainer-stripped   stripped copy (~57 MiB; 32 MiB of it is candle's sm_90a fatbin)
#   carry/trainer.xz           the stripped copy, xz-compressed (~8 MiB): what to carry to the
#                              GPU machine
#   test-exes.txt              one test executable path per line, also printed after the line
#                              `== test executables ==`
#   carry/tests/NAME.xz        stripped, xz-compressed copies of the test executables named in
#                              PACK_TESTS (default "gpu_kernels"; "all" packs every one, ~8 MiB
#                              each; "none" packs none)
# The device tool carries at most 64 MiB, working tree and carried folders together: the script
# ends with the sizes and fails when the tree plus target-cuda/carry exceed 60 MiB.
#
# On the GPU machine (carry: ["target-cuda/carry"]), from the repo root, the one command is
#   bash scripts/gpu-first-contact.sh          (timeout ~570 s; see docs/gpu-notes.md)
# which unpacks everything itself (scripts/gpu-env.sh: xz, or Python's lzma where there is no xz)
# and sets LD_LIBRARY_PATH to the CUDA 13 / NCCL libraries of PyTorch's pip packages; libcuda.so.1
# comes from the driver there. The packed gpu_kernels executable reads no path of the build
# machine (tests/gpu_kernels.rs uses neither env!("CARGO_MANIFEST_DIR") nor
# env!("CARGO_BIN_EXE_trainer")), so it runs from any checkout. A test executable that does use
# them (many of tests/ do, through tests/common; PACK_TESTS=all packs those too) has this
# machine's absolute paths (/work/main/...) baked in and runs elsewhere only from a checkout at
# the same path.
#
# Environment: GENTRAIN_CUDA_FEATURES (default nccl, which implies cuda; set cuda to build without
# NCCL), GENTRAIN_CUDA_PREFIX (as in cuda-toolchain.sh), CUDA_COMPUTE_CAP (default 90),
# CARGO_TARGET_DIR (default <repo>/target-cuda), PACK_TESTS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${GENTRAIN_CUDA_PREFIX:-$ROOT/.cuda-toolchain}
cd "$ROOT"

if [[ ! -f $PREFIX/env.sh ]]; then
  "$ROOT/scripts/cuda-toolchain.sh"
fi
# shellcheck disable=SC1091
source "$PREFIX/env.sh"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
# `nccl` implies `cuda` and adds multi-GPU data parallelism (links libnccl.so.2).
FEATURES=${GENTRAIN_CUDA_FEATURES:-nccl}
echo "[build-cuda] nvcc: $(command -v nvcc), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir: $CARGO_TARGET_DIR" >&2

CARRY=$CARGO_TARGET_DIR/carry
# pack SRC DEST.xz: strip, then xz (keeps carried files small).
pack() {
  local tmp
  tmp=$(mktemp "$CARGO_TARGET_DIR/.pack.XXXXXX")
  strip -o "$tmp" "$1"
  xz -T0 -3 -c "$tmp" >"$2.tmp" && mv "$2.tmp" "$2"
  rm -f "$tmp"
}
report() {
  stat -c '%s %n' "$@" | awk '{printf "%s: %d bytes (%.1f MiB)\n", $2, $1, $1 / 1048576}'
}

# build_tests [CARGO TEST ARGS]: builds test executables (`cargo test --no-run`), lists them in
# test-exes.txt and packs those named in PACK_TESTS into carry/tests (replacing what was there).
build_tests() {
  local list=$CARGO_TARGET_DIR/test-exes.txt want exe name base
  cargo test --release --features "$FEATURES" --no-run --message-format=json-render-diagnostics "$@" \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | sort -u >"$list"
  echo "== test executables =="
  cat "$list"
  rm -rf "$CARRY/tests"
  mkdir -p "$CARRY/tests"
  want=" ${PACK_TESTS:-gpu_kernels} "
  while read -r exe; do
    name=$(basename "$exe")
    [[ $exe == */deps/* ]] || continue          # the trainer bin itself: packed separately
    base=${name%-*}
    [[ $want == " all " || $want == *" $base "* ]] || continue
    pack "$exe" "$CARRY/tests/$base.xz"
  done <"$list"
}
# carry_report: sizes of what is carried; fails when the working tree (what git would carry:
# tracked and untracked, not ignored) plus the carry folder exceed 60 MiB of the 64 MiB limit.
carry_report() {
  local files carry tree
  echo "== packed for carrying ($CARRY) =="
  mapfile -t files < <(find "$CARRY" -type f | sort)
  ((${#files[@]})) && report "${files[@]}"
  carry=$(du -sb "$CARRY" | cut -f1)
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }') || true
  awk -v c="$carry" -v t="$tree" 'BEGIN { printf "carry %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB)\n", c / 1048576, t / 1048576, (c + t) / 1048576 }'
  if ((carry + tree > 60 * 1048576)); then
    echo "error: over 60 MiB: pack fewer test executables (PACK_TESTS) or shrink the tree" >&2
    return 1
  fi
}

if [[ ${1:-} == --test-exes ]]; then
  shift
  build_tests "$@"
  if [[ -x $CARGO_TARGET_DIR/release/trainer ]]; then
    pack "$CARGO_TARGET_DIR/release/trainer" "$CARRY/trainer.xz"
  fi
  carry_report
  exit
fi

cargo build --release --features "$FEATURES" --bin trainer "$@"

BIN=$CARGO_TARGET_DIR/release/trainer
OUT=$BIN-stripped
strip -o "$OUT" "$BIN"
mkdir -p "$CARRY"
xz -T0 -3 -c "$OUT" >"$CARRY/trainer.xz.tmp" && mv "$CARRY/trainer.xz.tmp" "$CARRY/trainer.xz"
echo "== trainer =="
report "$BIN" "$OUT" "$CARRY/trainer.xz"
echo "== ldd $OUT =="
ldd "$OUT" || true
if [[ ${PACK_TESTS:-gpu_kernels} != none ]]; then
  if [[ ${PACK_TESTS:-gpu_kernels} == all ]]; then build_tests; else
    # only the named test targets: --test NAME each
    tests=()
    for t in ${PACK_TESTS:-gpu_kernels}; do tests+=(--test "$t"); done
    build_tests "${tests[@]}"
  fi
else
  rm -rf "$CARRY/tests"
fi
carry_report
