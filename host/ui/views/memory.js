// Long-term memory: the tenant's memories, newest first (best match first
// for a search), filtered by namespace, a page at a time; adding one and
// deleting one.

import { get, post, query, remove } from "../api.js";
import { fill, h, problem, when } from "../dom.js";

const PAGE = 25;
/** Text or metadata longer than this is cut, with a button to show it whole. */
const SHOWN_CHARS = 200;

export default function memory(context) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filters = {
    q: params.get("q") || "",
    namespace: params.get("namespace") || "",
  };
  const rows = h("tbody");
  const note = h("p", { class: "note", role: "status", "aria-live": "polite" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const list = h("div", { class: "table-wrap", hidden: true },
    h("table", { class: "memories" },
      h("caption", { class: "visually-hidden" }, filters.q ? "Memories, best match first" : "Memories, newest first"),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Namespace"),
        h("th", { scope: "col" }, "Text"),
        h("th", { scope: "col", class: "wide" }, "Metadata"),
        h("th", { scope: "col", class: "wide" }, "Created"),
        h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")))),
      rows));

  const search = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Search memories" },
    h("div", { class: "field grow" }, h("label", { for: "memory-q" }, "Words"),
      h("input", { id: "memory-q", name: "q", type: "search", value: filters.q, autocomplete: "off",
        placeholder: "any of them" })),
    h("div", { class: "field" }, h("label", { for: "memory-namespace" }, "Namespace"),
      h("input", { id: "memory-namespace", name: "namespace", value: filters.namespace, autocomplete: "off",
        placeholder: "all" })),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Search")),
  );

  const text = h("textarea", { id: "memory-text", name: "text", rows: 2, required: true,
    placeholder: "The user prefers metric units" });
  const namespace = h("input", { id: "memory-new-namespace", name: "namespace", autocomplete: "off",
    placeholder: "default" });
  const message = h("div", { "aria-live": "polite" });
  const add = h("form", { class: "add", novalidate: true, "aria-labelledby": "add-title" },
    h("div", { class: "field" }, h("label", { for: "memory-text" }, "Text"), text),
    h("div", { class: "filters" },
      h("div", { class: "field" }, h("label", { for: "memory-new-namespace" }, "Namespace (optional)"), namespace),
      h("div", { class: "field" }, h("button", { type: "submit" }, "Add memory"))),
    message);

  fill(context.main,
    h("h1", {}, "Memory"),
    search,
    note,
    list,
    more,
    h("h2", { id: "add-title" }, "Add a memory"),
    add);

  search.addEventListener("submit", (event) => {
    event.preventDefault();
    context.go("#/memory" + query(Object.fromEntries(new FormData(search))));
  });

  let cursor = null;

  /** After a page: the table, "Load more", and what to say when empty. */
  function show(page) {
    cursor = page.next_cursor;
    more.hidden = !cursor;
    list.hidden = !rows.children.length;
    if (rows.children.length) fill(note);
    else if (filters.q || filters.namespace) fill(note, "No memories match.");
    else fill(note, empty());
  }

  function failed(error) {
    if (error.unauthenticated) context.fail(error);
    else fill(note, problem(error));
  }

  async function load() {
    try {
      const page = await get("/v1/memories" + query({ ...filters, limit: PAGE }));
      fill(rows, page.memories.map((m) => row(m, forget)));
      show(page);
    } catch (error) {
      failed(error);
    }
  }

  more.addEventListener("click", async () => {
    try {
      const page = await get("/v1/memories" + query({ ...filters, limit: PAGE, cursor }));
      rows.append(...page.memories.map((m) => row(m, forget)));
      show(page);
    } catch (error) {
      failed(error);
    }
  });

  /** Deletes a memory, once the reader confirms, and its row. */
  async function forget(m, tr) {
    const shown = m.text.length > 80 ? m.text.slice(0, 80) + "…" : m.text;
    if (!confirm(`Delete this memory? “${shown}” This cannot be undone.`)) return;
    try {
      await remove(`/v1/memories/${encodeURIComponent(m.id)}`);
      tr.remove();
      show({ next_cursor: cursor });
      fill(note, "Memory deleted.");
    } catch (error) {
      failed(error);
    }
  }

  add.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(message);
    const request = { text: text.value.trim() };
    if (!request.text) {
      fill(message, problem({ code: null, message: "Write the memory's text." }));
      text.focus();
      return;
    }
    if (namespace.value.trim()) request.namespace = namespace.value.trim();
    try {
      const stored = await post("/v1/memories", request);
      text.value = "";
      fill(message, h("p", { role: "status" }, `Added to the namespace ${stored.namespace}.`));
      load();
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(message, problem(error));
    }
  });

  load();
}

/** What memory is, for a tenant that has none yet. */
function empty() {
  return h("span", { class: "empty" },
    "No memories yet. Memories are notes that outlive a task: plugins that ask for memory remember and ",
    "recall them in the namespace their task names (", h("code", {}, "memory_namespace"), ", or ",
    h("code", {}, "default"), "), and you can add some below.");
}

function row(m, forget) {
  const tr = h("tr", { "data-memory": m.id },
    h("td", { class: "namespace" }, h("code", {}, m.namespace)),
    h("td", { class: "text" }, cut(m.text)),
    h("td", { class: "wide metadata" },
      m.metadata && Object.keys(m.metadata).length ? cut(JSON.stringify(m.metadata), "code") : "—"),
    h("td", { class: "wide" }, when(m.created_at),
      m.task_id ? [h("br"), h("a", { href: `#/task/${encodeURIComponent(m.task_id)}` }, "by a task")] : null),
    h("td", {}, h("button", { type: "button", class: "danger", onclick: () => forget(m, tr) }, "Delete")));
  return tr;
}

/** `text` in a `tag`, cut after SHOWN_CHARS with a button to show it whole. */
function cut(text, tag = "span") {
  if (text.length <= SHOWN_CHARS) return h(tag, {}, text);
  const shown = h(tag, {}, text.slice(0, SHOWN_CHARS) + "…");
  const more = h("button", { type: "button", class: "quiet", onclick: () => {
    fill(shown, text);
    more.remove();
  } }, "Show all");
  return h("span", {}, shown, " ", more);
}
