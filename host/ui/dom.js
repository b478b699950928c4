// A few helpers to build the page from plain DOM calls: no framework, no
// HTML strings (so no markup injection from data).

/**
 * An element: `h("a", {href: "#/tasks", class: "x"}, "text", child)`.
 * Attributes starting with "on" become listeners; `null`/`false` ones are
 * left out; children may be strings, nodes, arrays or null.
 */
export function h(tag, attributes = {}, ...children) {
  const svg = SVG_TAGS.has(tag);
  const element = svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

const SVG_TAGS = new Set(["svg", "g", "rect", "line", "title"]);

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else parent.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces the contents of `element` with `children`. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A time as the reader's locale writes it. */
export function when(rfc3339) {
  return rfc3339 ? new Date(rfc3339).toLocaleString() : "—";
}

/**
 * US dollars from the API's `cost_usd`: "unknown" for null (a model with
 * no price), and enough decimals that small costs do not show as $0.00.
 */
export function money(usd) {
  if (usd == null) return "unknown";
  if (usd === 0) return "$0.00";
  if (usd >= 0.01) return `$${usd.toFixed(2)}`;
  // Two significant digits, in plain decimals (never 1.5e-7).
  const decimals = Math.min(9, Math.ceil(-Math.log10(usd)) + 1);
  return `$${usd.toFixed(decimals).replace(/0+$/, "")}`;
}

/** A duration in ms, short. */
export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const minutes = Math.floor(ms / 60_000);
  if (minutes < 60) return `${minutes} min ${Math.round((ms % 60_000) / 1000)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** The status of a task or step as a labelled badge. */
export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

/** JSON shown longer than this is cut, with a button to show it whole. */
export const SHOWN_JSON_CHARS = 4000;

/** JSON, pretty-printed; cut after SHOWN_JSON_CHARS with a "show all" button. */
export function json(value) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  const pre = h("pre", { class: "json" });
  if (text.length <= SHOWN_JSON_CHARS) return fill(pre, text);
  fill(pre, text.slice(0, SHOWN_JSON_CHARS) + "\n…");
  const more = h(
    "button",
    {
      type: "button",
      class: "quiet",
      onclick: () => {
        fill(pre, text);
        more.remove();
      },
    },
    `Show all (${text.length.toLocaleString()} characters)`,
  );
  return h("div", {}, pre, more);
}

/** Calls `load` every `ms` while the tab is visible, until the view is left. */
export function refreshWhileVisible(context, load, ms) {
  const timer = setInterval(() => {
    if (document.visibilityState === "visible") load();
  }, ms);
  context.onLeave(() => clearInterval(timer));
  return timer;
}

/** The page for an id the server does not know: `what` ("task", "thread"). */
export function noSuch(context, what, id) {
  fill(context.main,
    h("h1", {}, `No such ${what}`),
    h("p", { class: "error", role: "alert" }, `There is no ${what} with the id “${id}”.`),
    h("p", {}, h("a", { href: "#/tasks" }, "Back to the tasks")));
}

/** A message saying what went wrong, with the server's code. */
export function problem(error) {
  return h(
    "p",
    { class: "error", role: "alert" },
    error.code ? h("code", {}, error.code) : null,
    error.code ? " " : null,
    error.message,
  );
}
