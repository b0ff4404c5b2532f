// Chat with the glmserve gateway from Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
//   npm install @grpc/grpc-js @grpc/proto-loader      (anywhere on NODE_PATH)
//   node docs/examples/node/chat.js [host:port]            (default 127.0.0.1:30000)
//
// Streams the answer: reasoning, content and tool-call fragments as they arrive, then the finish
// reason and token usage. Set GLMSERVE_PROTO_ROOT if the script is moved out of the repository.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const address = process.argv[2] || "127.0.0.1:30000";
const protoRoot = process.env.GLMSERVE_PROTO_ROOT || path.resolve(__dirname, "..", "..");

const definition = protoLoader.loadSync("protos/gateway.proto", {
  includeDirs: [protoRoot], // imports resolve against the repository root; google/protobuf/* is bundled
  keepCase: true,           // field names exactly as in the .proto (max_tokens, reasoning_content, ...)
  longs: String,
  enums: String,
  defaults: false,          // unset fields stay unset (proto3 `optional`: temperature 0 != unset)
  oneofs: true,
});
const { Gateway } = grpc.loadPackageDefinition(definition).glmserve.v1;
const client = new Gateway(address, grpc.credentials.createInsecure());

const request = {
  messages: [{ role: "user", content: "What is the weather in Paris?" }],
  tools: [{
    type: "function",
    function: {
      name: "get_weather",
      description: "Get the weather for a city",
      // google.protobuf.Struct in its protobufjs form
      parameters: {
        fields: {
          type: { stringValue: "object" },
          properties: { structValue: { fields: {
            city: { structValue: { fields: { type: { stringValue: "string" } } } },
          } } },
          required: { listValue: { values: [{ stringValue: "city" }] } },
        },
      },
    },
  }],
  sampling: { temperature: 0, max_tokens: 256 }, // temperature 0 = greedy (present, not unset)
  thinking: { budget: 512 },
};

const deadline = new Date(Date.now() + 60_000);
const call = client.Chat(request, { deadline });
const toolCalls = {};
let reasoning = "";
let content = "";

call.on("data", (msg) => {
  const d = msg.delta || {};
  if (d.reasoning_content) reasoning += d.reasoning_content;
  if (d.content) content += d.content;
  for (const tc of d.tool_calls || []) {
    const c = (toolCalls[tc.index] = toolCalls[tc.index] || { id: "", name: "", arguments: "" });
    c.id += tc.id || "";
    c.name += tc.name || "";
    c.arguments += tc.arguments || "";
  }
  if (msg.finish) {
    console.log(JSON.stringify({
      id: msg.id,
      reasoning_content: reasoning,
      content,
      tool_calls: Object.values(toolCalls).map((c) => ({ ...c, arguments: JSON.parse(c.arguments || "{}") })),
      finish: msg.finish,
      usage: msg.usage,
    }, null, 2));
  }
});
call.on("error", (err) => {
  // INVALID_ARGUMENT names the field, e.g. "sampling.top_p must be in (0, 1], got 2"
  console.error(`gRPC error ${grpc.status[err.code]}: ${err.details}`);
  process.exitCode = 1;
});
call.on("end", () => client.close());
