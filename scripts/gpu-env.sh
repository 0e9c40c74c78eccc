# shellcheck shell=bash
# Sourced by the GPU scripts (gpu-first-contact.sh, bench_scaling.sh) on a machine with NVIDIA
# GPUs and no Rust:
#   * defines gt_unxz SRC DEST: decompresses an .xz file with `xz` when there is one, else with
#     Python's lzma module (the GPU machines may have no xz binary), through DEST.tmp so that an
#     interrupted unpack never leaves a truncated executable; DEST is made executable;
#   * unpacks the carried trainer (target-cuda/carry/trainer.xz, made by scripts/build-cuda.sh)
#     to $TRAINER (default target-cuda/release/trainer) when it is not there yet or the carried
#     copy is newer (a warm machine may keep an older unpacked trainer between calls);
#   * puts the CUDA 13 and NCCL libraries of PyTorch's pip packages on LD_LIBRARY_PATH
#     (GENTRAIN_CUDA_LIBS overrides the search), and fails (return 2 when sourced, which stops a
#     `set -e` caller) if the trainer is missing or still has unresolved libraries.
# libcuda.so.1 comes from the driver.

gt_unxz() {
  local src=$1 dest=$2
  mkdir -p "$(dirname "$dest")" || return 1
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$src" >"$dest.tmp" || { rm -f "$dest.tmp"; return 1; }
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$src" "$dest.tmp" || { rm -f "$dest.tmp"; return 1; }
  fi
  chmod +x "$dest.tmp" && mv -f "$dest.tmp" "$dest"
}

gt_env_main() {
  TRAINER=${TRAINER:-target-cuda/release/trainer}
  local carried=target-cuda/carry/trainer.xz
  if [[ -f $carried && ( ! -x $TRAINER || $carried -nt $TRAINER ) ]]; then
    echo "unpacking $carried to $TRAINER" >&2
    gt_unxz "$carried" "$TRAINER" || { echo "error: cannot unpack $carried" >&2; return 2; }
  fi
  [[ -x $TRAINER ]] || { echo "error: $TRAINER missing: build it with scripts/build-cuda.sh and carry target-cuda/carry" >&2; return 2; }
  export TRAINER
  if [[ -z ${GENTRAIN_CUDA_LIBS:-} ]]; then
    local nv lib d
    nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
    if [[ -n $nv ]]; then
      for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13 libnccl.so.2; do
        d=$(find "$nv/nvidia" -name "$lib*" -printf '%h\n' 2>/dev/null | sort -u | head -1)
        [[ -n $d && ":${GENTRAIN_CUDA_LIBS:-}:" != *":$d:"* ]] && GENTRAIN_CUDA_LIBS="${GENTRAIN_CUDA_LIBS:+$GENTRAIN_CUDA_LIBS:}$d"
      done
    fi
  fi
  export GENTRAIN_CUDA_LIBS
  if [[ -n ${GENTRAIN_CUDA_LIBS:-} && ":${LD_LIBRARY_PATH:-}:" != *":$GENTRAIN_CUDA_LIBS:"* ]]; then
    export LD_LIBRARY_PATH="$GENTRAIN_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  if ldd "$TRAINER" | grep "not found" >&2; then
    echo "error: $TRAINER has unresolved libraries (above); set GENTRAIN_CUDA_LIBS" >&2
    return 2
  fi
  return 0
}

# A sourced file's `return` leaves only this file; run directly (bash scripts/gpu-env.sh), exit.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  gt_env_main || return $?
else
  gt_env_main || exit $?
fi
