"""Real-client test: the official `openai` Python SDK through aigate, against the mock upstream.

Run by `.ci/run` (see tests/python/run.sh): it expects a running mock and gateway and takes the
gateway's address in AIGATE_URL. Exercises chat, streamed chat, embeddings and the models list with
base-URL form 1 (Cloudflare layout) and form 3 (plain OpenAI layout), and one OpenAI-format API for
an Anthropic-format upstream (`anthropic/...` models: chat, stream, tools, usage, errors) through
every compat entry point.
"""

import json

import os
import sys
import time

import openai
from openai import OpenAI

GW = os.environ["AIGATE_URL"].rstrip("/")
FORMS = {
    "cloudflare (form 1)": f"{GW}/v1/my-account/default/openai",
    "openai (form 3)": f"{GW}/v1",
}

passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


for label, base_url in FORMS.items():
    client = OpenAI(base_url=base_url, api_key="sk-test-not-real", max_retries=0)

    chat = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
    )
    check(f"{label}: chat", chat.choices[0].message.content.startswith("Hello"), repr(chat))
    check(f"{label}: chat usage", chat.usage is not None and chat.usage.total_tokens > 0)

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
    )
    log_id = raw.headers.get("cf-aig-log-id", "")
    check(f"{label}: cf-aig-log-id is a UUIDv7", len(log_id) == 36 and log_id[14] == "7", log_id)

    pieces = []
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
        if event.usage:
            usage = event.usage
    check(f"{label}: streamed chat", "".join(pieces).startswith("Hello") and len(pieces) > 1, repr(pieces))
    check(f"{label}: streamed usage", usage is not None and usage.completion_tokens > 0)

    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    check(f"{label}: embeddings", len(emb.data) == 2 and len(emb.data[0].embedding) > 0)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(f"{label}: models list", "gpt-4o-mini" in ids, repr(ids))

# The cache: repeat a chat and a streamed chat and see HIT on the second (via the raw-response API).
client = OpenAI(base_url=FORMS["openai (form 3)"], api_key="sk-cache-test", max_retries=0)
msgs = [{"role": "user", "content": "cache me please"}]
first = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
check("cache: first chat is a MISS", first.headers.get("cf-aig-cache-status") == "MISS", dict(first.headers))
first_text = first.parse().choices[0].message.content
second = None
for _ in range(20):
    second = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
    if second.headers.get("cf-aig-cache-status") == "HIT":
        break
    time.sleep(0.05)
check("cache: second chat is a HIT", second.headers.get("cf-aig-cache-status") == "HIT", dict(second.headers))
check("cache: HIT has the same answer", second.parse().choices[0].message.content == first_text)


def streamed(raw):
    out = []
    for event in raw.parse():
        if event.choices and event.choices[0].delta.content:
            out.append(event.choices[0].delta.content)
    return "".join(out)


smsgs = [{"role": "user", "content": "stream and cache me"}]
s1 = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=smsgs, stream=True)
t1 = streamed(s1)
check("cache: first streamed chat is a MISS", s1.headers.get("cf-aig-cache-status") == "MISS")
s2 = None
for _ in range(20):
    s2 = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=smsgs, stream=True)
    if s2.headers.get("cf-aig-cache-status") == "HIT":
        break
    streamed(s2)
    time.sleep(0.05)
check("cache: second streamed chat is a HIT", s2.headers.get("cf-aig-cache-status") == "HIT", dict(s2.headers))
check("cache: streamed HIT replays the same text", streamed(s2) == t1 and t1.startswith("Hello"))

# Gateway errors reach the SDK as its own exception types, with the gateway's message.
bad = OpenAI(base_url=f"{GW}/v1/acct/no-such-gateway/openai", api_key="sk-test", max_retries=0)
try:
    bad.models.list()
    check("unknown gateway raises NotFoundError", False)
except openai.NotFoundError as e:
    check("unknown gateway raises NotFoundError", "no-such-gateway" in str(e), str(e))

# A rate limit reaches the SDK as RateLimitError, with the rule, the limit and the reset in the
# message; successful responses carry the x-ratelimit headers the SDK reads.
limited = OpenAI(base_url=f"{GW}/limited/openai", api_key="sk-test", max_retries=0)
ok = limited.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
check("rate limit: x-ratelimit-remaining-requests on success", ok.headers.get("x-ratelimit-remaining-requests") == "1", dict(ok.headers))
limited.chat.completions.create(model="gpt-4o-mini", messages=msgs)
try:
    limited.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    check("rate limit: third request raises RateLimitError", False)
except openai.RateLimitError as e:
    msg = str(e)
    check("rate limit: third request raises RateLimitError", "rate_limit" in msg and "2 requests per 1h" in msg, msg)
    check("rate limit: Retry-After header", int(e.response.headers.get("retry-after", "0")) > 0, dict(e.response.headers))

# One OpenAI-format API for every provider: Anthropic's format behind the OpenAI SDK.
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
COMPAT = {
    "plain /v1": (f"{GW}/v1", {}),
    "compat": (f"{GW}/v1/my-account/default/compat", {}),
    "REST layout": (f"{GW}/client/v4/accounts/my-account/ai/v1", {"cf-aig-gateway-id": "default"}),
}
for label, (base_url, headers) in COMPAT.items():
    client = OpenAI(base_url=base_url, api_key="sk-ant-not-real", max_retries=0, default_headers=headers)
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hello from {label}"}]
    chat = client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=ask, max_tokens=200)
    check(f"anthropic via {label}: chat", chat.choices[0].message.content.startswith("Hello")
          and chat.model == "claude-sonnet-4-5" and chat.choices[0].finish_reason == "stop", repr(chat))
    check(f"anthropic via {label}: usage", chat.usage.prompt_tokens == 12 and chat.usage.completion_tokens == 14,
          repr(chat.usage))
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=ask, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    check(f"anthropic via {label}: stream", "".join(pieces).startswith("Hello") and finish == "stop", repr(pieces))
    check(f"anthropic via {label}: stream usage", usage is not None and usage.prompt_tokens == 12, repr(usage))

    tool_ask = [{"role": "user", "content": f"Weather in Paris? ({label})"}]
    r = client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=tool_ask, tools=WEATHER)
    call = r.choices[0].message.tool_calls[0] if r.choices[0].message.tool_calls else None
    check(f"anthropic via {label}: tool call", call is not None and call.function.name == "get_weather"
          and json.loads(call.function.arguments)["city"] == "Paris" and r.choices[0].finish_reason == "tool_calls",
          repr(r))
    # The answer to the tool call goes back as a tool message, translated to a tool_result.
    follow = tool_ask + [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    r2 = client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=follow)
    check(f"anthropic via {label}: tool result round trip", r2.choices[0].message.content.startswith("Hello"), repr(r2))
    args, name = "", None
    for chunk in client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=tool_ask + [
            {"role": "user", "content": "stream it"}], tools=WEATHER, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
    check(f"anthropic via {label}: streamed tool call", name == "get_weather" and json.loads(args)["city"] == "Paris",
          repr((name, args)))

# Gemini's format behind the OpenAI SDK, through every entry point.
for label, (base_url, headers) in COMPAT.items():
    gclient = OpenAI(base_url=base_url, api_key="goog-not-real", max_retries=0, default_headers=headers)
    g = gclient.chat.completions.create(model="google-ai-studio/gemini-2.5-flash",
                                        messages=[{"role": "user", "content": f"Hello Gemini ({label})"}])
    check(f"gemini via {label}: chat", g.choices[0].message.content.startswith("Hello") and g.usage.prompt_tokens == 11,
          repr(g))
    pieces, usage = [], None
    for chunk in gclient.chat.completions.create(model="google-ai-studio/gemini-2.5-flash", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": f"Stream, Gemini ({label})"}]):
        usage = chunk.usage or usage
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
    check(f"gemini via {label}: stream", "".join(pieces).startswith("Hello") and usage is not None
          and usage.prompt_tokens == 11, repr((pieces, usage)))
    g = gclient.chat.completions.create(model="google-ai-studio/gemini-2.5-flash", tools=WEATHER,
                                        messages=[{"role": "user", "content": f"Weather in Paris, Gemini? ({label})"}])
    call = (g.choices[0].message.tool_calls or [None])[0]
    check(f"gemini via {label}: tool call", call is not None and json.loads(call.function.arguments)["city"] == "Paris"
          and g.choices[0].finish_reason == "tool_calls", repr(g))

# Anthropic's format in front of an OpenAI-format provider, with the official anthropic SDK.
import anthropic  # noqa: E402

for label, base_url in {"compat": f"{GW}/v1/my-account/default/compat",
                        "REST layout": f"{GW}/client/v4/accounts/my-account/ai"}.items():
    ac = anthropic.Anthropic(base_url=base_url, api_key="sk-openai-not-real", max_retries=0,
                             default_headers={"cf-aig-gateway-id": "default"})
    m = ac.messages.create(model="openai/gpt-4o-mini", max_tokens=100, system="Be brief.",
                           messages=[{"role": "user", "content": f"Hello from the anthropic SDK ({label})"}])
    check(f"anthropic SDK to openai via {label}: message", m.content[0].text.startswith("Hello")
          and m.stop_reason == "end_turn" and m.usage.input_tokens == 19, repr(m))
    with ac.messages.stream(model="openai/gpt-4o-mini", max_tokens=100,
                            messages=[{"role": "user", "content": f"Stream from the anthropic SDK ({label})"}]) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    check(f"anthropic SDK to openai via {label}: stream", text.startswith("Hello") and final.usage.output_tokens == 8,
          repr((text, final)))
    t = ac.messages.create(model="openai/gpt-4o-mini", max_tokens=100,
                           tools=[{"name": "get_weather", "input_schema": {"type": "object",
                                                                           "properties": {"city": {"type": "string"}}}}],
                           messages=[{"role": "user", "content": f"Weather in Paris? ({label})"}])
    use = next((b for b in t.content if b.type == "tool_use"), None)
    check(f"anthropic SDK to openai via {label}: tool use", use is not None and use.input["city"] == "Paris"
          and t.stop_reason == "tool_use", repr(t))

# A dynamic route: its first step (a provider answering 503) fails, the second (Anthropic) answers.
for label, base_url in {"plain /v1": f"{GW}/v1", "compat": f"{GW}/v1/my-account/default/compat"}.items():
    dc = OpenAI(base_url=base_url, api_key="sk-not-real", max_retries=0)
    raw = dc.chat.completions.with_raw_response.create(
        model="dynamic/support", messages=[{"role": "user", "content": f"Route me ({label})"}])
    chat = raw.parse()
    check(f"dynamic route via {label}: falls back to step 1",
          raw.headers.get("cf-aig-step") == "1" and raw.headers.get("cf-aig-provider") == "anthropic"
          and raw.headers.get("cf-aig-model") == "claude-3-5-haiku-latest"
          and chat.choices[0].message.content.startswith("Hello"), repr((dict(raw.headers), chat)))
    pieces = [c.delta.content for chunk in dc.chat.completions.create(
        model="dynamic/support", stream=True, messages=[{"role": "user", "content": f"Stream a route ({label})"}])
        for c in chunk.choices if c.delta.content]
    check(f"dynamic route via {label}: stream", "".join(pieces).startswith("Hello"), repr(pieces))
try:
    OpenAI(base_url=f"{GW}/v1", api_key="sk-not-real", max_retries=0).chat.completions.create(
        model="dynamic/nope", messages=[{"role": "user", "content": "x"}])
    check("dynamic route: an unknown route raises BadRequestError", False)
except openai.BadRequestError as e:
    check("dynamic route: an unknown route raises BadRequestError", "support" in str(e) and "nope" in str(e), str(e))

client = OpenAI(base_url=f"{GW}/v1", api_key="sk-ant-not-real", max_retries=0)
try:
    client.chat.completions.create(model="anthropic/claude-sonnet-4-5", n=2,
                                   messages=[{"role": "user", "content": "two please"}])
    check("anthropic: n=2 raises BadRequestError", False)
except openai.BadRequestError as e:
    check("anthropic: n=2 raises BadRequestError", "n must be 1" in str(e), str(e))
try:
    client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}],
                                   extra_headers={"x-mock-status": "529"})
    check("anthropic: provider error raises APIStatusError", False)
except openai.APIStatusError as e:
    check("anthropic: provider error raises APIStatusError", e.status_code == 529 and "mock failure" in str(e), str(e))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
