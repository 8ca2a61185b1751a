#!/usr/bin/env bash
# Build, on a machine with the Rust toolchain, the binaries scripts/gpu_check.sh runs on a
# GPU machine that has no Rust (e.g. a bare CUDA image): the release `dsflash` and the test
# executables of tests/cuda_device.rs and tests/kernels_nvrtc.rs, stripped, into .gpu/
# (git-ignored). Carry .gpu/ with the checkout to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cargo build --release --locked
cp target/release/dsflash .gpu/dsflash
for t in cuda_device kernels_nvrtc; do
  exe=$(cargo test --release --locked --no-run --test "$t" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
  cp "$exe" ".gpu/$t"
done
strip .gpu/* 2>/dev/null || true
ls -la .gpu
