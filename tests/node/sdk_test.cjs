// Real-client test: the official `openai` Node SDK through aigate's API for every provider,
// against the mock upstream (Anthropic's and Gemini's formats behind OpenAI's). Run by
// tests/python/run.sh with the gateway's address in AIGATE_URL and the SDK in SDK_DIR.
"use strict";

const { createRequire } = require("node:module");
const OpenAI = createRequire(process.env.SDK_DIR + "/")("openai");

const GW = process.env.AIGATE_URL.replace(/\/$/, "");
let passed = 0;
let failed = 0;
function check(name, cond, detail) {
  if (cond) {
    passed += 1;
    console.log(`ok   node: ${name}`);
  } else {
    failed += 1;
    console.log(`FAIL node: ${name} ${detail === undefined ? "" : JSON.stringify(detail)}`);
  }
}

const WEATHER = [{ type: "function", function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } } }];

async function main() {
  const client = new OpenAI({ baseURL: `${GW}/v1/my-account/default/compat`, apiKey: "key-not-real", maxRetries: 0 });
  for (const model of ["anthropic/claude-sonnet-4-5", "google-ai-studio/gemini-2.5-flash"]) {
    const chat = await client.chat.completions.create({ model, messages: [{ role: "user", content: `Hello from node to ${model}` }] });
    check(`${model}: chat`, chat.choices[0].message.content.startsWith("Hello") && chat.usage.prompt_tokens > 0, chat);

    const stream = await client.chat.completions.create({
      model, stream: true, stream_options: { include_usage: true },
      messages: [{ role: "user", content: `Stream from node to ${model}` }],
    });
    let text = "";
    let usage = null;
    let finish = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        text += c.delta.content || "";
        finish = c.finish_reason || finish;
      }
    }
    check(`${model}: stream`, text.startsWith("Hello") && finish === "stop" && usage && usage.completion_tokens > 0, { text, usage });

    const tool = await client.chat.completions.create({ model, tools: WEATHER, messages: [{ role: "user", content: `Weather in Paris? (node, ${model})` }] });
    const call = (tool.choices[0].message.tool_calls || [])[0];
    check(`${model}: tool call`, call && JSON.parse(call.function.arguments).city === "Paris" && tool.choices[0].finish_reason === "tool_calls", tool);
  }
  try {
    await client.chat.completions.create({ model: "anthropic/claude-sonnet-4-5", n: 2, messages: [{ role: "user", content: "x" }] });
    check("n=2 is refused", false);
  } catch (e) {
    check("n=2 is refused", e instanceof OpenAI.BadRequestError && /n must be 1/.test(e.message), e.message);
  }
  console.log(`node: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
