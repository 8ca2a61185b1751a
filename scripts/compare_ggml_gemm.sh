#!/usr/bin/env bash
# ggml's CPU matrix products beside dsflash's prefill products, on this machine in one run.
#
#   scripts/compare_ggml_gemm.sh PATH/TO/test-backend-ops [THREADS]
#
# `test-backend-ops` is ggml's op tester, from a ggml or llama.cpp checkout built as its own
# README says (nothing of it is part of this repository). Its perf mode times built-in cases;
# the prefill-sized MUL_MAT cases are m=4096 output rows, k=14336 columns, n=512 tokens for
# every weight type: MXFP4 (the format family of V4's routed experts), Q8_0 (the nearest to
# our FP8), BF16 and F32 (plain fp32 FMAs, the bound on CPUs without bf16 dot products).
# dsflash's `bench --gemm-only` then times its FP4/FP8 products at the real V4-Flash shapes,
# n = 64, 256 and 512, each as a ratio to the peaks it measures in the same run. Compare
# GFLOP/s at n=512; both use THREADS threads (default: the cores).
set -euo pipefail
tbo=${1:?usage: scripts/compare_ggml_gemm.sh PATH/TO/test-backend-ops [THREADS]}
if [ ! -x "$tbo" ]; then
  echo "compare_ggml_gemm: $tbo is not an executable test-backend-ops" >&2
  exit 2
fi
threads=${2:-$(nproc)}
cd "$(dirname "$0")/.."
bin=target/release/dsflash
[ -x "$bin" ] || cargo build --release --quiet
echo "== ggml test-backend-ops, MUL_MAT m=4096 k=14336 n=512 (GFLOPS per case)"
for type in mxfp4 q8_0 bf16 f32; do
  GGML_N_THREADS=$threads "$tbo" perf -o MUL_MAT -b CPU \
    -p "type_a=$type,type_b=f32,m=4096,n=512,k=14336," 2>&1 |
    grep -E 'MUL_MAT\(' || echo "  (no $type case at n=512 in this build: list them with: $tbo perf -o MUL_MAT -b CPU)"
done
echo "== dsflash bench --gemm-only --threads $threads"
"$bin" bench --gemm-only --threads "$threads"
