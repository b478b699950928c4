// The dashboard's shell: a hash router over the views, and signing in when
// the server asks for a token.

import { setToken, token } from "./api.js";
import { fill, h, problem } from "./dom.js";
import memory from "./views/memory.js";
import overview from "./views/overview.js";
import plugins from "./views/plugins.js";
import submit from "./views/submit.js";
import task from "./views/task.js";
import tasks from "./views/tasks.js";
import thread from "./views/thread.js";

const main = document.getElementById("main");
const dialog = document.getElementById("sign-in");
const signInForm = document.getElementById("sign-in-form");
const signInError = document.getElementById("sign-in-error");
const signOut = document.getElementById("sign-out");

/** `#/tasks`, `#/task/<id>`, `#/thread/<id>`, …: the view and its argument. */
function route() {
  const [path] = location.hash.split("?");
  const [, name = "overview", ...rest] = path.split("/");
  const argument = rest.length ? decodeURIComponent(rest.join("/")) : undefined;
  const views = { overview, tasks, task, thread, submit, plugins, memory };
  return { name: views[name] ? name : "notFound", view: views[name], argument };
}

/** What the view showing now must stop (timers, streams) when it goes. */
let leaving = null;
/** How many times a view was rendered: a view whose number is not the last has been left. */
let renders = 0;

/** The context a view gets: where to render, and how to report a failure. */
function context() {
  const rendered = ++renders;
  return {
    main,
    /**
     * Whether the view was left meanwhile (another was rendered while it
     * loaded): it must then neither render nor start anything.
     */
    left() {
      return rendered !== renders;
    },
    /** Shows an API error; a refused token asks for another. */
    fail(error) {
      if (!error.unauthenticated) {
        fill(main, problem(error));
        return;
      }
      // No more polling with a token the server refuses.
      if (leaving) leaving();
      leaving = null;
      askForToken(error);
    },
    /** Runs `stop` when the view is left (at once, if it already was). */
    onLeave(stop) {
      if (rendered !== renders) {
        stop();
        return;
      }
      const previous = leaving;
      leaving = () => {
        if (previous) previous();
        stop();
      };
    },
    go(hash) {
      if (location.hash === hash) render();
      else location.hash = hash;
    },
  };
}

function render() {
  if (leaving) leaving();
  leaving = null;
  const { name, view, argument } = route();
  for (const link of document.querySelectorAll("nav a")) {
    const current = link.dataset.view === name
      || ((name === "task" || name === "thread") && link.dataset.view === "tasks");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  signOut.hidden = !token();
  if (!view) {
    fill(main, h("h1", {}, "Not found"), h("p", {}, "There is no such page. ", h("a", { href: "#/overview" }, "Go to the overview.")));
    return;
  }
  view(context(), argument);
}

/** Opens the sign-in dialog, saying why (the 401's message). */
function askForToken(error) {
  const refused = error.code === "invalid_token";
  signInError.hidden = false;
  signInError.textContent = refused
    ? `${error.message} Try another token.`
    : error.message;
  fill(
    main,
    h("h1", {}, "Sign in"),
    h("p", {}, "This server needs an API token."),
    h("button", { type: "button", onclick: () => dialog.showModal() }, "Sign in"),
  );
  if (!dialog.open) dialog.showModal();
  document.getElementById("token").focus();
}

signInForm.addEventListener("submit", () => {
  const value = document.getElementById("token").value.trim();
  setToken(value);
  document.getElementById("token").value = "";
  render();
});

signOut.addEventListener("click", () => {
  setToken(null);
  render();
});

window.addEventListener("hashchange", () => {
  render();
  main.focus();
});
render();
