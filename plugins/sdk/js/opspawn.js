// Opspawn tools in JavaScript: `tool()` registers a function as a tool,
// and `tools` is the export the `tool` world asks for (re-export it from
// your app: `export { tools } from "./opspawn.js";`).
//
// A schema is either a JSON Schema object (`{type: "object", ...}`) or a
// shorthand: `{text: "string", limit: "integer?"}` is an object whose
// properties have those types, all required but the ones ending in `?`.
// A thrown `ToolError` answers its code; anything else thrown answers
// `tool_failed`; input that is not a JSON object answers `invalid_input`.
// Built with componentize-js 0.23.0 (see docs/plugins/javascript.md).

const registry = new Map();

export class ToolError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export function tool(name, description, schema, run) {
  registry.set(name, { name, description, schema: expand(schema), run });
}

function expand(schema) {
  if (typeof schema.type === "string") return schema;
  const properties = {};
  const required = [];
  for (const [key, type] of Object.entries(schema)) {
    const optional = type.endsWith("?");
    properties[key] = { type: optional ? type.slice(0, -1) : type };
    if (!optional) required.push(key);
  }
  return { type: "object", properties, required, additionalProperties: false };
}

function fail(code, message) {
  // componentize-js turns a thrown `{code, message}` into the error result.
  throw { code, message };
}

export const tools = {
  describe() {
    return [...registry.values()].map((t) => ({
      name: t.name,
      description: t.description,
      inputSchema: JSON.stringify(t.schema),
    }));
  },

  invoke(context, name, input) {
    const t = registry.get(name);
    if (!t) fail("unknown_tool", `this component has no tool named '${name}'`);
    let args;
    try {
      args = JSON.parse(input);
    } catch (e) {
      fail("invalid_input", `the input is not JSON: ${e.message}`);
    }
    if (args === null || typeof args !== "object" || Array.isArray(args)) {
      fail("invalid_input", "the input must be a JSON object");
    }
    let output;
    try {
      output = t.run(args, context);
    } catch (e) {
      if (e instanceof ToolError) fail(e.code, e.message);
      fail("tool_failed", `${e?.name ?? "Error"}: ${e?.message ?? e}`);
    }
    return JSON.stringify(output ?? null);
  },
};
