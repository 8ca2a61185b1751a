#!/usr/bin/env bash
# Install the official `openai` Python client (PyPI, pinned) into the git-ignored .cache/, for
# the tests of `dsflash serve` (tests/serve.rs runs tests/serve_openai.py with it). Idempotent.
# Prints the directory to put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.63.0
dest=.cache/openai-py/$version
if [ ! -f "$dest/.complete" ]; then
  rm -rf "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --no-input \
    --no-warn-conflicts --ignore-installed --target "$dest" "openai==$version" >&2
  touch "$dest/.complete"
fi
echo "$PWD/$dest"
