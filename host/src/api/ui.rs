//! The web dashboard at `/ui/`: static files compiled into the binary
//! (plain ES modules and one stylesheet, no build step), which call the
//! REST API from the browser like any other client. Like `/docs` it is a
//! page for people, not an API operation, so it is not in the OpenAPI spec
//! and needs no token; every API call the page makes carries the token the
//! user gives it.
//!
//! Nothing runs in the server for it: each file is a `&'static str`
//! answered as it is, and only when asked for.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::{ApiError, AppState};
use crate::errors::Code;

/// Each file the page loads: its path under `/ui/`, its media type, its text.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", HTML, include_str!("../../ui/index.html")),
    ("app.css", CSS, include_str!("../../ui/app.css")),
    ("main.js", JS, include_str!("../../ui/main.js")),
    ("api.js", JS, include_str!("../../ui/api.js")),
    ("dom.js", JS, include_str!("../../ui/dom.js")),
    ("events.js", JS, include_str!("../../ui/events.js")),
    (
        "views/overview.js",
        JS,
        include_str!("../../ui/views/overview.js"),
    ),
    (
        "views/tasks.js",
        JS,
        include_str!("../../ui/views/tasks.js"),
    ),
    ("views/task.js", JS, include_str!("../../ui/views/task.js")),
    (
        "views/thread.js",
        JS,
        include_str!("../../ui/views/thread.js"),
    ),
    (
        "views/submit.js",
        JS,
        include_str!("../../ui/views/submit.js"),
    ),
    (
        "views/plugins.js",
        JS,
        include_str!("../../ui/views/plugins.js"),
    ),
    (
        "views/memory.js",
        JS,
        include_str!("../../ui/views/memory.js"),
    ),
];

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The page may load and call only this server: no inline script, no
/// other origin, no framing, no plugins. (`connect-src 'self'` covers the
/// API calls and the event stream.)
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// `/ui` (which sends the browser on to `/ui/`), `/ui/` and its files.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { file("index.html") }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>| async move { file(&path) }),
        )
}

/// The file at `path`, with the headers every dashboard file carries; an
/// unknown path is the API's `404 route_not_found`.
fn file(path: &str) -> Response {
    let Some(&(_, media_type, text)) = FILES.iter().find(|(name, ..)| *name == path) else {
        return ApiError::new(Code::RouteNotFound, "the dashboard has no such file")
            .into_response();
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(media_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            // Revalidated on every load, so a new binary's page is used at once.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ),
        ],
        text,
    )
        .into_response()
}

#[cfg(test)]
pub(crate) fn file_paths() -> impl Iterator<Item = &'static str> {
    FILES.iter().map(|(path, ..)| *path)
}
