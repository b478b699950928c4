// The overview: throughput, queue depth, running tasks and error rate over
// the last hour, from GET /v1/stats, with a small inline SVG chart.

import { get } from "../api.js";
import { duration, fill, h, money, problem, refreshWhileVisible } from "../dom.js";

/** How often the overview is refreshed while the tab is visible. */
const REFRESH_MS = 5000;

export default function overview(context) {
  const figures = h("dl", { class: "figures" });
  const spending = h("dl", { class: "figures spending" });
  const chart = h("figure", { class: "chart" });
  const note = h("div", { "aria-live": "polite" });
  fill(context.main, h("h1", {}, "Overview"), figures, chart, spending, note);

  async function load() {
    try {
      const [stats, usage] = await Promise.all([get("/v1/stats"), get("/v1/usage")]);
      show(stats);
      showUsage(usage);
      fill(note);
    } catch (error) {
      if (error.unauthenticated) context.fail(error);
      else fill(note, problem(error));
    }
  }

  function show(stats) {
    const minutes = stats.finished_per_minute;
    const total = (key) => minutes.reduce((sum, m) => sum + m[key], 0);
    const succeeded = total("succeeded");
    const failed = total("failed");
    const cancelled = total("cancelled");
    const finished = succeeded + failed + cancelled;
    const errorRate = finished ? `${((100 * failed) / finished).toFixed(1)} %` : "—";
    fill(figures,
      figure("Finished in the last hour", finished.toLocaleString(), `${(finished / 60).toFixed(1)} a minute`),
      figure("Queued", count(stats, "queued"),
        stats.oldest_queued_age_ms != null ? `oldest waiting ${duration(stats.oldest_queued_age_ms)}` : "none waiting"),
      figure("Running", count(stats, "running"), null),
      figure("Error rate (last hour)", errorRate, `${failed} failed, ${cancelled} cancelled`));
    fill(chart, bars(minutes),
      h("div", { class: "ticks", "aria-hidden": "true" }, h("span", {}, "60 min ago"), h("span", {}, "now")),
      h("figcaption", {}, "Tasks finished per minute over the last hour: ",
      h("span", { class: "key succeeded" }, "succeeded"), ", ",
      h("span", { class: "key failed" }, "failed"), ", ",
      h("span", { class: "key cancelled" }, "cancelled"), "."));
  }

  /** The tenant's spending this period, against its budget. */
  function showUsage(usage) {
    if (!usage.tracked) {
      fill(spending, figure("Spending", "—", "this tenant has no budget, so spending is not counted per period"));
      return;
    }
    const until = `this ${usage.period}, until ${new Date(usage.period_end).toLocaleDateString()}`;
    const of = (left, max, text) => (max == null ? until : `${text(left)} of ${text(max)} left, ${until}`);
    fill(spending,
      figure("Cost", money(usage.cost_usd), of(usage.remaining_cost_usd, usage.max_cost_usd, money)),
      figure("Tokens", usage.tokens.toLocaleString(),
        of(usage.remaining_tokens, usage.max_tokens, (n) => n.toLocaleString())));
  }

  load();
  refreshWhileVisible(context, load, REFRESH_MS);
}

function count(stats, status) {
  const n = stats.counts[status] ?? 0;
  return n >= stats.count_limit ? `${n.toLocaleString()}+` : n.toLocaleString();
}

function figure(label, value, detail) {
  return h("div", { class: "figure" },
    h("dt", {}, label),
    h("dd", {}, h("span", { class: "number" }, value), detail ? h("span", { class: "detail" }, detail) : null));
}

const WIDTH = 600;
const HEIGHT = 100;

/** A stacked bar per minute; each bar's <title> says its numbers. */
function bars(minutes) {
  const most = Math.max(1, ...minutes.map((m) => m.succeeded + m.failed + m.cancelled));
  const step = WIDTH / minutes.length;
  const finished = minutes.reduce((sum, m) => sum + m.succeeded + m.failed + m.cancelled, 0);
  const svg = h("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "bars", preserveAspectRatio: "none",
    "aria-label": `Bar chart: ${finished} tasks finished in the last hour; at most ${most} in one minute.`,
  });
  svg.append(h("line", { x1: 0, y1: HEIGHT, x2: WIDTH, y2: HEIGHT, class: "axis" }));
  minutes.forEach((m, i) => {
    let y = HEIGHT;
    const group = h("g", {}, h("title", {},
      `${new Date(m.minute).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}: ` +
      `${m.succeeded} succeeded, ${m.failed} failed, ${m.cancelled} cancelled`));
    for (const key of ["succeeded", "failed", "cancelled"]) {
      if (!m[key]) continue;
      const height = (m[key] / most) * (HEIGHT - 4);
      y -= height;
      group.append(h("rect", { x: (i * step + 1).toFixed(1), y: y.toFixed(1), width: Math.max(1, step - 2).toFixed(1), height: height.toFixed(1), class: key }));
    }
    svg.append(group);
  });
  return svg;
}
