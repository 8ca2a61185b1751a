#!/usr/bin/env bash
# `--ram` against the plain map on a machine with less RAM than the model, emulated: a helper
# locks all but AVAILABLE of the memory (mlock) for the duration and lets it go at exit. On
# the real-dimension 2-layer model (`dsflash bench`'s, ~9 GB) it runs the same greedy one-shot
# twice from a cold page cache: through the map, then with --ram BUDGET (AVAILABLE less 1 GiB
# for the process), and prints decode tok/s and the bytes read from the files per token.
# Needs root (mlock of that size, drop_caches). Do not run it beside other work: the machine
# is left with AVAILABLE.
#   sudo scripts/bench_ram_tier.sh [AVAILABLE] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
avail=${1:-4G}
n=${2:-16}
model=.cache/bench/flash-2layers
. scripts/bench_setup.sh
to_bytes() { python3 -c "import sys; s=sys.argv[1].upper(); m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$1"; }
avail_b=$(to_bytes "$avail")
budget=$((avail_b - (1 << 30)))
work=$(mktemp -d)
python3 - "$avail_b" >"$work/lock.out" 2>&1 <<'PY' &
import ctypes, mmap, sys, time
want = int(sys.argv[1])
free = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
size = max(free - want, 0)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
if size:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        sys.exit(f"mlock of {size} bytes failed: errno {ctypes.get_errno()}")
print(f"locked {size / 2**30:.1f} GiB", flush=True)
while True:
    time.sleep(3600)
PY
helper=$!
trap 'kill $helper 2>/dev/null; wait $helper 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  grep -q locked "$work/lock.out" 2>/dev/null && break
  kill -0 $helper 2>/dev/null || { cat "$work/lock.out" >&2; exit 1; }
  sleep 0.2
done
echo "$(cat "$work/lock.out"); MemAvailable now $(awk '/MemAvailable/ {printf "%.1f GiB", $2/2^20}' /proc/meminfo)"
run() { # label, extra flags...
  local label=$1
  shift
  sync
  echo 3 >/proc/sys/vm/drop_caches
  "$bin" --model "$model" --tokenizer "$tok" -p "Tell me about lighthouses." -n "$n" \
    --temperature 0 --no-think --no-cache --json "$@" >"$work/$label.json" 2>"$work/$label.err"
  python3 - "$work/$label.json" "$label" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
r = j.get("ram_tier")
per_tok = f"{r['bytes_read'] / max(j['generated_tokens'] + j['prompt_tokens'], 1) / 1e6:.0f} MB" if r else "(page faults)"
hits = f"{r['hits'] / max(r['hits'] + r['reads'], 1):.0%}" if r else "-"
print(f"| {sys.argv[2]} | {j['decode_tokens_per_s']:.2f} | {j['prefill_tokens_per_s']:.1f} | {hits} | {per_tok} |")
PY
}
echo
echo "| run | decode tok/s | prefill tok/s | selections from RAM | read from the files per token |"
echo "|---|---|---|---|---|"
run map
run ram --ram "$budget"
grep -h "dsflash: --ram" "$work/ram.err" || true
same=$(python3 -c "import json,sys;a,b=(json.load(open(f'$work/{n}.json'))['answer'] for n in ('map','ram'));print('same' if a==b else 'DIFFERENT')")
echo "answers: $same"
