// Calls to the REST API. The token lives in sessionStorage (this tab only)
// and travels in the Authorization header, never in a URL.

const TOKEN_KEY = "opspawn.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answer of the API: `{error: {code, message}}` and its status. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  get unauthenticated() {
    return this.status === 401;
  }
}

/** The headers every call carries. */
export function headers(extra = {}) {
  const all = { Accept: "application/json", ...extra };
  const saved = token();
  if (saved) all.Authorization = `Bearer ${saved}`;
  return all;
}

/** Turns a failed response into an ApiError with the server's code and message. */
export async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page): the status says enough.
  }
  const error = body && body.error ? body.error : {};
  return new ApiError(
    response.status,
    error.code || "http_" + response.status,
    error.message || `the server answered ${response.status} ${response.statusText}`,
  );
}

/** Sends a request and returns its JSON (null for a 204), or throws an ApiError. */
export async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, "unreachable", `the server cannot be reached (${error.message})`);
  }
  if (!response.ok) throw await failure(response);
  // A deletion answers 204, with no body.
  return response.status === 204 ? null : response.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const remove = (path) => call("DELETE", path);

/** A query string from the set values of `params`. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}
