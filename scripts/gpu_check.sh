#!/usr/bin/env bash
# The GPU half of the CUDA backend's checks, as one run of about 10 minutes on a machine with
# an NVIDIA GPU: every kernel compiled for this GPU, every op against the CPU on random
# inputs at real V4-Flash shapes, the tiny oracle checkpoints fully on the GPU against their
# goldens, the CLI on --device cuda, and `dsflash bench --gpu` (matvec GB/s against the
# card's copy bandwidth, FP8 GEMM TFLOP/s). Logs go to $OUT (default gpu-logs/).
#
# It also runs the CPU benchmark on that machine's cores (issue #6: on a 2-core VM the FP4
# kernels' arithmetic falls below the read bandwidth whenever the neighbours leave memory
# free; with more cores per GB/s, `bench` shows whether they saturate it).
#
# Uses cargo when the machine has it; otherwise the binaries of scripts/gpu_prepare.sh in
# .gpu/. NVRTC comes from the CUDA toolkit or the nvidia-cuda-nvrtc pip package there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
# NVRTC: any libnvrtc.so* on the machine, linked as libnvrtc.so into a private directory.
lib=$( (ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF}';
        ls /usr/local/cuda/lib64/libnvrtc.so* /usr/local/cuda/targets/*/lib/libnvrtc.so* 2>/dev/null;
        python3 -c 'import nvidia, os; [print(os.path.join(r, f)) for p in nvidia.__path__ for r, _, fs in os.walk(p) for f in fs if f.startswith("libnvrtc.so")]' 2>/dev/null) |
      grep -v builtins | head -1)
if [ -n "$lib" ]; then
  mkdir -p .gpu/nvrtc && ln -sf "$lib" .gpu/nvrtc/libnvrtc.so
  export LD_LIBRARY_PATH="$PWD/.gpu/nvrtc:$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  log "NVRTC: $lib"
else
  log "no libnvrtc found: only cached kernels can load"
fi
export DSFLASH_REQUIRE_GPU=1 DSFLASH_REQUIRE_NVRTC=1 RUST_BACKTRACE=1
if command -v cargo >/dev/null; then
  cargo build --release --locked > "$out/build.log" 2>&1 || log "build failed"
  bin=target/release/dsflash
  t_cuda() { cargo test --release --locked --test cuda_device -- --nocapture --test-threads 1; }
  t_nvrtc() { cargo test --release --locked --test kernels_nvrtc -- --nocapture; }
else
  bin=.gpu/dsflash
  t_cuda() { .gpu/cuda_device --nocapture --test-threads 1; }
  t_nvrtc() { .gpu/kernels_nvrtc --nocapture; }
fi
log "bench --kernels-only (CPU, all cores)"
timeout 120 $bin bench --kernels-only --json > "$out/bench_cpu_kernels.json" 2> "$out/bench_cpu_kernels.log"; log "rc=$?"
cat "$out/bench_cpu_kernels.log" >> "$out/summary.txt"
log "kernels compile (NVRTC, all target archs)"; timeout 120 bash -c "$(declare -f t_nvrtc); t_nvrtc" > "$out/kernels_nvrtc.log" 2>&1; log "rc=$?"
log "CUDA vs CPU ops and goldens on the GPU"; timeout 300 bash -c "$(declare -f t_cuda); t_cuda" > "$out/cuda_device.log" 2>&1; log "rc=$?"
log "CLI on --device cuda vs cpu"
a=$($bin generate --model tests/fixtures/tiny --tokens 1,2,3,4,5 --max-tokens 16 --ignore-eos --numerics ideal --device cpu 2>>"$out/cli.log")
b=$($bin generate --model tests/fixtures/tiny --tokens 1,2,3,4,5 --max-tokens 16 --ignore-eos --numerics ideal --device cuda 2>>"$out/cli.log")
if [ "$a" = "$b" ]; then log "same ids: $a"; else log "DIFFERENT: cpu $a / cuda $b"; fi
log "bench --gpu"; timeout 180 $bin bench --gpu --json > "$out/bench_gpu.json" 2> "$out/bench_gpu.log"; log "rc=$?"
cat "$out/bench_gpu.log" >> "$out/summary.txt"
# Hybrid decode on the real-dimension 2-layer checkpoint (written once, ~9 GB): every expert on
# the CPU, the share of slots a 24 GB card leaves for the full model (~29 of 256 per layer,
# `dsflash inspect --plan --reference`), and every expert on the GPU.
for slots in 0 29 256; do
  log "bench --hybrid --device cuda --expert-slots $slots"
  timeout 240 $bin bench --hybrid --device cuda --expert-slots $slots --json \
    --synth-dir "${SYNTH_DIR:-/tmp/dsflash-bench}" >> "$out/bench_hybrid.json" 2>> "$out/bench_hybrid.log"
  log "rc=$?"
done
cat "$out/bench_hybrid.log" >> "$out/summary.txt"
# The CPU alone on the same checkpoint: decode and prefill with all of this machine's cores.
log "bench (CPU, all cores)"
timeout 200 $bin bench --json --synth-dir "${SYNTH_DIR:-/tmp/dsflash-bench}" \
  > "$out/bench_cpu.json" 2> "$out/bench_cpu.log"; log "rc=$?"
cat "$out/bench_cpu.log" >> "$out/summary.txt"
