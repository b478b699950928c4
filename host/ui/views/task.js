// One task: its details, a live step timeline over the event stream (LLM
// text streams in as it arrives), usage, cancel and retry.

import { get, post, query } from "../api.js";
import { follow } from "../events.js";
import { badge, duration, fill, h, json, money, noSuch, problem, when } from "../dom.js";

export default async function task(context, id) {
  fill(context.main, h("h1", {}, "Task"), h("p", { role: "status" }, "Loading…"));
  let record;
  try {
    record = await get(`/v1/tasks/${encodeURIComponent(id)}`);
  } catch (error) {
    if (context.left()) return;
    if (error.code === "task_not_found" || error.code === "route_not_found") {
      noSuch(context, "task", id);
    } else {
      context.fail(error);
    }
    return;
  }
  // Left while it loaded: the view shown now owns the page.
  if (context.left()) return;
  new TaskPage(context, record).start();
}

class TaskPage {
  constructor(context, record) {
    this.context = context;
    this.task = record;
    // Each step's card, by seq.
    this.cards = new Map();
    this.header = h("div");
    this.connection = h("p", { class: "connection", role: "status", "aria-live": "polite" });
    this.timeline = h("ol", { class: "timeline", "aria-label": "Steps" });
    this.actions = h("div", { class: "actions" });
    this.message = h("div", { "aria-live": "polite" });
    fill(context.main, this.header, this.actions, this.message,
      h("h2", {}, "Steps"), this.connection, this.timeline);
    this.showHeader();
    for (const step of record.steps || []) this.showStep(step);
  }

  start() {
    this.loadHashes();
    const stream = follow(this.task.id, {
      event: (event) => this.apply(event),
      connection: (state) => this.showConnection(state),
      error: (error) => {
        if (error.unauthenticated) this.context.fail(error);
        else fill(this.message, problem(error));
      },
    });
    this.context.onLeave(() => stream.stop());
  }

  showConnection(state) {
    this.connection.dataset.state = state;
    this.connection.textContent = {
      open: this.finished() ? "" : "Live: steps appear as they happen.",
      reconnecting: "Connection lost: reconnecting…",
      closed: "",
    }[state];
  }

  finished() {
    return ["succeeded", "failed", "cancelled"].includes(this.task.status);
  }

  /** One event from the stream. */
  apply(event) {
    const data = event.data || {};
    switch (event.kind) {
      case "task.started":
        this.task.status = "running";
        this.task.attempt = data.attempt ?? this.task.attempt;
        break;
      case "task.cancel_requested":
        this.task.cancel_requested = true;
        break;
      case "step.started":
      case "step.finished":
        this.showStep(this.merge(data));
        break;
      case "llm.delta":
        this.streamText(data.step, data.text);
        return;
      case "task.finished":
        // The final record: result, error, usage, and whole payloads.
        this.refresh();
        break;
      default:
        return;
    }
    this.showHeader();
  }

  /** A step event's fields over what is known of the step. */
  merge(data) {
    const known = this.steps().find((s) => s.seq === data.seq) || {};
    const step = { ...known, ...data };
    if (typeof data.started_at === "number") step.started_at = new Date(data.started_at).toISOString();
    if (typeof data.finished_at === "number") {
      step.finished_at = new Date(data.finished_at).toISOString();
      step.duration_ms = data.finished_at - Date.parse(step.started_at);
    }
    // Keep what is known whole over an event's size note (or its absence).
    for (const field of ["input", "output"]) {
      if (known[field] !== undefined && !isNote(known[field]) && (!(field in data) || isNote(data[field]))) {
        step[field] = known[field];
      }
    }
    const steps = this.steps().filter((s) => s.seq !== data.seq);
    steps.push(step);
    this.task.steps = steps.sort((a, b) => a.seq - b.seq);
    return step;
  }

  steps() {
    return this.task.steps || [];
  }

  async refresh() {
    try {
      this.task = await get(`/v1/tasks/${encodeURIComponent(this.task.id)}`);
      this.showHeader();
      for (const step of this.steps()) this.showStep(step);
    } catch (error) {
      fill(this.message, problem(error));
    }
  }

  showHeader() {
    const t = this.task;
    const usage = t.usage || { input_tokens: 0, output_tokens: 0 };
    fill(this.header,
      h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "Tasks"), " / ", h("code", {}, t.id)),
      h("h1", { class: "goal" }, t.goal),
      h("dl", { class: "facts" },
        fact("Status", badge(t.status), t.cancel_requested && !this.finished() ? " (cancelling)" : null),
        fact("Planner", t.planner),
        fact("LLM", t.llm, t.model ? ` (${t.model})` : null),
        fact("Tools", t.tools.length ? t.tools.join(", ") : "none"),
        t.thread ? fact("Thread", h("a", { href: `#/thread/${encodeURIComponent(t.thread)}` }, t.thread)) : null,
        t.memory_namespace
          ? fact("Memory namespace", h("a", { href: "#/memory" + query({ namespace: t.memory_namespace }) }, t.memory_namespace))
          : null,
        fact("Created", when(t.created_at)),
        fact("Finished", when(t.finished_at)),
        fact("Attempt", String(t.attempt)),
        fact("Tokens", `${usage.input_tokens.toLocaleString()} in, ${usage.output_tokens.toLocaleString()} out`),
        fact("Cost", h("span", { class: "cost" }, money(t.cost_usd))),
        t.budget ? fact("Budget", budgetText(t.budget)) : null),
      t.result != null ? h("section", { class: "result" }, h("h2", {}, "Result"), h("pre", { class: "result-text" }, t.result)) : null,
      t.error ? h("section", { class: "result failed" }, h("h2", {}, "Error"),
        h("p", { class: "error" }, h("code", {}, t.error.code), " ", t.error.message)) : null);
    this.showActions();
  }

  showActions() {
    const cancel = h("button", { type: "button", class: "danger", onclick: () => this.cancel() }, "Cancel task");
    const retry = h("button", { type: "button", onclick: () => this.retry() }, "Run again");
    fill(this.actions, this.finished() || this.task.cancel_requested ? null : cancel, retry);
  }

  async cancel() {
    try {
      this.task = { ...this.task, ...(await post(`/v1/tasks/${encodeURIComponent(this.task.id)}/cancel`)), steps: this.task.steps };
      this.showHeader();
      fill(this.message, h("p", { role: "status" }, this.finished() ? "Cancelled." : "Cancelling at the next step boundary…"));
    } catch (error) {
      if (error.unauthenticated) this.context.fail(error);
      else fill(this.message, problem(error));
    }
  }

  /** Submits the same goal and options as a new task, and follows it. */
  async retry() {
    const t = this.task;
    const request = {
      goal: t.goal, planner: t.planner, llm: t.llm, tools: t.tools, options: t.options,
      max_steps: t.max_steps, max_retries: t.max_retries,
      timeout_secs: Math.max(1, Math.round(t.timeout_secs)), priority: t.priority,
    };
    if (t.model) request.model = t.model;
    try {
      const created = await post("/v1/tasks", request);
      this.context.go(`#/task/${encodeURIComponent(created.id)}`);
    } catch (error) {
      if (error.unauthenticated) this.context.fail(error);
      else fill(this.message, problem(error));
    }
  }

  /** Draws (or redraws) one step's card, keeping it open if it was. */
  showStep(step) {
    const previous = this.cards.get(step.seq);
    const open = previous ? previous.open : step.status === "failed";
    const card = h("details", { class: `step status-${step.status}`, "data-seq": step.seq, open },
      h("summary", {},
        h("span", { class: "seq" }, `#${step.seq}`), " ",
        h("span", { class: "kind" }, step.kind), " ",
        h("code", { class: "plugin" }, step.plugin),
        this.pluginHash(step), " ",
        badge(step.status), " ",
        h("span", { class: "took" }, step.duration_ms != null ? duration(step.duration_ms) : ""),
        step.attempt > 1 ? h("span", { class: "attempt" }, ` attempt ${step.attempt}`) : null,
        step.error ? h("span", { class: "error" }, " ", h("code", {}, step.error.code)) : null),
      h("div", { class: "step-body" },
        step.error ? h("p", { class: "error" }, h("code", {}, step.error.code), " ", step.error.message) : null,
        step.usage ? h("p", { class: "usage" }, `Tokens: ${step.usage.input_tokens} in, ${step.usage.output_tokens} out`) : null,
        h("h3", {}, "Input"), this.payload(step, "input"),
        step.status === "running" ? h("pre", { class: "stream", "aria-live": "polite" }, previous?.querySelector(".stream")?.textContent || "") : null,
        step.status !== "running" && !step.error ? [h("h3", {}, "Output"), this.payload(step, "output")] : null));
    if (previous) previous.replaceWith(card);
    else this.timeline.append(card);
    this.cards.set(step.seq, card);
  }

  /** A payload, or for one stored out of line a button that fetches it. */
  payload(step, field) {
    const value = step[field];
    if (isNote(value)) {
      const holder = h("div", {},
        h("button", { type: "button", class: "quiet", onclick: async () => {
          try {
            const whole = await get(`/v1/tasks/${encodeURIComponent(this.task.id)}`);
            const full = (whole.steps || []).find((s) => s.seq === step.seq);
            fill(holder, json(full ? full[field] : null));
          } catch (error) {
            fill(holder, problem(error));
          }
        } }, `Load ${field} (${value.bytes.toLocaleString()} bytes)`));
      return holder;
    }
    return json(value === undefined ? null : value);
  }

  streamText(seq, text) {
    const card = this.cards.get(seq);
    const stream = card && card.querySelector(".stream");
    if (stream) stream.textContent += text;
  }

  /**
   * The content hash of the plugin version that ran `step`, short; for a
   * step journaled without one, that of the plugin loaded under its name now.
   */
  pluginHash(step) {
    const ran = step.plugin_sha256;
    const sha256 = ran || (this.hashes && this.hashes.get(step.plugin));
    if (!sha256) return null;
    const title = ran
      ? `SHA-256 of the plugin version that ran this step: ${sha256}`
      : `SHA-256 of the plugin loaded now: ${sha256}`;
    return h("code", { class: "hash", title }, ` ${sha256.slice(0, 12)}`);
  }

  async loadHashes() {
    try {
      const view = await get("/v1/plugins");
      this.hashes = new Map(view.plugins.map((p) => [p.name, p.sha256]));
      for (const step of this.steps()) this.showStep(step);
    } catch {
      // The hashes are a detail: the timeline stands without them.
    }
  }
}

/** A payload stored out of line, as events carry it: only its size. */
function isNote(value) {
  return Boolean(value && typeof value === "object" && value.out_of_line === true);
}

function fact(label, ...value) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, ...value));
}


/** A task's caps and what is left of them, in words. */
function budgetText(budget) {
  const parts = [];
  if (budget.max_tokens != null) {
    parts.push(`${budget.remaining_tokens.toLocaleString()} of ${budget.max_tokens.toLocaleString()} tokens left`);
  }
  if (budget.max_cost_usd != null) {
    parts.push(`${money(budget.remaining_cost_usd)} of ${money(budget.max_cost_usd)} left`);
  }
  return parts.join("; ");
}
