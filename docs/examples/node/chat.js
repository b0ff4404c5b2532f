// Chat with the glmserve gateway's gRPC API from Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
//   npm install @grpc/grpc-js @grpc/proto-loader      (in the current directory, the script's, or NODE_PATH)
//   node path/to/docs/examples/node/chat.js [host:port]    (default 127.0.0.1:30010, the gateway's gRPC port)
//
// Runs from any directory. Streams the answer: reasoning, content and tool-call fragments as they
// arrive, then the finish reason and token usage. Set GLMSERVE_PROTO_ROOT if the script is moved out
// of the repository (it reads protos/gateway.proto from there).
"use strict";

const path = require("path");
const { createRequire } = require("module");

// Packages are looked up next to this script (and NODE_PATH), then in the current directory.
function load(name) {
  for (const base of [__filename, path.join(process.cwd(), "noop.js")]) {
    try {
      return createRequire(base)(name);
    } catch (err) {
      if (err.code !== "MODULE_NOT_FOUND") throw err;
    }
  }
  console.error(`cannot find ${name}: run \`npm install @grpc/grpc-js @grpc/proto-loader\` here`);
  process.exit(1);
}
const grpc = load("@grpc/grpc-js");
const protoLoader = load("@grpc/proto-loader");

const address = process.argv[2] || "127.0.0.1:30010";
const protoRoot = process.env.GLMSERVE_PROTO_ROOT || path.resolve(__dirname, "..", "..", "..");

const definition = protoLoader.loadSync(path.join(protoRoot, "protos", "gateway.proto"), {
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
