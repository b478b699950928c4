//! `GET /metrics`: the Prometheus text format, behind the token `[metrics]`
//! may require. Counters and histograms are recorded as work happens (see
//! `crate::metrics`); what the queue holds and what is loaded are read at
//! each scrape.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;

use super::auth::token_hash;
use super::{ApiError, AppState};
use crate::errors::Code;
use crate::metrics::{self as names, MetricsConfig};
use crate::plugins::PluginKind;
use crate::store::{TaskStatus, now_millis};

/// What `GET /metrics` needs beside the rest of the API's state.
pub struct Scrape {
    handle: &'static PrometheusHandle,
    token_sha256: Option<String>,
    /// Every (tenant, status) pair reported so far, so a pair whose tasks
    /// are all gone is reported as 0 rather than left at its last value.
    reported: Mutex<HashSet<(String, TaskStatus)>>,
}

impl Scrape {
    /// `None` when metrics are off: nothing is recorded and the route is
    /// not served.
    pub fn new(config: &MetricsConfig) -> Option<Self> {
        config.enabled.then(|| Self {
            handle: names::recorder(),
            token_sha256: config
                .token_sha256
                .as_ref()
                .map(|sha| sha.to_ascii_lowercase()),
            reported: Mutex::new(HashSet::new()),
        })
    }

    pub fn handle(&self) -> &'static PrometheusHandle {
        self.handle
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.token_sha256 else {
            return Ok(());
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::new(
                Code::Unauthorized,
                "this server's metrics need a token: send `Authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match token {
            Some(token) if token_hash(token) == *expected => Ok(()),
            _ => Err(ApiError::new(
                Code::InvalidToken,
                "that is not the metrics token this server is configured with",
            )),
        }
    }
}

/// Prometheus metrics in the text format. Needs the `[metrics]` token when
/// one is configured (not an API token); absent when `[metrics] enabled =
/// false`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "The Prometheus text format",
            content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        super::openapi::MetricsErrors,
    ),
)]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(scrape) = &state.scrape else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            "metrics are off on this server ([metrics] enabled = false)",
        ));
    };
    scrape.check_token(&headers)?;
    let now = now_millis();
    let queue = state.store.queue_gauges(now).await?;
    {
        let mut reported = scrape
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut queued = 0;
        let mut seen = HashSet::new();
        for (tenant, status, count) in queue.active {
            if status == TaskStatus::Queued {
                queued += count;
            }
            gauge!(names::TASKS, "tenant" => tenant.clone(), "status" => status.as_str())
                .set(count as f64);
            seen.insert((tenant, status));
        }
        for (tenant, status) in reported.difference(&seen) {
            gauge!(names::TASKS, "tenant" => tenant.clone(), "status" => status.as_str()).set(0.0);
        }
        reported.extend(seen);
        gauge!(names::QUEUE_DEPTH).set(queued as f64);
    }
    let oldest_wait = queue
        .oldest_runnable_since
        .map_or(0.0, |since| (now - since).max(0) as f64 / 1000.0);
    gauge!(names::QUEUE_OLDEST_AGE).set(oldest_wait);
    gauge!(names::RUNNING_TASKS).set(state.scheduler.running_here() as f64);

    let catalog = state.runtime.catalog();
    for kind in [
        PluginKind::Tool,
        PluginKind::Planner,
        PluginKind::LlmAdapter,
    ] {
        let loaded = catalog.plugins().filter(|p| p.kind == kind).count();
        gauge!(names::PLUGINS_LOADED, "kind" => kind.as_str()).set(loaded as f64);
    }
    for code in Code::ALL.iter().filter(|code| code.on_loads()) {
        let failing = catalog
            .failures()
            .iter()
            .filter(|f| f.code == *code)
            .count();
        gauge!(names::PLUGIN_LOAD_FAILURES, "code" => code.as_str()).set(failing as f64);
    }

    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        scrape.handle.render(),
    )
        .into_response())
}

/// Middleware: counts and times every request by method, route (as
/// declared, so `/v1/tasks/{id}`; `unmatched` for no route) and status.
pub async fn count_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    metrics::counter!(
        names::HTTP_REQUESTS,
        "method" => method,
        "route" => route.clone(),
        "status" => response.status().as_u16().to_string(),
    )
    .increment(1);
    metrics::histogram!(names::HTTP_REQUEST_DURATION, "method" => method, "route" => route)
        .record(started.elapsed());
    response
}

/// The method as a label: the standard ones, and `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
