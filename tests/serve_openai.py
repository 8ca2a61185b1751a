"""`dsflash serve` through the official `openai` Python client (run by tests/serve.rs).

    PYTHONPATH=$(scripts/fetch_openai.sh) python3 tests/serve_openai.py \
        --open URL --keyed URL --key KEY --goldens tests/fixtures/chat/tool-goldens.json

--open: a server with --queue 0 (a request is taken only when the engine is idle);
--keyed: a server with --api-key KEY. Exits non-zero at the first failed check.
"""
import argparse, json, time, urllib.request, urllib.error

import openai
from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--open", required=True)
ap.add_argument("--keyed", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--goldens", required=True)
args = ap.parse_args()

checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    checks += 1


c = OpenAI(base_url=args.open + "/v1", api_key="unused", max_retries=0, timeout=120)
NO_THINK = {"chat_template_kwargs": {"thinking": False}}
THINK = {"chat_template_kwargs": {"thinking": True}}
greedy = dict(model="dsflash", temperature=0)

# Non-stream, thinking off.
hello = [{"role": "user", "content": "Hello"}]
r1 = c.chat.completions.create(messages=hello, max_tokens=8, extra_body=NO_THINK, **greedy)
m1 = r1.choices[0].message
check(r1.object == "chat.completion" and m1.role == "assistant", "a chat.completion")
check(isinstance(m1.content, str), "content is a string")
check((m1.model_extra or {}).get("reasoning_content") is None, "no reasoning without thinking")
check(r1.choices[0].finish_reason in ("stop", "length"), r1.choices[0].finish_reason)
check(0 < r1.usage.completion_tokens <= 8, r1.usage)
check(r1.usage.total_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens, "total")

# The same request streamed: the same prompt in the same steps, so greedy gives the same text;
# all of the prompt but its last token comes from the state the first request left.
chunks = list(c.chat.completions.create(messages=hello, max_tokens=8, extra_body=NO_THINK,
                                        stream=True, stream_options={"include_usage": True},
                                        **greedy))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
check(text == m1.content, f"streamed {text!r} == {m1.content!r}")
check(chunks[-1].usage is not None and not chunks[-1].choices, "a usage chunk last")
u = chunks[-1].usage
check(u.prompt_tokens == r1.usage.prompt_tokens, "same prompt tokens")
check(u.prompt_tokens_details.cached_tokens == u.prompt_tokens - 1, u)
finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
check(finishes == [r1.choices[0].finish_reason], finishes)

# Thinking on: the text goes to reasoning_content, streamed the same.
r3 = c.chat.completions.create(messages=hello, max_tokens=6, extra_body=THINK, **greedy)
rc = (r3.choices[0].message.model_extra or {}).get("reasoning_content")
check(isinstance(rc, str) and rc, f"reasoning_content {rc!r}")
check(r3.usage.prompt_tokens == r1.usage.prompt_tokens, "<think> and </think> are one token each")
s3 = list(c.chat.completions.create(messages=hello, max_tokens=6, extra_body=THINK, stream=True,
                                    **greedy))
srs = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in s3)
check(srs == rc, f"streamed reasoning {srs!r} == {rc!r}")

# Turn 2 of a conversation continues from turn 1's state.
story = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
t1 = c.chat.completions.create(messages=story, max_tokens=6, extra_body=NO_THINK, **greedy)
story += [{"role": "assistant", "content": t1.choices[0].message.content},
          {"role": "user", "content": "And then?"}]
t2 = c.chat.completions.create(messages=story, max_tokens=6, extra_body=NO_THINK, **greedy)
cached = t2.usage.prompt_tokens_details.cached_tokens
check(cached >= t1.usage.prompt_tokens - 1, f"turn 2 reused {cached} of turn 1's {t1.usage.prompt_tokens}")
check(cached < t2.usage.prompt_tokens, "the new message is prefilled")

# A tool round trip. The call is forced: the answer's start is the DSML block (DeepSeek's chat
# prefix completion), and logit_bias makes end-of-sentence the next token.
gold = {c_["name"]: c_ for c_ in json.load(open(args.goldens))["encode"]}["chat_mode_tool_round_trip"]
system = dict(gold["messages"][0])
weather = system.pop("tools")
user = gold["messages"][1]
D = "｜DSML｜"
forced = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
          f'<{D}parameter name="city" string="true">Oslo</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
ask = [system, user, {"role": "assistant", "content": forced, "prefix": True}]
force = dict(tools=weather, max_tokens=4, extra_body={**NO_THINK, "logit_bias": {"1": 100}}, **greedy)
rt = c.chat.completions.create(messages=ask, **force)
ch = rt.choices[0]
check(ch.finish_reason == "tool_calls", ch.finish_reason)
check(not ch.message.content, f"no content: {ch.message.content!r}")
calls = ch.message.tool_calls
check(len(calls) == 1 and calls[0].type == "function", calls)
check(calls[0].function.name == "get_weather", calls[0].function.name)
# The release parser's JSON (json.dumps): see tests/fixtures/chat/tool-goldens.json.
check(calls[0].function.arguments == '{"city": "Oslo"}', calls[0].function.arguments)
# Streamed: the call arrives as a tool_calls delta, never as content.
st = list(c.chat.completions.create(messages=ask, stream=True, **force))
content = "".join(x.choices[0].delta.content or "" for x in st if x.choices)
deltas = [t for x in st if x.choices for t in (x.choices[0].delta.tool_calls or [])]
check(content == "", f"no markup in streamed content: {content!r}")
check([(d.index, d.function.name, d.function.arguments) for d in deltas]
      == [(0, "get_weather", '{"city": "Oslo"}')], deltas)
check(st[-1].choices[0].finish_reason == "tool_calls", st[-1])
# The call and its result go back: the prompt is the release encoder's (its token count).
back = [system, user,
        {"role": "assistant", "content": "", "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": gold["messages"][3]["content"]}]
r = c.chat.completions.create(messages=back, tools=weather, max_tokens=2, extra_body=NO_THINK, **greedy)
check(r.usage.prompt_tokens == len(gold["ids"]), f"{r.usage.prompt_tokens} == {len(gold['ids'])}")
# tool_choice "none": no tools in the prompt (only the system and user text).
r = c.chat.completions.create(messages=[system, user], tools=weather, tool_choice="none",
                              max_tokens=2, extra_body=NO_THINK, **greedy)
check(r.usage.prompt_tokens < len(gold["ids"]) // 2, r.usage)

# Raw completions.
rc_ = c.completions.create(model="dsflash", prompt="Once upon a time", max_tokens=5, temperature=0)
check(rc_.object == "text_completion" and isinstance(rc_.choices[0].text, str), rc_)
check(rc_.usage.completion_tokens <= 5, rc_.usage)
sc = list(c.completions.create(model="dsflash", prompt="Once upon a time", max_tokens=5,
                               temperature=0, stream=True))
check("".join(x.choices[0].text for x in sc if x.choices) == rc_.choices[0].text, "streamed completion")

# Models.
check([m.id for m in c.models.list().data] != [], "a model listed")

# Queue full: with --queue 0 a request waits for nothing, so one made while a stream runs
# is refused with 429 and Retry-After.
long = c.chat.completions.create(messages=[{"role": "user", "content": "Go on."}], max_tokens=1_000_000,
                                 extra_body=NO_THINK, stream=True, **greedy)
it = iter(long)
next(it)
next(it)
try:
    c.chat.completions.create(messages=hello, max_tokens=1, **greedy)
    check(False, "429 while busy")
except openai.RateLimitError as e:
    check(e.response.headers.get("retry-after") == "1", e.response.headers)
    check(e.code == "queue_full", e.body)
# The client goes away mid-stream: the engine is freed (a request is taken again) long before
# the million tokens asked for.
long.close()
served = None
for _ in range(600):
    try:
        served = c.chat.completions.create(messages=hello, max_tokens=1, **greedy)
        break
    except openai.RateLimitError:
        time.sleep(0.05)
check(served is not None, "a request served after the disconnect")

# The API key: 401 without it or with another, the models list with it; /health stays open.
bad = OpenAI(base_url=args.keyed + "/v1", api_key="not-the-key", max_retries=0)
try:
    bad.models.list()
    check(False, "401 with a wrong key")
except openai.AuthenticationError as e:
    check(e.status_code == 401, e)
try:
    urllib.request.urlopen(args.keyed + "/v1/models")
    check(False, "401 without a key")
except urllib.error.HTTPError as e:
    check(e.code == 401 and json.load(e)["error"]["code"] == "invalid_api_key", e)
good = OpenAI(base_url=args.keyed + "/v1", api_key=args.key, max_retries=0)
check(len(good.models.list().data) == 1, "models with the key")
r = good.chat.completions.create(messages=hello, max_tokens=2, extra_body=NO_THINK, **greedy)
check(r.usage.completion_tokens <= 2, r.usage)
check(json.load(urllib.request.urlopen(args.keyed + "/health"))["status"] == "ok", "/health")

print(f"ok: {checks} checks")
