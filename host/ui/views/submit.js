// Submitting a task: goal, planner, LLM, model, tools and options; then the
// new task's page.

import { get, post } from "../api.js";
import { fill, h, problem } from "../dom.js";

export default async function submit(context) {
  let plugins;
  try {
    plugins = await get("/v1/plugins");
  } catch (error) {
    context.fail(error);
    return;
  }
  const named = (kind) => plugins.plugins.filter((p) => p.kind === kind).map((p) => p.name);
  const tools = plugins.plugins.flatMap((p) => (p.tools || []).map((t) => ({ name: t.name, description: t.description })));
  for (const server of plugins.mcp_servers || []) {
    for (const tool of server.tools || []) tools.push({ name: tool.name, description: tool.description || "" });
  }
  const message = h("div", { "aria-live": "polite" });
  const choice = (id, label, names, preferred) =>
    h("div", { class: "field" }, h("label", { for: id }, label),
      h("select", { id, name: id }, names.map((n) => h("option", { value: n, selected: n === preferred }, n))));

  const form = h("form", { class: "submit", novalidate: true },
    h("div", { class: "field" },
      h("label", { for: "goal" }, "Goal"),
      h("textarea", { id: "goal", name: "goal", rows: 3, required: true, placeholder: "What is (2+3)*4?" })),
    h("div", { class: "row" },
      choice("planner", "Planner", named("planner"), "react"),
      choice("llm", "LLM adapter", named("llm-adapter"), "scripted"),
      h("div", { class: "field" }, h("label", { for: "model" }, "Model (optional)"),
        h("input", { id: "model", name: "model", autocomplete: "off" }))),
    h("fieldset", { class: "tools" },
      h("legend", {}, "Tools (none ticked: the server's default)"),
      tools.length
        ? tools.map((t) => h("label", { class: "check", title: t.description },
            h("input", { type: "checkbox", name: "tools", value: t.name }), " ", t.name))
        : h("p", {}, "No tools are loaded.")),
    h("div", { class: "field" },
      h("label", { for: "options" }, "Options (JSON: {\"planner\": {…}, \"llm\": {…}})"),
      h("textarea", { id: "options", name: "options", rows: 5, class: "code", spellcheck: "false", placeholder: "{}" })),
    h("div", { class: "row" },
      number("max_steps", "Max steps", 1, 1000),
      number("max_retries", "Max retries", 0, 100),
      number("timeout_secs", "Timeout (s)", 1, 604800)),
    message,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Submit task")));

  fill(context.main, h("h1", {}, "Submit a task"), form);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(message);
    const request = read(form, message);
    if (!request) return;
    try {
      const created = await post("/v1/tasks", request);
      context.go(`#/task/${encodeURIComponent(created.id)}`);
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(message, problem(error));
    }
  });
}

function number(id, label, min, max) {
  return h("div", { class: "field" }, h("label", { for: id }, label),
    h("input", { id, name: id, type: "number", min, max, inputmode: "numeric" }));
}

/** The request the form describes, or null (with the reason shown). */
function read(form, message) {
  const data = new FormData(form);
  const goal = String(data.get("goal") || "").trim();
  if (!goal) {
    fill(message, problem({ code: null, message: "Write a goal." }));
    form.goal.focus();
    return null;
  }
  const request = { goal, planner: data.get("planner"), llm: data.get("llm") };
  const tools = data.getAll("tools");
  if (tools.length) request.tools = tools;
  const model = String(data.get("model") || "").trim();
  if (model) request.model = model;
  const options = String(data.get("options") || "").trim();
  if (options) {
    try {
      request.options = JSON.parse(options);
    } catch (error) {
      fill(message, problem({ code: null, message: `The options are not JSON: ${error.message}` }));
      form.options.focus();
      return null;
    }
  }
  for (const field of ["max_steps", "max_retries", "timeout_secs"]) {
    const value = String(data.get(field) || "").trim();
    if (value) request[field] = Number(value);
  }
  return request;
}
