#!/usr/bin/env bash
# `dsflash serve`, measured on the real-dimension synthetic model (`dsflash bench`'s, made if
# missing): time to first token of turn 2 of a conversation vs turn 1 (a ~TOKENS-token first
# message), and requests/s for short prompts from 8 concurrent clients, next to the same
# requests run as one-shot processes (each loads the model). Prints markdown tables.
#   scripts/bench_serve.sh [MODEL_DIR] [TOKENS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-.cache/bench/flash-2layers}
tokens=${2:-2048}
requests=${3:-24}
. scripts/bench_setup.sh
work=$(mktemp -d)
"$bin" serve --model "$model" --tokenizer "$tok" --port 0 --no-cache --queue 64 2>"$work/serve.err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  grep -q "serving" "$work/serve.err" && break
  sleep 0.2
done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.err" | head -1)
[ -n "$url" ] || { cat "$work/serve.err" >&2; exit 1; }
python3 - "$url" "$tokens" "$requests" "$bin" "$model" "$tok" <<'PY'
import json, subprocess, sys, threading, time, http.client, urllib.parse

url, tokens, requests, bin_, model, tok = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
u = urllib.parse.urlparse(url)


def stream(messages, max_tokens):
    """(seconds to the first generated text, the answer, usage)"""
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "chat_template_kwargs": {"thinking": False}})
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first, text, usage = None, "", None
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            piece = ch["delta"].get("content") or ch["delta"].get("reasoning_content")
            if piece:
                first = first or time.perf_counter() - t0
                text += piece
    c.close()
    return first, text, usage


doc = " ".join(f"Paragraph {i}: the committee reviewed item {i * 7 % 101} and noted a change of {i * 13 % 97} units."
               for i in range(1, tokens // 19 + 1))
conv = [{"role": "user", "content": doc + "\n\nWhat is the main topic of this text?"}]
t1, a1, u1 = stream(conv, 16)
conv += [{"role": "assistant", "content": a1}, {"role": "user", "content": "Which paragraph mentions item 42?"}]
t2, a2, u2 = stream(conv, 16)
print("| turn | prompt tokens | reused (cached_tokens) | prefilled | time to first token (s) |")
print("|---|---|---|---|---|")
for n, t, us in ((1, t1, u1), (2, t2, u2)):
    c = us["prompt_tokens_details"]["cached_tokens"]
    print(f"| {n} | {us['prompt_tokens']} | {c} | {us['prompt_tokens'] - c} | {t:.2f} |")
print(f"\nturn 2 / turn 1 time to first token: {t2 / t1:.3f}\n")

# Short prompts: 8 clients against the server, then the same requests as one-shot processes.
short = [f"Request {i}: reply with one short sentence." for i in range(requests)]
done, lat, lock = [], [], threading.Lock()
it = iter(short)


def client():
    while True:
        with lock:
            q = next(it, None)
        if q is None:
            return
        t = time.perf_counter()
        stream([{"role": "user", "content": q}], 8)
        with lock:
            lat.append(time.perf_counter() - t)


t0 = time.perf_counter()
ths = [threading.Thread(target=client) for _ in range(8)]
[t.start() for t in ths]
[t.join() for t in ths]
served = time.perf_counter() - t0
n_cli = min(requests, 6)
t0 = time.perf_counter()
for q in short[:n_cli]:
    subprocess.run([bin_, "--model", model, "--tokenizer", tok, "--temperature", "0", "--no-think", "-n", "8",
                    "--no-cache", "-p", q], check=True, capture_output=True)
cli = time.perf_counter() - t0
print("| how | requests | requests/s | mean latency (s) |")
print("|---|---|---|---|")
print(f"| dsflash serve, 8 clients | {requests} | {requests / served:.2f} | {sum(lat) / len(lat):.2f} |")
print(f"| one-shot processes, one after another | {n_cli} | {n_cli / cli:.2f} | {cli / n_cli:.2f} |")
PY
