// A conversation thread: its tasks, newest first, a page at a time,
// refreshed while the tab is visible; and deleting it with its tasks.

import { get, query, remove } from "../api.js";
import { fill, h, noSuch, problem, refreshWhileVisible } from "../dom.js";
import { PAGE, taskPages, taskTable } from "./tasks.js";

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
      noSuch(context, "thread", id);
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

  const pages = taskPages(rows, more, note, (page) => get(path + query(page)));

  async function load() {
    try {
      pages.show(await pages.reload());
      fill(note);
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(note, problem(error));
    }
  }

  pages.show(first);
  const timer = refreshWhileVisible(context, load, REFRESH_MS);

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
