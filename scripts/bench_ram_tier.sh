#!/usr/bin/env bash
# The three tiers (`--ram`) against the plain map on a machine with less RAM than the model,
# emulated: a helper locks all but AVAILABLE of the memory (mlock) for the duration and lets
# it go at exit. On a 6-layer real-dimension synthetic checkpoint (23.6 GB: 3 hash-routed
# layers, then CSA/HCA; made by `dsflash synth` into .cache/bench/flash-6layers if missing)
# the same greedy one-shot runs three times: with every weight in RAM (before the lock; the
# CPU's own rate), then from a cold page cache through the map (`--ram off`) and with the
# tiers (`--ram auto`: AVAILABLE less 1 GiB). It prints decode tok/s, what was read from the
# drive per token, the time the tier's experts waited for reads, and the plan's prediction
# for that setting (`inspect --plan` with the drive's bandwidth and the in-RAM rate measured
# here, and the tier's selection counts as the popularity: the synthetic router spreads
# selections far more evenly than the real one).
# Needs root (mlock of that size, drop_caches) and RAM for the whole model for the in-RAM
# run. Do not run it beside other work: the machine is left with AVAILABLE.
#   sudo scripts/bench_ram_tier.sh [AVAILABLE] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
avail=${1:-8G}
n=${2:-48}
model=${model:-.cache/bench/flash-6layers}
. scripts/bench_setup.sh
if [ ! -f "$model/config.json" ]; then
  echo "making $model (23.6 GB)" >&2
  cfg=$(mktemp)
  python3 - "$cfg" <<'PY'
import json, sys
v = json.load(open("tests/fixtures/deepseek-v4-flash-config.json"))
v.update(num_hidden_layers=6, num_nextn_predict_layers=0, compress_ratios=[0, 0, 4, 128, 4, 128])
json.dump(v, open(sys.argv[1], "w"), indent=2)
PY
  "$bin" synth --config "$cfg" --out "$model"
  rm -f "$cfg"
fi
to_bytes() { python3 -c "import sys; s=sys.argv[1].upper(); m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$1"; }
avail_b=$(to_bytes "$avail")
work=$(mktemp -d)
ask() { # label, extra flags...: the greedy one-shot, its --json in $work/label.json
  local label=$1
  shift
  "$bin" --model "$model" --tokenizer "$tok" -p "Tell me about lighthouses." -n "$n" \
    --temperature 0 --no-think --no-cache --json "$@" >"$work/$label.json" 2>"$work/$label.err"
}
# The CPU's own rate: the same one-shot with every weight in RAM (where the machine has room
# for the model: a warm-up run fills the page cache), before the memory is locked. The plan
# takes it as the rate the CPU streams weights at (bytes per token x tok/s): on a few cores
# the products, not the RAM, set it.
ask warm --ram off
before=$(awk '/^pgpgin / {print $2}' /proc/vmstat)
ask inram --ram off
inram_read=$((($(awk '/^pgpgin / {print $2}' /proc/vmstat) - before) / 1024))
bytes_tok=$("$bin" inspect --json --model "$model" | python3 -c "import json,sys; print(json.load(sys.stdin)['bytes_per_token'])")
read -r inram_tok cpu_gbs < <(python3 -c "
import json
t = json.load(open('$work/inram.json'))['decode_tokens_per_s']
print(f'{t:.2f}', f'{t * $bytes_tok / 1e9:.1f}')")
sync
echo 3 >/proc/sys/vm/drop_caches
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
cleanup() {
  local rc=$?
  kill $helper 2>/dev/null
  wait $helper 2>/dev/null || true
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
for _ in $(seq 600); do
  grep -q locked "$work/lock.out" 2>/dev/null && break
  kill -0 $helper 2>/dev/null || { cat "$work/lock.out" >&2; exit 1; }
  sleep 0.2
done
echo "$(cat "$work/lock.out"); MemAvailable now $(awk '/MemAvailable/ {printf "%.1f GiB", $2/2^20}' /proc/meminfo)"
# The drive: expert-sized O_DIRECT reads at random places of the largest shard, eight in
# flight as the tier reads.
shard=$(ls -S "$model"/*.safetensors | head -1)
disk_gbs=$(python3 - "$shard" <<'PY'
import mmap, os, random, sys, time
from concurrent.futures import ThreadPoolExecutor
f = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
size, chunk, reads = os.fstat(f).st_size, 13_402_112, 48
random.seed(1)
offs = [random.randrange((size - chunk) // 4096) * 4096 for _ in range(reads)]
bufs = [mmap.mmap(-1, chunk) for _ in range(8)]
def read(i):
    os.preadv(f, [bufs[i % 8]], offs[i])
t = time.time()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(read, range(reads)))
print(f"{reads * chunk / (time.time() - t) / 1e9:.2f}")
PY
)
echo "drive: $disk_gbs GB/s in 13.4 MB O_DIRECT reads, eight in flight"
echo "all weights in RAM: decode $inram_tok tok/s ($inram_read MB read from the drive) = $cpu_gbs GB/s of weights"
run() { # label, extra flags...
  local label=$1
  sync
  echo 3 >/proc/sys/vm/drop_caches
  local before
  before=$(awk '/^pgpgin / {print $2}' /proc/vmstat)
  ask "$@"
  local kib=$(($(awk '/^pgpgin / {print $2}' /proc/vmstat) - before))
  python3 - "$work/$label.json" "$label" "$kib" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
r = j.get("ram_tier")
tokens = max(j["generated_tokens"] + j["prompt_tokens"], 1)
hits = f"{r['hits'] / max(r['hits'] + r['reads'], 1):.0%}" if r else "-"
wait = f"{1e3 * r['wait_s'] / tokens:.0f} ms" if r else "-"
print(f"| {sys.argv[2]} | {j['decode_tokens_per_s']:.2f} | {j['prefill_tokens_per_s']:.1f} | {hits} | "
      f"{int(sys.argv[3]) * 1024 / tokens / 1e6:.0f} MB | {wait} |")
PY
}
echo
echo "| run | decode tok/s | prefill tok/s | selections from RAM | read from the drive per token | waited for reads per token |"
echo "|---|---|---|---|---|---|"
run map --ram off
run ram --ram auto --expert-profile "$work/profile.json"
grep -h "routed experts per layer held in RAM" "$work/ram.err" || true
# The plan for that box: 4 GiB of its RAM kept for the system, AVAILABLE for dsflash.
"$bin" inspect --plan --json --model "$model" --gpu-mem 0 --ram $((avail_b + 3 * (1 << 30))) \
  --disk-gbs "$disk_gbs" --cpu-gbs "$cpu_gbs" --expert-profile "$work/profile.json" >"$work/plan.json"
python3 - "$work/plan.json" "$work/ram.json" <<'PY'
import json, sys
p, r = json.load(open(sys.argv[1]))[0], json.load(open(sys.argv[2]))
got = r["decode_tokens_per_s"]
print(f"plan: {p['ram_experts_per_layer']} experts per layer in RAM ({p['ram_hit_rate']:.0%} of selections), "
      f"{p['disk_bytes_per_token'] / 1e6:.0f} MB per token from the drive, {p['decode_tok_s']:.2f} tok/s "
      f"({p['bound']}-bound); measured {got:.2f} tok/s = {got / p['decode_tok_s']:.2f}x the prediction")
PY
same=$(python3 -c "import json,sys;a,b=(json.load(open(f'$work/{n}.json'))['answer'] for n in ('map','ram'));print('same' if a==b else 'DIFFERENT')")
echo "answers: $same"
