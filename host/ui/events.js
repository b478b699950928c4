// A task's Server-Sent Events over fetch (EventSource cannot send an
// Authorization header). After a lost connection it reconnects with
// Last-Event-ID, so no event is missed or repeated.

import { failure, headers } from "./api.js";

/** Wait before reconnecting, growing to RETRY_MAX_MS. */
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5000;

/**
 * Follows `/v1/tasks/{id}/events` until `task.finished` or `stop()`.
 * `on.event(event)` gets each parsed event; `on.connection(state)` gets
 * "open", "reconnecting" or "closed"; `on.error(apiError)` an answer that
 * is not a stream (the task is gone, the token was refused): no retry then.
 */
export function follow(taskId, on) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;
  let wait = RETRY_FIRST_MS;

  async function connect() {
    while (!stopped) {
      const extra = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
      let finished = false;
      try {
        const response = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/events`, {
          headers: headers({ Accept: "text/event-stream", ...extra }),
          signal: controller.signal,
          cache: "no-store",
        });
        if (!response.ok) {
          on.error(await failure(response));
          return;
        }
        on.connection("open");
        wait = RETRY_FIRST_MS;
        finished = await read(response.body, (event) => {
          if (event.seq > 0) lastId = event.seq;
          on.event(event);
        });
      } catch (error) {
        if (stopped) return;
        // A network error or a cut stream: reconnect below.
      }
      if (finished || stopped) {
        on.connection("closed");
        return;
      }
      on.connection("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, RETRY_MAX_MS);
    }
  }

  connect();
  return {
    stop() {
      stopped = true;
      controller.abort();
    },
  };
}

/** Reads SSE frames; true once `task.finished` arrived. */
async function read(body, deliver) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parse(frame);
      if (!event) continue;
      deliver(event);
      if (event.kind === "task.finished") {
        reader.cancel().catch(() => {});
        return true;
      }
    }
  }
}

/** One frame's data, as JSON; null for a keep-alive comment. */
function parse(frame) {
  const data = frame
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n");
  return data ? JSON.parse(data) : null;
}
