#!/usr/bin/env bash
# Installs what building `--features cuda` needs on a machine with no GPU and no system CUDA:
#   * CUDA 13.0 pieces (nvcc, runtime, cuBLAS, cuRAND, NVRTC, headers) and NCCL 2.27 (for
#     `--features nccl`; the GPU machine's PyTorch brings its own libnccl.so.2) from PyPI into a venv,
#     pinned to 13.0 because the GPU machines run driver 580 (PTX from nvcc > 13.0 is rejected);
#   * unversioned lib*.so links so that `-lcublas` etc. resolve at link time;
#   * a link-time stub libcuda.so (soname libcuda.so.1) generated from the cudarc version in
#     Cargo.lock (candle turns on cudarc's `dynamic-linking`, so the binary links libcuda
#     directly; the real one comes from the driver on the GPU machine);
#   * <prefix>/env.sh to source before `cargo build --features cuda`.
# Idempotent: each step is skipped when its result is already there and up to date.
#
# Environment:
#   GENTRAIN_CUDA_PREFIX  where to install (default: <repo>/.cuda-toolchain)
#   CUDA_COMPUTE_CAP      default compute capability written into env.sh (default 90; env.sh
#                         keeps an already-set value at source time)
#   PYTHON                python used to create the venv (default python3)
# See shared/docs/cuda-build.md for the recipe this follows.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${GENTRAIN_CUDA_PREFIX:-$ROOT/.cuda-toolchain}
VENV=$PREFIX/venv
PYTHON=${PYTHON:-python3}
DEFAULT_CAP=${CUDA_COMPUTE_CAP:-90}

PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  "nvidia-cuda-cccl==13.0.*"
  nvidia-nccl-cu13==2.27.7
)

log() { printf '[cuda-toolchain] %s\n' "$*" >&2; }
mkdir -p "$PREFIX"

# --- 1. venv + pinned CUDA 13.0 wheels --------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  log "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PKG_STAMP=$PREFIX/.pkgs
if [[ -f $PKG_STAMP ]] && [[ "$(cat "$PKG_STAMP")" == "${PKGS[*]}" ]]; then
  log "CUDA wheels already installed (${PKG_STAMP})"
else
  log "installing ${PKGS[*]} (about 1.2 GB)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q "${PKGS[@]}"
  printf '%s' "${PKGS[*]}" >"$PKG_STAMP"
fi

CU13=$("$VENV/bin/python" - <<'EOF'
import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13")
    if os.path.isdir(d):
        print(d); break
EOF
)
[[ -n $CU13 && -x $CU13/bin/nvcc ]] || { log "no cu13/bin/nvcc under the venv's nvidia package"; exit 1; }
LIB=$CU13/lib

# --- 2. unversioned links ---------------------------------------------------------------------
for name in cublas cublasLt cudart nvrtc curand; do
  [[ -e $LIB/lib$name.so ]] && continue
  target=$(cd "$LIB" && ls "lib$name.so."* 2>/dev/null | grep -E "^lib$name\.so\.[0-9]+$" | sort -V | tail -1 || true)
  [[ -n $target ]] || { log "no lib$name.so.<N> in $LIB"; exit 1; }
  ln -sfn "$target" "$LIB/lib$name.so"
  log "linked lib$name.so -> $target"
done

NCCL_LIB=$("$VENV/bin/python" - <<'EOF'
import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "nccl", "lib")
    if os.path.isdir(d):
        print(d); break
EOF
)
[[ -n $NCCL_LIB && -e $NCCL_LIB/libnccl.so.2 ]] || { log "no nccl/lib/libnccl.so.2 under the venv's nvidia package"; exit 1; }
[[ -e $NCCL_LIB/libnccl.so ]] || { ln -sfn libnccl.so.2 "$NCCL_LIB/libnccl.so"; log "linked libnccl.so -> libnccl.so.2"; }

# --- 3. libcuda.so link stub from cudarc's driver bindings -------------------------------------
CUDARC_VER=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3; exit}' "$ROOT/Cargo.lock")
[[ -n $CUDARC_VER ]] || { log "cudarc not in Cargo.lock"; exit 1; }
STUB_DIR=$PREFIX/stub
STUB_STAMP=$STUB_DIR/.cudarc-version
if [[ -f $STUB_DIR/libcuda.so && -f $STUB_STAMP && "$(cat "$STUB_STAMP")" == "$CUDARC_VER" ]]; then
  log "libcuda.so stub for cudarc $CUDARC_VER already built"
else
  REG=${CARGO_HOME:-$HOME/.cargo}/registry/src
  find_sys() { ls -d "$REG"/*/"cudarc-$CUDARC_VER"/src/driver/sys/mod.rs 2>/dev/null | head -1 || true; }
  SYS=$(find_sys)
  if [[ -z $SYS ]]; then
    log "cargo fetch (to get cudarc-$CUDARC_VER's source)"
    (cd "$ROOT" && cargo fetch --locked -q) || log "cargo fetch --locked failed; looking in the registry cache"
    SYS=$(find_sys)
  fi
  if [[ -z $SYS ]]; then
    # Only some crates are unpacked by `cargo fetch` on some cargo versions; unpack the .crate.
    CRATE=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"cudarc-$CUDARC_VER.crate" 2>/dev/null | head -1 || true)
    [[ -n $CRATE ]] || { log "cudarc-$CUDARC_VER not in the cargo registry after cargo fetch"; exit 1; }
    mkdir -p "$PREFIX/src" && tar -xzf "$CRATE" -C "$PREFIX/src"
    SYS=$PREFIX/src/cudarc-$CUDARC_VER/src/driver/sys/mod.rs
  fi
  [[ -f $SYS ]] || { log "missing $SYS"; exit 1; }
  mkdir -p "$STUB_DIR"
  grep -ohE '^\s*pub unsafe fn cu[A-Za-z0-9_]+' "$SYS" | awk '{print $4}' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' >"$STUB_DIR/stub.c"
  n=$(wc -l <"$STUB_DIR/stub.c")
  [[ $n -gt 100 ]] || { log "only $n driver symbols found in $SYS: the bindings' layout changed"; exit 1; }
  gcc -shared -fPIC -o "$STUB_DIR/libcuda.so" "$STUB_DIR/stub.c" -Wl,-soname,libcuda.so.1
  printf '%s' "$CUDARC_VER" >"$STUB_STAMP"
  log "built $STUB_DIR/libcuda.so ($n symbols, cudarc $CUDARC_VER)"
fi

# --- 4. env.sh --------------------------------------------------------------------------------
# The stub directory goes on LIBRARY_PATH only (link time), never on LD_LIBRARY_PATH, so nothing
# ever tries to run against the stub.
ENV_SH=$PREFIX/env.sh
cat >"$ENV_SH.tmp" <<EOF
# Generated by scripts/cuda-toolchain.sh: source before building with --features cuda.
export CUDA_HOME="$CU13"
export CUDA_ROOT="$CU13"
export CUDA_PATH="$CU13"
export NVCC="$CU13/bin/nvcc"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-$DEFAULT_CAP}"
case ":\$PATH:" in *":$CU13/bin:"*) ;; *) export PATH="$CU13/bin:\$PATH" ;; esac
export LIBRARY_PATH="$LIB:$NCCL_LIB:$STUB_DIR\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$LIB:$NCCL_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export GENTRAIN_CUDA_STUB_DIR="$STUB_DIR"
EOF
if [[ -f $ENV_SH ]] && cmp -s "$ENV_SH" "$ENV_SH.tmp"; then
  rm "$ENV_SH.tmp"
else
  mv "$ENV_SH.tmp" "$ENV_SH"
  log "wrote $ENV_SH"
fi
"$CU13/bin/nvcc" --version | tail -2 >&2
rel=${ENV_SH#"$ROOT"/}
echo "source $rel"
