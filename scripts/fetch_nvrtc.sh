#!/usr/bin/env bash
# Fetch NVRTC (libnvrtc.so + its builtins) from the PyPI wheel nvidia-cuda-nvrtc-cu12 into the
# git-ignored .cache/nvrtc/, so the test suite can compile every kernel in kernels/ to CUBIN
# on a machine with no GPU and no CUDA toolkit. Idempotent; prints the library directory
# (put it on LD_LIBRARY_PATH). 12.8 is the first NVRTC that targets sm_120.
set -euo pipefail
cd "$(dirname "$0")/.."
ver=12.8.93
wheel=nvidia_cuda_nvrtc_cu12-$ver-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl
want=a7756528852ef889772a84c6cd89d41dfa74667e24cca16bb31f8f061e3e9994
dest=.cache/nvrtc/$ver
if [ "$(uname -m)" != x86_64 ]; then
  echo "fetch_nvrtc: only the x86_64 wheel is pinned here" >&2
  exit 1
fi
if [ ! -s "$dest/libnvrtc.so.12" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 \
    -d "$tmp" "nvidia-cuda-nvrtc-cu12==$ver" >&2
  got=$(sha256sum "$tmp/$wheel" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "fetch_nvrtc: $wheel has sha256 $got, expected $want" >&2
    exit 1
  fi
  mkdir -p "$dest.tmp"
  python3 - "$tmp/$wheel" "$dest.tmp" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in ("libnvrtc.so.12", "libnvrtc-builtins.so.12.8"):
        open(os.path.join(sys.argv[2], n), "wb").write(z.read("nvidia/cuda_nvrtc/lib/" + n))
PY
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  rm -rf "$tmp"
fi
echo "$PWD/$dest"
