#!/usr/bin/env bash
# Builds the `trainer` binary with `--features cuda` into target-cuda/ (kept apart from the CPU
# build's target/ so the two never rebuild each other), on a machine without a GPU.
#
#   scripts/build-cuda.sh                 # release build of bin `trainer`
#   scripts/build-cuda.sh --tests         # extra args go to `cargo build` (after --bin trainer)
#   scripts/build-cuda.sh --test-exes     # instead: `cargo test --release --features cuda --no-run`,
#                                         # list the test executables' paths (further args go to
#                                         # `cargo test`, e.g. `--test gpu_kernels`)
#
# Outputs (all under target-cuda/, which .gitignore ignores):
#   release/trainer            unstripped, as cargo leaves it (~134 MiB: debug line tables)
#   release/trainer-stripped   stripped copy (~57 MiB; 32 MiB of it is candle's sm_90a fatbin)
#   carry/trainer.xz           the stripped copy, xz-compressed (~8 MiB): what to carry to the
#                              GPU machine (run's carry limit is 64 MiB for the whole tree)
#   test-exes.txt              (--test-exes) one test executable path per line, also printed
#                              after the line `== test executables ==`
#   carry/tests/NAME.xz        (--test-exes) stripped, xz-compressed copies of the test
#                              executables named in PACK_TESTS (default "gpu_kernels"; "all"
#                              packs every one, ~8 MiB each)
#
# On the GPU machine (carry: ["target-cuda/carry"]), from the repo root:
#   mkdir -p target-cuda/release && xz -dc target-cuda/carry/trainer.xz >target-cuda/release/trainer
#   chmod +x target-cuda/release/trainer
#   export LD_LIBRARY_PATH=$(python3 -c "import nvidia,os;print(os.path.join(nvidia.__path__[0],'cu13','lib'))")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# libcuda.so.1 comes from the driver there. Test executables have env!("CARGO_MANIFEST_DIR") and
# env!("CARGO_BIN_EXE_trainer") baked in as absolute paths of the build machine
# (/work/main/...): on the GPU machine `mkdir -p /work && ln -sfn "$PWD" /work/main` first and
# unpack the trainer to target-cuda/release/trainer as above.
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

if [[ ${1:-} == --test-exes ]]; then
  shift
  list=$CARGO_TARGET_DIR/test-exes.txt
  cargo test --release --features "$FEATURES" --no-run --message-format=json-render-diagnostics "$@" \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | sort -u >"$list"
  echo "== test executables =="
  cat "$list"
  rm -rf "$CARRY/tests"
  mkdir -p "$CARRY/tests"
  want=" ${PACK_TESTS:-gpu_kernels} "
  while read -r exe; do
    name=$(basename "$exe")
    [[ $exe == */deps/* ]] || continue          # the trainer bin itself: packed below
    base=${name%-*}
    [[ $want == " all " || $want == *" $base "* ]] || continue
    pack "$exe" "$CARRY/tests/$base.xz"
  done <"$list"
  if [[ -x $CARGO_TARGET_DIR/release/trainer ]]; then
    pack "$CARGO_TARGET_DIR/release/trainer" "$CARRY/trainer.xz"
  fi
  echo "== packed for carrying ($CARRY) =="
  report $(find "$CARRY" -name '*.xz' | sort)
  du -sh "$CARRY"
  exit 0
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
