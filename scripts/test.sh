#!/usr/bin/env bash
# The project's test command (README, .ci/run). Runs on a fresh machine with only the Rust
# toolchain: no GPU, no CUDA toolkit, no PyTorch. Fixtures are committed under tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-targets --features traps "$@"
