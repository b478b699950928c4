// The task list: counts by status, filters (status, plugin, goal text),
// pages by cursor, refreshed while the tab is visible.

import { get, query } from "../api.js";
import { badge, duration, fill, h, money, problem, refreshWhileVisible, when } from "../dom.js";

const STATUSES = ["queued", "running", "waiting_approval", "succeeded", "failed", "cancelled"];
/** Tasks per page, in every list of tasks. */
export const PAGE = 25;
/** How often the list is refreshed while visible. */
const REFRESH_MS = 2000;

export default function tasks(context) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filters = {
    status: params.get("status") || "",
    plugin: params.get("plugin") || "",
    q: params.get("q") || "",
  };
  const counts = h("ul", { class: "counts", "aria-label": "Tasks by status" });
  const rows = h("tbody");
  const note = h("p", { class: "note", role: "status", "aria-live": "polite" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const pluginList = h("datalist", { id: "plugin-names" });

  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter tasks" },
    h("div", { class: "field" }, h("label", { for: "filter-status" }, "Status"),
      h("select", { id: "filter-status", name: "status" },
        h("option", { value: "" }, "any"),
        STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)))),
    h("div", { class: "field" }, h("label", { for: "filter-plugin" }, "Plugin"),
      h("input", { id: "filter-plugin", name: "plugin", list: "plugin-names", value: filters.plugin,
        placeholder: "planner, LLM or tool", autocomplete: "off" }), pluginList),
    h("div", { class: "field grow" }, h("label", { for: "filter-q" }, "Goal contains"),
      h("input", { id: "filter-q", name: "q", type: "search", value: filters.q, autocomplete: "off" })),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Filter")),
  );

  fill(
    context.main,
    h("h1", {}, "Tasks"),
    counts,
    form,
    note,
    taskTable("Tasks, newest first", rows),
    more,
  );

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    context.go("#/tasks" + query(Object.fromEntries(data)));
  });

  const pages = taskPages(rows, more, note, (page) => get("/v1/tasks" + query({ ...filters, ...page })));

  async function load() {
    try {
      const [page, stats] = await Promise.all([pages.reload(), get("/v1/stats")]);
      showCounts(counts, stats, filters);
      pages.show(page);
      note.textContent = page.tasks.length ? "" : "No tasks match.";
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(note, problem(error));
    }
  }

  get("/v1/plugins")
    .then((view) => {
      const names = new Set(view.plugins.map((p) => p.name));
      for (const plugin of view.plugins) for (const tool of plugin.tools || []) names.add(tool.name);
      fill(pluginList, [...names].sort().map((name) => h("option", { value: name })));
    })
    .catch(() => {});

  load();
  refreshWhileVisible(context, load, REFRESH_MS);
}

/**
 * The tasks `fetchPage(params)` pages through, shown in `rows`: "Load more"
 * (`more`) appends the next page, `reload()` fetches again as many as are
 * shown (for a refresh) and `show(page)` puts a page in place. A view that
 * lists tasks (the list, a thread) uses one.
 */
export function taskPages(rows, more, note, fetchPage) {
  let shown = PAGE;
  let cursor = null;
  more.addEventListener("click", async () => {
    try {
      const page = await fetchPage({ limit: PAGE, cursor });
      rows.append(...page.tasks.map(row));
      shown += page.tasks.length;
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } catch (error) {
      fill(note, problem(error));
    }
  });
  return {
    reload: () => fetchPage({ limit: Math.min(shown, 500) }),
    show(page) {
      fill(rows, page.tasks.map(row));
      cursor = page.next_cursor;
      more.hidden = !cursor;
    },
  };
}

/** A table of tasks, a `row` each in `rows` (a tbody); a thread's page has one too. */
export function taskTable(caption, rows) {
  return h("div", { class: "table-wrap" },
    h("table", { class: "tasks" },
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Status"),
        h("th", { scope: "col" }, "Goal"),
        h("th", { scope: "col", class: "wide" }, "Planner / LLM"),
        h("th", { scope: "col", class: "wide" }, "Created"),
        h("th", { scope: "col" }, "Took"),
        h("th", { scope: "col" }, "Cost"))),
      rows));
}

/** One task's row of a `taskTable`, its goal a link to its page. */
export function row(task) {
  const took = task.finished_at && task.started_at
    ? Date.parse(task.finished_at) - Date.parse(task.started_at)
    : null;
  return h("tr", { "data-task": task.id },
    h("td", {}, badge(task.status)),
    h("td", { class: "goal" }, h("a", { href: `#/task/${encodeURIComponent(task.id)}` }, task.goal)),
    h("td", { class: "wide" }, `${task.planner} / ${task.llm}`),
    h("td", { class: "wide" }, when(task.created_at)),
    h("td", {}, duration(took)),
    h("td", { class: "cost" }, money(task.cost_usd)));
}

/** The counts by status, each a link filtering the list to it. */
function showCounts(list, stats, filters) {
  fill(list, STATUSES.map((status) => {
    const count = stats.counts[status] ?? 0;
    const shown = count >= stats.count_limit ? `${count.toLocaleString()}+` : count.toLocaleString();
    const href = "#/tasks" + query({ ...filters, status: filters.status === status ? "" : status });
    return h("li", {},
      h("a", { href, class: `count status-${status}`, "aria-current": filters.status === status ? "true" : null },
        h("span", { class: "number" }, shown), " ", status));
  }));
}
