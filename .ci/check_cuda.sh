#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc against the installed torch's headers.
# CI has nvcc but no GPU and a CPU torch, so the CUDA kernels are built nowhere else there;
# this catches syntax, template and API errors before a GPU machine sees the code.
# Exits non-zero if any file fails. Needs: python with torch, nvcc on PATH (or $NVCC).
# Optional: CUDA_ARCH (default sm_90, the H100/H200 the GPU tests run on).
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
ARCH="${CUDA_ARCH:-sm_90}"
command -v "$NVCC" >/dev/null || { echo "check_cuda: nvcc not found (set NVCC)" >&2; exit 2; }

mapfile -t INCLUDES < <(python -c 'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')
INCLUDE_FLAGS=()
for dir in "${INCLUDES[@]}"; do INCLUDE_FLAGS+=(-I "$dir"); done

shopt -s nullglob
SOURCES=(csrc/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then echo "check_cuda: no csrc/*.cu files"; exit 0; fi

OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
failed=0
for src in "${SOURCES[@]}"; do
  echo "check_cuda: $src"
  # The CPU wheel ships no cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
  if ! "$NVCC" -c "$src" -o "$OUT_DIR/$(basename "$src").o" -std=c++20 --expt-relaxed-constexpr \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DDCR_FAST_WITH_CUDA -arch="$ARCH" -I csrc "${INCLUDE_FLAGS[@]}"; then
    echo "check_cuda: FAILED $src" >&2
    failed=1
  fi
done
exit "$failed"
