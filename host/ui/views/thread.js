// A conversation thread: its tasks, newest first, a page at a time,
// refreshed while the tab is visible; and deleting it with its tasks.

import { get, query, remove } from "../api.js";
import { fill, h, problem } from "../dom.js";
import { row, taskTable } from "./tasks.js";

const PAGE = 25;
/** How often the list is refreshed while visible. */
const REFRESH_MS = 2000;

export default async function thread(context, id) {
  const path = `/v1/threads/${encodeURIComponent(id)}`;
  fill(context.main, h("h1", {}, "Thread"), h("p", { role: "status" }, "Loading…"));
  let first;
  try {
    first = await get(path + query({ limit: PAGE }));
  } catch (error) {
    if (["thread_not_found", "invalid_thread", "route_not_found"].includes(error.code)) {
      fill(context.main,
        h("h1", {}, "No such thread"),
        h("p", { class: "error", role: "alert" }, `There is no thread with the id “${id}”.`),
        h("p", {}, h("a", { href: "#/tasks" }, "Back to the tasks")));
    } else {
      context.fail(error);
    }
    return;
  }

  const rows = h("tbody");
  const note = h("p", { class: "note", role: "status", "aria-live": "polite" });
  const message = h("div", { "aria-live": "polite" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const deleteButton = h("button", { type: "button", class: "danger" }, "Delete thread");
  fill(context.main,
    h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "Tasks"), " / thread"),
    h("h1", {}, "Thread ", h("code", {}, id)),
    h("p", {}, "Its tasks run one at a time, in order; each one's planner is given the earlier ones."),
    h("div", { class: "actions" }, deleteButton),
    message,
    note,
    taskTable("The thread's tasks, newest first", rows),
    more);

  // Pages loaded so far: each refresh reloads as many tasks as are shown.
  let shown = PAGE;
  let cursor = null;

  function show(page) {
    fill(rows, page.tasks.map(row));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  }

  async function load() {
    try {
      show(await get(path + query({ limit: Math.min(shown, 500) })));
      fill(note);
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(note, problem(error));
    }
  }

  more.addEventListener("click", async () => {
    try {
      const page = await get(path + query({ limit: PAGE, cursor }));
      rows.append(...page.tasks.map(row));
      shown += page.tasks.length;
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } catch (error) {
      fill(note, problem(error));
    }
  });

  show(first);
  const timer = setInterval(() => {
    if (document.visibilityState === "visible") load();
  }, REFRESH_MS);
  context.onLeave(() => clearInterval(timer));

  /** Asks first; refused (409 thread_active) while a task of it is unfinished. */
  deleteButton.addEventListener("click", async () => {
    if (!confirm(`Delete the thread “${id}” with all its tasks, their steps and events? This cannot be undone.`)) return;
    fill(message);
    try {
      await remove(path);
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(message, problem(error));
      return;
    }
    clearInterval(timer);
    fill(context.main,
      h("h1", {}, "Thread deleted"),
      h("p", { role: "status" }, `The thread “${id}” and its tasks are deleted.`),
      h("p", {}, h("a", { href: "#/tasks" }, "Back to the tasks")));
  });
}
