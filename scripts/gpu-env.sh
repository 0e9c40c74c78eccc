# Sourced by the GPU scripts (gpu-check.sh, gpu-check-distributed.sh, bench_scaling.sh) on a
# machine with NVIDIA GPUs and no Rust:
#   * unpacks the carried trainer (target-cuda/carry/trainer.xz, made by scripts/build-cuda.sh)
#     to $TRAINER (default target-cuda/release/trainer) when it is not there yet;
#   * puts the CUDA 13 and NCCL libraries of PyTorch's pip packages on LD_LIBRARY_PATH
#     (GENTRAIN_CUDA_LIBS overrides the search), and stops with exit 2 if the trainer still has
#     unresolved libraries.
# libcuda.so.1 comes from the driver.
TRAINER=${TRAINER:-target-cuda/release/trainer}
if [[ ! -x $TRAINER && -f target-cuda/carry/trainer.xz ]]; then
  mkdir -p "$(dirname "$TRAINER")"
  xz -dc target-cuda/carry/trainer.xz >"$TRAINER" && chmod +x "$TRAINER"
fi
[[ -x $TRAINER ]] || { echo "error: $TRAINER missing: build it with scripts/build-cuda.sh and carry target-cuda/carry" >&2; exit 2; }
if [[ -z ${GENTRAIN_CUDA_LIBS:-} ]]; then
  NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
  if [[ -n $NV ]]; then
    for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13 libnccl.so.2; do
      d=$(find "$NV/nvidia" -name "$lib*" -printf '%h\n' 2>/dev/null | sort -u | head -1)
      [[ -n $d && ":${GENTRAIN_CUDA_LIBS:-}:" != *":$d:"* ]] && GENTRAIN_CUDA_LIBS="${GENTRAIN_CUDA_LIBS:+$GENTRAIN_CUDA_LIBS:}$d"
    done
  fi
fi
export GENTRAIN_CUDA_LIBS
export LD_LIBRARY_PATH="${GENTRAIN_CUDA_LIBS:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$TRAINER" | grep "not found" >&2; then
  echo "error: $TRAINER has unresolved libraries (above); set GENTRAIN_CUDA_LIBS" >&2
  exit 2
fi
