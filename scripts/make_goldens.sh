#!/usr/bin/env bash
# Regenerate the committed oracle fixtures (needs the oracle venv: ../shared/oracle/setup.sh).
# Byte-identical on every run (the oracle is seeded). Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/dsv4-oracle/bin/python}
O=../shared/oracle
F=tests/fixtures
tmp=$(mktemp -d)
# tiny/: the oracle's default model and goldens (prompts 6/131/500, 16 greedy tokens).
$PY $O/make_tiny.py --out "$tmp/tiny"
cp "$tmp"/tiny/* $F/tiny/
# goldens/tiny-a: same checkpoint (same seed), prompts 1/5/131/640, 32 greedy tokens.
$PY $O/make_tiny.py --out "$tmp/a" --prompts p1=1,p5=5,p131=131,p640=640 --new-tokens 32
cmp "$tmp/a/model-00001-of-00002.safetensors" $F/tiny/model-00001-of-00002.safetensors
cp "$tmp/a/goldens.safetensors" $F/goldens/tiny-a.safetensors
cp "$tmp/a/goldens.json" $F/goldens/tiny-a.json
# tiny-b: hidden 384, 6 heads / 3 groups, 16 experts top-4, 1 hash layer, CSA first, index_topk 8.
$PY $O/make_tiny.py --out "$tmp/b" --seed 11 --config-overrides $F/tiny-b/overrides.json \
    --prompts p1=1,p5=5,p131=131,p700=700 --new-tokens 32
# tiny-c: head_dim 256, 8 heads / 4 groups, window 64, 12 experts top-3, 3 hash layers,
# index_head_dim 64, index_topk 24.
$PY $O/make_tiny.py --out "$tmp/c" --seed 23 --config-overrides $F/tiny-c/overrides.json \
    --prompts p1=1,p5=5,p131=131,p600=600 --new-tokens 32
for x in b c; do
  cp "$tmp/$x"/{config.json,model-00001-of-00002.safetensors,model-00002-of-00002.safetensors,model.safetensors.index.json,goldens.safetensors,goldens.json} $F/tiny-$x/
done
rm -rf "$tmp"
# tiny-vocab: the full 129,280 vocabulary (pairs with the real tokenizer for CLI tests), D 64,
# 3 layers. Only the checkpoint and goldens.json (greedy tokens) are kept: the full-vocab logits
# would be 20+ MB.
tmp=$(mktemp -d)
$PY $O/make_tiny.py --out "$tmp/v" --seed 31 --config-overrides $F/tiny-vocab/overrides.json \
    --prompts p5=5,p40=40 --new-tokens 8
cp "$tmp/v"/{config.json,model-00001-of-00002.safetensors,model-00002-of-00002.safetensors,model.safetensors.index.json,goldens.json} $F/tiny-vocab/
rm -rf "$tmp"
