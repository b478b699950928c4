//! Serving the API's HTTP/1.1 connections, bounded against clients that
//! connect and then send nothing, send slowly, or stop reading: a cap on
//! open connections, and time limits on the headers, the body, the answer
//! and silence. Without them idle sockets pile up to the descriptor limit
//! and lock every client out, `/healthz` included.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::ApiError;
use super::hygiene::CorsConfig;
use crate::errors::Code;

/// `[http]`: how long the API waits on a client, and how many connections
/// it keeps open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (and a new connection
    /// must start sending them); else the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this: `408 request_timeout`.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Every route but the event stream answers within this:
    /// `503 response_timeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection on which nothing is read or written for this long is
    /// closed: an idle keep-alive connection, or a client that stopped
    /// reading (the event stream writes a keep-alive every 15 s).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once; past it new ones are closed at once, with
    /// a warning in the log.
    pub max_connections: usize,
    /// `[http.cors]`: which web pages may call the API; off by default.
    pub cors: CorsConfig,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            max_connections: 10_000,
            cors: CorsConfig::default(),
        }
    }
}

/// Middleware: reads the whole body within `body_read_timeout` (and the
/// body limit) before the handler sees the request, so a client that
/// trickles its body is answered `408` instead of holding the request.
/// A body with a `Content-Encoding` (gzip, say) is refused with `415`: the
/// server decodes none, and would otherwise read the encoded bytes as JSON.
pub async fn read_body_in_time(
    State((limits, max_body_bytes)): State<(Arc<HttpLimits>, usize)>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING)
        && !encoding
            .to_str()
            .is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity"))
    {
        return ApiError::new(
            Code::UnsupportedMediaType,
            "this server decodes no Content-Encoding: send the body as plain JSON",
        )
        .into_response();
    }
    let has_body = request.headers().contains_key(header::CONTENT_LENGTH)
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    if !has_body {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let timeout = limits.body_read_timeout;
    // One byte over the limit lets the handler's own limit refuse it with
    // the usual 413.
    let read = tokio::time::timeout(timeout, to_bytes(body, max_body_bytes.saturating_add(1)));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                Code::PayloadTooLarge,
                "the request body is larger than this server accepts",
            )
            .into_response();
        }
        Err(_) => {
            let mut response = ApiError::new(
                Code::RequestTimeout,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(timeout)
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return response;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// When a request under [`answer_in_time`] must be answered (within
/// `request_timeout`, and within `idle_timeout`, past which a connection
/// silent that long is closed): a handler that waits (`GET
/// /v1/tasks/{id}?wait_secs=`, `Prefer: wait`) stops in time to answer.
#[derive(Debug, Clone, Copy)]
pub struct AnswerBy(pub tokio::time::Instant);

/// Middleware for the routes that answer at once (all but the event
/// stream): an answer not ready within `request_timeout` is abandoned.
pub async fn answer_in_time(
    State(limits): State<Arc<HttpLimits>>,
    mut request: Request,
    next: Next,
) -> Response {
    let timeout = limits.request_timeout;
    // Within the request timeout, and before a connection that waits in
    // silence would be closed as idle.
    let answer_within = timeout.min(limits.idle_timeout);
    request
        .extensions_mut()
        .insert(AnswerBy(tokio::time::Instant::now() + answer_within));
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?timeout, "a request ran past request_timeout");
            ApiError::new(
                Code::ResponseTimeout,
                format!(
                    "the server did not answer within {}; the request may or may not have \
                     taken effect (a task submitted with an Idempotency-Key can be submitted \
                     again safely)",
                    humantime::format_duration(timeout)
                ),
            )
            .into_response()
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// connections finish their requests for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> io::Result<()> {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let saturated = AtomicBool::new(false);
    let (stop, stopping) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_connections = max,
                    "connection limit reached: {max} connections are open, so new ones are \
                     closed at once until some end (raise [http] max_connections, or look for \
                     clients holding connections open)"
                );
            }
            drop(stream);
            continue;
        };
        if saturated.swap(false, Ordering::Relaxed) {
            tracing::info!("accepting connections again");
        }
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let connection = http.serve_connection(io, TowerToHyperService::new(app.clone()));
        let header_read_timeout = limits.header_read_timeout;
        let idle_timeout = limits.idle_timeout;
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let mut draining = false;
            // Silence is allowed for the header timeout until the first
            // byte, then for the idle timeout.
            let allowed = |activity: &Activity| {
                if activity.read_any() {
                    idle_timeout
                } else {
                    header_read_timeout
                }
            };
            loop {
                let quiet_until = activity.last() + allowed(&activity);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "a connection ended with an error");
                        }
                        break;
                    }
                    () = tokio::time::sleep_until(quiet_until) => {
                        // Bytes may have moved, or the first arrived, since.
                        let allowed = allowed(&activity);
                        if activity.last() + allowed <= Instant::now() {
                            tracing::debug!(?allowed, "closing a silent connection");
                            break;
                        }
                    }
                    _ = stopping.changed(), if !draining => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every slot back means every connection has ended.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(drain, slots.acquire_many(all)).await;
    Ok(())
}

/// When a connection last read or wrote anything, and whether it ever read.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    read_any: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            read_any: AtomicBool::new(false),
        }
    }

    fn touch(&self, read: bool) {
        let millis = self.start.elapsed().as_millis() as u64;
        self.last.store(millis, Ordering::Relaxed);
        if read {
            self.read_any.store(true, Ordering::Relaxed);
        }
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    fn read_any(&self) -> bool {
        self.read_any.load(Ordering::Relaxed)
    }
}

/// A socket that records when bytes last moved either way.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch(true);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::middleware;
    use axum::routing::get;

    use super::*;

    /// A server on loopback running `app` under `limits`; its base URL.
    async fn start(app: Router, limits: HttpLimits) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            serve(
                listener,
                app,
                &limits,
                std::future::pending(),
                Duration::ZERO,
            )
            .await
        });
        url
    }

    #[tokio::test]
    async fn an_answer_past_the_request_timeout_is_abandoned_but_a_stream_is_not() {
        let limits = HttpLimits {
            request_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        };
        let slow = async || {
            tokio::time::sleep(Duration::from_millis(600)).await;
            "done"
        };
        let app = Router::new()
            .route("/slow", get(slow))
            .route_layer(middleware::from_fn_with_state(
                Arc::new(limits.clone()),
                answer_in_time,
            ))
            .route("/stream", get(slow));
        let url = start(app, limits).await;

        crate::install_tls_provider();
        let response = reqwest::get(format!("{url}/slow")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "response_timeout", "{body}");

        let response = reqwest::get(format!("{url}/stream")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "done");
    }
}
