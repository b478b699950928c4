//! What every HTTP request goes through around the routes: a request id
//! (the client's `X-Request-Id` when it is usable, else a new UUID),
//! returned in `X-Request-Id` and carried by the request's log span; the
//! request log; CORS, off unless configured; a panic answered as
//! `500 internal_error`; and any error the framework answers by itself
//! rendered in the API's JSON shape.

use std::any::Any;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serde::{Deserialize, Serialize};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{OnResponse, TraceLayer};
use tracing::Span;

use super::ApiError;
use crate::errors::Code;
use crate::telemetry::TraceSpan;

/// The header a request id travels in, both ways.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest request id kept from a client.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// `[http.cors]`: which web pages (origins) may call the API from a
/// browser. Off by default: browsers then refuse cross-origin calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins such as `https://dash.example.com`, or `["*"]` for any;
    /// empty turns CORS off.
    pub allow_origins: Vec<String>,
    /// How long a browser may reuse the answer to a preflight request.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

impl CorsConfig {
    /// The CORS layer, `None` when CORS is off, or why an origin is
    /// refused.
    pub fn layer(&self) -> Result<Option<CorsLayer>, String> {
        if self.allow_origins.is_empty() {
            return Ok(None);
        }
        let origins = if self.allow_origins.iter().any(|origin| origin == "*") {
            if self.allow_origins.len() > 1 {
                return Err(
                    "http.cors.allow_origins: \"*\" allows every origin, so it must \
                            be alone in the list"
                        .to_owned(),
                );
            }
            AllowOrigin::any()
        } else {
            let origins = self
                .allow_origins
                .iter()
                .map(|origin| parse_origin(origin))
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(origins)
        };
        let layer = CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("prefer"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("mcp-session-id"),
                HeaderName::from_static("mcp-protocol-version"),
                REQUEST_ID,
            ])
            .expose_headers([
                REQUEST_ID,
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("preference-applied"),
                HeaderName::from_static("mcp-session-id"),
            ])
            .max_age(self.max_age);
        Ok(Some(layer))
    }
}

/// `scheme://host[:port]`, as a browser sends it in `Origin`.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let refuse = || {
        format!(
            "http.cors.allow_origins: {origin:?} is not an origin; write it as a browser sends \
             it, such as \"https://dash.example.com\" or \"http://localhost:3000\" (no path, \
             no trailing slash)"
        )
    };
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(refuse)?;
    let host_is_plain = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !host_is_plain {
        return Err(refuse());
    }
    HeaderValue::from_str(origin).map_err(|_| refuse())
}

/// Wraps everything served on the port (the REST API and `/mcp`) in the
/// request id, the request log, CORS as configured and the panic guard.
/// Fails when the CORS configuration names something that is not an origin.
pub fn around(router: Router, cors: &CorsConfig) -> Result<Router, String> {
    let cors = cors.layer()?;
    let mut router = router.layer(CatchPanicLayer::custom(answer_a_panic));
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    Ok(router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(LogResponse)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::from_fn(drop_unusable_request_id)))
}

/// A client's request id is kept only if it is 1 to 128 characters of
/// letters, digits and `-_.:/+=`, so that it can go into logs as it is;
/// any other is replaced by a new one.
async fn drop_unusable_request_id(mut request: Request, next: Next) -> Response {
    let mut ids = request.headers().get_all(&REQUEST_ID).iter();
    let usable = match (ids.next(), ids.next()) {
        (Some(id), None) => is_usable_request_id(id),
        (None, _) => true,
        (Some(_), Some(_)) => false,
    };
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

fn is_usable_request_id(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    (1..=MAX_REQUEST_ID_BYTES).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
}

/// The span every log line of a request is in.
fn request_span(request: &Request<Body>) -> Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        target: "opspawn::http",
        "request",
        request_id,
        method = %request.method(),
        path = request.uri().path(),
    )
}

/// Middleware, when traces are on: a server span for each request, named
/// by its method and route as declared (`GET /v1/tasks/{id}`, never a task
/// id), and the child of the caller's span when it sends a W3C
/// `traceparent`.
pub async fn trace_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let method = request.method().as_str();
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let mut attributes = Vec::with_capacity(3);
    attributes.push(KeyValue::new("http.request.method", method.to_owned()));
    attributes.push(KeyValue::new("url.path", request.uri().path().to_owned()));
    if let Some(route) = route {
        attributes.push(KeyValue::new("http.route", route.to_owned()));
    }
    let span = {
        // Scoped: a body is not `Sync`, so no borrow of the request may live
        // across the await below.
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        TraceSpan::continuing(
            header("traceparent"),
            header("tracestate"),
            name,
            SpanKind::Server,
            attributes,
        )
    };
    // The handler runs in the request's span, so that a task submitted
    // there keeps it as its parent (`telemetry::current_traceparent`).
    let response = span.in_scope(next.run(request)).await;
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    ));
    if response.status().is_server_error() {
        span.set_error("");
    }
    response
}

/// Logs each answer: server errors as warnings, the rest at debug level
/// (`OPSPAWN_LOG=warn,opspawn=info,opspawn::http=debug` shows every request).
#[derive(Clone, Copy)]
struct LogResponse;

impl<B> OnResponse<B> for LogResponse {
    fn on_response(self, response: &Response<B>, latency: Duration, _: &Span) {
        let status = response.status().as_u16();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        if response.status().is_server_error() {
            tracing::warn!(target: "opspawn::http", status, latency_ms, "answered with a server error");
        } else {
            tracing::debug!(target: "opspawn::http", status, latency_ms, "answered");
        }
    }
}

fn answer_a_panic(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(target: "opspawn::http", panic = detail, "a request handler panicked");
    ApiError::new(
        Code::InternalError,
        "the server failed to handle the request; details are in its log",
    )
    .into_response()
}

/// Middleware (REST routes): an error answered by the framework or a layer
/// rather than a handler, in whatever form (axum's `text/plain`
/// rejections), is sent as the API's JSON error with the code of its status.
pub async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_error || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => Code::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => Code::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => Code::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::UnsupportedMediaType,
        status if status.is_server_error() => Code::InternalError,
        _ => Code::InvalidRequest,
    };
    let message = if status.is_server_error() {
        tracing::error!(target: "opspawn::http", %status, body = %text, "a server error not from a handler");
        "the server failed to handle the request; details are in its log".to_owned()
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        text
    };
    let mut answer = ApiError::new(code, message).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::CONNECTION] {
        if let Some(value) = parts.headers.get(&name) {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_safe_to_log() {
        for usable in [
            "abc-123",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "a:b/c+d=e.f_g",
        ] {
            assert!(
                is_usable_request_id(&HeaderValue::from_static(usable)),
                "{usable}"
            );
        }
        let long = "x".repeat(MAX_REQUEST_ID_BYTES + 1);
        for unusable in ["", "a b", "a\"b", "{}", long.as_str()] {
            assert!(
                !is_usable_request_id(&HeaderValue::from_str(unusable).unwrap()),
                "{unusable:?}"
            );
        }
    }

    #[test]
    fn cors_origins_are_checked() {
        let config = |origins: &[&str]| CorsConfig {
            allow_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..CorsConfig::default()
        };
        assert!(config(&[]).layer().unwrap().is_none(), "off by default");
        assert!(config(&["*"]).layer().unwrap().is_some());
        assert!(
            config(&["https://a.example", "http://localhost:3000"])
                .layer()
                .unwrap()
                .is_some()
        );
        for wrong in [
            &["*", "https://a.example"][..],
            &["a.example"],
            &["https://a.example/"],
            &["https://a.example/path"],
            &["ftp://a.example"],
        ] {
            assert!(config(wrong).layer().is_err(), "{wrong:?}");
        }
    }
}
