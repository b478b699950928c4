// What is loaded: plugins with their kind, WIT version, hash, tools and
// schemas, grants, refusals and limits; files that failed to load, with
// why; files still loading; MCP servers and their state.

import { get } from "../api.js";
import { fill, h, json, when } from "../dom.js";

export default async function plugins(context) {
  let view;
  try {
    view = await get("/v1/plugins");
  } catch (error) {
    context.fail(error);
    return;
  }
  fill(context.main,
    h("h1", {}, "Plugins"),
    view.failures.length
      ? h("section", { class: "failures", "aria-labelledby": "failures-title" },
          h("h2", { id: "failures-title" }, `Failed to load (${view.failures.length})`),
          h("ul", {}, view.failures.map((f) =>
            h("li", { class: "failure" }, h("code", {}, basename(f.file)), " ",
              h("span", { class: "badge status-failed" }, f.code),
              h("p", {}, f.error)))))
      : null,
    view.loading.length
      ? h("section", {}, h("h2", {}, "Loading"),
          h("ul", {}, view.loading.map((l) => h("li", {}, h("code", {}, basename(l.file)), ` since ${when(l.started_at)}`))))
      : null,
    h("section", { "aria-labelledby": "loaded-title" },
      h("h2", { id: "loaded-title" }, `Loaded (${view.plugins.length})`),
      h("div", { class: "cards" }, view.plugins.map(plugin))),
    h("section", { "aria-labelledby": "mcp-title" },
      h("h2", { id: "mcp-title" }, `MCP servers (${(view.mcp_servers || []).length})`),
      (view.mcp_servers || []).length
        ? h("div", { class: "cards" }, view.mcp_servers.map(mcpServer))
        : h("p", {}, "None configured.")));
}

function plugin(p) {
  return h("article", { class: "card plugin", "data-plugin": p.name },
    h("h3", {}, p.name, " ", h("span", { class: "badge" }, p.kind)),
    p.description ? h("p", {}, p.description) : null,
    h("dl", { class: "facts" },
      fact("WIT", p.wit_version),
      fact("SHA-256", h("code", { class: "hash", title: p.sha256 }, p.sha256.slice(0, 16) + "…")),
      fact("File", h("code", {}, basename(p.file)), ` (${(p.size_bytes / 1024).toFixed(0)} KiB)`)),
    (p.tools || []).length
      ? h("div", {}, h("h4", {}, "Tools"), p.tools.map((t) =>
          h("details", {}, h("summary", {}, h("code", {}, t.name), " ", t.description), json(t.input_schema))))
      : null,
    h("details", {}, h("summary", {}, "Grants"), json(p.grants)),
    h("details", {}, h("summary", {}, "Limits"), json(p.limits)),
    (p.refused || []).length
      ? h("div", { class: "refused" }, h("h4", {}, "Refused by policy"), h("ul", {}, p.refused.map((r) => h("li", {}, r))))
      : null);
}

function mcpServer(s) {
  const status = s.status === "ready" ? "succeeded" : s.status === "failed" ? "failed" : "running";
  return h("article", { class: "card" },
    h("h3", {}, s.name, " ", h("span", { class: `badge status-${status}` }, s.status)),
    s.error ? h("p", { class: "error" }, s.error) : null,
    h("dl", { class: "facts" },
      fact("Transport", s.transport ? s.transport.type : "—"),
      fact("Restarts", String(s.restarts ?? 0)),
      fact("Tools", String((s.tools || []).length))),
    (s.tools || []).length
      ? h("details", {}, h("summary", {}, "Tools"), s.tools.map((t) =>
          h("details", {}, h("summary", {}, h("code", {}, t.name), " ", t.description || ""), json(t.input_schema))))
      : null);
}

function fact(label, ...value) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, ...value));
}

function basename(path) {
  return String(path).split("/").pop();
}
