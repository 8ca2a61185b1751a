# Sourced by the benchmark scripts: the release binary (built or brought up to date), the
# real-dimension synthetic model in $model (default .cache/bench/flash-2layers, `dsflash
# bench`'s, made if missing; another is the caller's to make) and the real tokenizer in $tok.
model=${model:-.cache/bench/flash-2layers}
bin=target/release/dsflash
cargo build --release --quiet
if [ "$model" = .cache/bench/flash-2layers ] && [ ! -f "$model/config.json" ]; then
  echo "making $model (9 GB)" >&2
  "$bin" bench --json --model "$model" >/dev/null
fi
tok=$(scripts/fetch_tokenizer.sh)
