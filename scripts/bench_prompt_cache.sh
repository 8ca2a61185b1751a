#!/usr/bin/env bash
# The prompt cache, measured: two one-shot runs over the same ~8k-token stdin with different
# questions on the real-dimension synthetic model (`dsflash bench`'s, made if missing), then
# the second question without the cache. Prints prompt tokens computed and time to first
# token side by side, and the cache's bytes per 1k tokens of context.
#   scripts/bench_prompt_cache.sh [MODEL_DIR] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-.cache/bench/flash-2layers}
tokens=${2:-8192}
. scripts/bench_setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Plain prose, ~4 characters per token: a little more than $tokens tokens.
for i in $(seq 1 $((tokens / 19))); do
  echo "Paragraph $i: the committee reviewed item $((i * 7 % 101)) and noted a change of $((i * 13 % 97)) units."
done >"$work/doc.txt"
head -c $(($(wc -c <"$work/doc.txt") / 4)) "$work/doc.txt" >"$work/quarter.txt"
run() { # label, input, question, extra flags...
  local label=$1 input=$2 q=$3
  shift 3
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" --model "$model" --tokenizer "$tok" --temperature 0 --no-think -n 1 --json \
    --cache-dir "$work/cache" -p "$q" "$@" <"$input" >"$work/$label.json" 2>"$work/$label.err"
  t1=$(date +%s.%N)
  python3 - "$work/$label.json" "$label" "$t0" "$t1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
wall = float(sys.argv[4]) - float(sys.argv[3])
print(f"| {sys.argv[2]} | {j['prompt_tokens']} | {j['cached_tokens']} | {j['prefilled_tokens']} | {j['prefill_seconds']:.2f} | {wall:.2f} |")
PY
}
echo "| run | prompt tokens | from the cache | computed | time to first token (s) | wall (s) |"
echo "|---|---|---|---|---|---|"
run first "$work/doc.txt" "What is the main topic of this text?"
run second "$work/doc.txt" "Which paragraph mentions item 42?"
run second-no-cache "$work/doc.txt" "Which paragraph mentions item 42?" --no-cache
# A quarter of the input, for the states' growth per token.
run quarter "$work/quarter.txt" "What is the main topic of this text?" >/dev/null
same=$(python3 -c "import json,sys;a,b=(json.load(open(f'$work/{n}.json'))['answer'] for n in ('second','second-no-cache'));print('same' if a==b else 'DIFFERENT')")
echo
echo "second answer with the cache vs without: $same"
"$bin" cache list --cache-dir "$work/cache" | sed 's/^/    /'
python3 - "$work/cache" "$model/config.json" <<'PY'
import json, os, sys, struct
root, cfg = sys.argv[1], json.load(open(sys.argv[2]))
files = []
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".dss"):
            p = os.path.join(d, f)
            b = open(p, "rb").read(8 + 4 + 65536)
            n = struct.unpack_from("<I", b, 8)[0]
            files.append((json.loads(b[12:12 + n])["tokens"], os.path.getsize(p)))
files.sort()
(t0, s0), (t1, s1) = files[0], files[-1]
ratios = cfg["compress_ratios"][: cfg["num_hidden_layers"]]
csa, hca = ratios.count(4), ratios.count(128)
# Spec §6.2, bf16 as the reference allocates: CSA 512/4 + 128/4 elements per token, HCA 512/128.
spec = 2 * (csa * (512 / 4 + 128 / 4) + hca * 512 / 128)
print(f"\nstates of {t0} and {t1} tokens: {s0} and {s1} bytes")
print(f"cache bytes per 1k tokens of context (whole file / tokens): {1000 * s1 / t1:,.0f}")
if t1 > t0:
    print(f"growth per 1k tokens (between the smallest and largest state): {1000 * (s1 - s0) / (t1 - t0):,.0f}")
print(f"spec §6.2 for these {len(ratios)} layers ({csa} CSA, {hca} HCA), bf16: {1000 * spec:,.0f} per 1k tokens")
PY
