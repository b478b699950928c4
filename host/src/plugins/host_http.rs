//! The host's own outbound HTTP, used to perform the requests that
//! translating LLM adapters prepare.
//!
//! Every request passes the same checks as a plugin's `wasi:http` request
//! (see [`outbound`](super::outbound)): its host must be granted, its name
//! must resolve only to addresses the grant allows, and the connection goes
//! to the address that was checked. Connections are kept for reuse, keyed by
//! that exact address, TLS name and [`Transport`], so a reused connection
//! never bypasses a check: it was made to the very address a check just
//! returned, trusting what this request's endpoint trusts.
//!
//! Over TLS the host offers HTTP/2 (ALPN) and keeps to HTTP/1.1 with a
//! server that does not take it. HTTP/2 carries many requests on one
//! connection, which matters when thousands of tasks wait on one provider:
//! an HTTP/1.1 connection per waiting request costs about 25 KB of buffers
//! and a socket each. So a destination has either idle HTTP/1.1 connections,
//! one per request in flight, or a few shared HTTP/2 connections, each
//! carrying up to [`STREAMS_PER_HTTP2_CONNECTION`] requests at once.
//!
//! HTTP/1.1 goes through hyper's client connections; HTTP/2 through the
//! `h2` crate directly. hyper's HTTP/2 client spawns a task per request to
//! send its body and hands the response back over a channel, about 4 KB
//! and two wake-ups per request; here the waiting task polls its stream's
//! response itself, and each connection is one task (see
//! [`drive_http2`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, Uri};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use wasmtime_wasi_http::Error as HttpError;
use wasmtime_wasi_http::io::TokioIo;

use super::outbound::{OutboundPolicy, default_port, tls_config};

/// Idle HTTP/1.1 connections kept per destination; more are closed when
/// returned. As many as a host runs tasks by default, so that each of
/// thousands of tasks waiting on one provider finds its connection again for
/// its next call: with 512, 10,000 tasks on a slow LLM made most of their
/// second calls on new connections, and the server spent 5 to 10 % more CPU.
const MAX_IDLE_PER_DESTINATION: usize = 10_000;
/// How long a connection may stay idle in the pool, as reqwest's default.
/// Older ones are closed when the pool is next used, for any destination;
/// a provider closes its side sooner or later anyway, which ends the
/// connection and frees its buffers.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Requests one HTTP/2 connection carries at once before the pool opens
/// another. A server announces its own limit (100 to 256 is usual, and RFC
/// 9113 asks for at least 100); the pool keeps to the floor, which also
/// spreads a busy provider over several connections, each its own task.
/// Past a server's lower limit, requests wait in the
/// connection's queue for a stream; none fails for it (one refused before
/// the server's settings arrived is sent again).
const STREAMS_PER_HTTP2_CONNECTION: usize = 100;
/// How often an HTTP/2 connection carrying requests is pinged, and how long
/// an answer may take before the connection is taken for dead: its requests
/// fail (and are retried as the call allows) instead of waiting for their
/// timeouts, and new requests go elsewhere. (Unit tests wait less.)
#[cfg(not(test))]
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
#[cfg(not(test))]
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);
#[cfg(test)]
const HTTP2_PING_INTERVAL: Duration = Duration::from_millis(200);
#[cfg(test)]
const HTTP2_PING_TIMEOUT: Duration = Duration::from_millis(300);
/// How much of a response an HTTP/2 stream, and a whole connection, may
/// receive before the host reads it (the flow-control windows; hyper's
/// defaults). The host reads as data arrives, so little is ever buffered.
const HTTP2_STREAM_WINDOW: u32 = 2 << 20;
const HTTP2_CONNECTION_WINDOW: u32 = 5 << 20;
/// The most header bytes an HTTP/2 response may carry.
const HTTP2_MAX_HEADER_LIST: u32 = 64 << 10;

/// Which HTTP the host speaks to an adapter's endpoint (`[adapter]
/// protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpProtocol {
    /// HTTP/2 where TLS negotiates it (ALPN), else HTTP/1.1; HTTP/1.1 over
    /// cleartext.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only; over cleartext by prior knowledge, as local inference
    /// servers that speak it expect.
    Http2,
}

/// How connections to one endpoint are made: the protocol and the TLS
/// configuration (trusted roots and the protocols offered by ALPN).
/// Endpoints with the same protocol and `ca_file` contents share one, and
/// so share pooled connections; no others do.
#[derive(Clone)]
pub struct Transport {
    protocol: HttpProtocol,
    tls: Arc<rustls::ClientConfig>,
    /// Which of the distinct transports this is, for pool keys.
    id: usize,
}

impl Transport {
    /// Trusts the Mozilla roots and, when given, the certificates (PEM) in
    /// `ca_file`.
    pub fn new(protocol: HttpProtocol, ca_file: Option<&Path>) -> Result<Self, String> {
        type Key = (HttpProtocol, Option<Vec<u8>>);
        static CONFIGS: Mutex<Vec<(Key, Arc<rustls::ClientConfig>)>> = Mutex::new(Vec::new());
        let pem = ca_file
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))
            })
            .transpose()?;
        let key = (protocol, pem);
        let mut configs = CONFIGS.lock().expect("TLS configurations lock");
        if let Some(id) = configs.iter().position(|(k, _)| *k == key) {
            return Ok(Self {
                protocol,
                tls: configs[id].1.clone(),
                id,
            });
        }
        let mut config = tls_config(ca_file)?;
        config.alpn_protocols = match protocol {
            HttpProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            HttpProtocol::Http1 => vec![b"http/1.1".to_vec()],
            HttpProtocol::Http2 => vec![b"h2".to_vec()],
        };
        let tls = Arc::new(config);
        configs.push((key, tls.clone()));
        Ok(Self {
            protocol,
            tls,
            id: configs.len() - 1,
        })
    }

    pub fn protocol(&self) -> HttpProtocol {
        self.protocol
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Transport {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Transport {}

/// Where a connection goes: the checked address, for TLS the name the
/// certificate must carry, and how it is made (the [`Transport`]'s
/// protocol and id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Destination {
    address: SocketAddr,
    tls_name: Option<String>,
    protocol: HttpProtocol,
    transport: usize,
}

impl Destination {
    /// Whether this destination's connections are HTTP/2, when that is
    /// known before one is made.
    fn speaks_http2(&self) -> Option<bool> {
        match (self.protocol, &self.tls_name) {
            (HttpProtocol::Http1, _) | (HttpProtocol::Auto, None) => Some(false),
            (HttpProtocol::Http2, _) => Some(true),
            (HttpProtocol::Auto, Some(_)) => None,
        }
    }
}

type Http1Sender = http1::SendRequest<Full<Bytes>>;
type Http2Sender = h2::client::SendRequest<Bytes>;

/// The connections to each destination.
#[derive(Default)]
pub struct ConnectionPool {
    destinations: Mutex<HashMap<Destination, Connections>>,
}

struct Connections {
    /// HTTP/1.1 connections ready for another request, each with when it was
    /// put back: the most recent last.
    idle_http1: VecDeque<(Http1Sender, Instant)>,
    /// HTTP/2 connections, each carrying any number of requests.
    http2: Vec<Http2Connection>,
    /// Whether the destination speaks HTTP/2: known from its settings, or
    /// from the last connection made; `None` until then.
    speaks_http2: Option<bool>,
    /// When a request last took or gave back a connection here. What was
    /// learned of the destination is kept this long after its last
    /// connection went, so that a destination whose every connection is in
    /// use is not taken for a new one.
    last_used: Instant,
    /// Held while making a connection that others will share (an HTTP/2
    /// one, or the first, whose protocol is not known yet), so that a burst
    /// of requests makes one connection, not one each.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl Connections {
    fn new(destination: &Destination) -> Self {
        Self {
            idle_http1: VecDeque::new(),
            http2: Vec::new(),
            speaks_http2: destination.speaks_http2(),
            last_used: Instant::now(),
            connecting: Arc::default(),
        }
    }

    /// A stream on the least busy HTTP/2 connection with room for one.
    fn http2_stream(&mut self, now: Instant) -> Option<Ready> {
        self.http2
            .retain(|connection| !connection.state.is_closed());
        let connection = self
            .http2
            .iter_mut()
            .filter(|c| c.state.streams() < STREAMS_PER_HTTP2_CONNECTION)
            .min_by_key(|c| c.state.streams())?;
        Some(connection.open_stream(now))
    }
}

struct Http2Connection {
    sender: Http2Sender,
    state: Arc<Http2State>,
    /// When it last took a request.
    last_used: Instant,
}

impl Http2Connection {
    fn open_stream(&mut self, now: Instant) -> Ready {
        self.state.streams.fetch_add(1, Ordering::Relaxed);
        self.last_used = now;
        Ready::Http2(self.sender.clone(), Http2Stream(self.state.clone()))
    }
}

/// What the pool and an HTTP/2 connection's task share.
#[derive(Default)]
struct Http2State {
    /// Requests in flight on it.
    streams: AtomicUsize,
    /// Set when its task ended, or a request found it going away: it takes
    /// no more requests.
    closed: AtomicBool,
}

impl Http2State {
    fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// One request's share of an HTTP/2 connection, given back when dropped.
struct Http2Stream(Arc<Http2State>);

impl Drop for Http2Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection ready for one request.
enum Ready {
    Http1(Http1Sender),
    Http2(Http2Sender, Http2Stream),
}

/// What [`ConnectionPool::take`] found instead of a ready connection.
enum Missing {
    /// An HTTP/1.1 destination: make a connection of one's own.
    Http1,
    /// Make a connection to share, holding this lock.
    Shared(Arc<tokio::sync::Mutex<()>>),
}

/// A response, with the connection it came on. Hand the connection back
/// with [`ConnectionPool::put_back`] once the body was read to its end;
/// dropping it closes an HTTP/1.1 connection (an HTTP/2 one stays, and only
/// the request's stream is reset).
pub struct PooledResponse {
    pub response: Response<ResponseBody>,
    pub connection: Option<PooledConnection>,
}

/// A response's body, as either protocol delivers it.
pub struct ResponseBody(BodyKind);

enum BodyKind {
    Http1(Incoming),
    Http2(h2::RecvStream),
}

/// Why reading a response's body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    Http2(#[from] h2::Error),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        match &mut self.get_mut().0 {
            BodyKind::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            // Trailers are not read: nothing in a provider's answer needs
            // them.
            BodyKind::Http2(stream) => Poll::Ready(match ready!(stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read, so the provider may send as much again. An
                    // error here means the stream is over, which the next
                    // poll reports.
                    let _ = stream.flow_control().release_capacity(data.len());
                    Some(Ok(Frame::data(data)))
                }
                Some(Err(error)) => Some(Err(error.into())),
                None => None,
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Http1(body) => body.is_end_stream(),
            BodyKind::Http2(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Http1(body) => body.size_hint(),
            BodyKind::Http2(_) => SizeHint::default(),
        }
    }
}

pub struct PooledConnection(Pooled);

enum Pooled {
    Http1 {
        destination: Destination,
        sender: Http1Sender,
    },
    /// The request's stream, held until the response was read.
    Http2 { _stream: Http2Stream },
}

/// Why a request on a connection failed.
enum SendFailure {
    /// It was not sent, or an HTTP/1.1 server closed a kept-alive connection
    /// as it arrived: another connection may take it.
    Retry(Box<Request<Bytes>>, HttpError),
    Failed(HttpError),
}

impl ConnectionPool {
    /// A pooled connection ready for one more request to `destination`.
    fn take(&self, destination: &Destination) -> Result<Ready, Missing> {
        let now = Instant::now();
        let mut destinations = self.destinations.lock().expect("pool lock");
        close_expired(&mut destinations, now);
        if !destinations.contains_key(destination) {
            destinations.insert(destination.clone(), Connections::new(destination));
        }
        let connections = destinations
            .get_mut(destination)
            .expect("inserted just above");
        connections.last_used = now;
        match connections.speaks_http2 {
            Some(false) => {
                while let Some((sender, _)) = connections.idle_http1.pop_back() {
                    if !sender.is_closed() {
                        return Ok(Ready::Http1(sender));
                    }
                }
                Err(Missing::Http1)
            }
            Some(true) => connections
                .http2_stream(now)
                .ok_or_else(|| Missing::Shared(connections.connecting.clone())),
            None => Err(Missing::Shared(connections.connecting.clone())),
        }
    }

    /// What the pool knows of whether `destination` speaks HTTP/2.
    fn speaks_http2(&self, destination: &Destination) -> Option<bool> {
        let destinations = self.destinations.lock().expect("pool lock");
        destinations
            .get(destination)
            .map_or_else(|| destination.speaks_http2(), |c| c.speaks_http2)
    }

    /// Keeps a connection whose last response was read to its end.
    pub fn put_back(&self, connection: PooledConnection) {
        let Pooled::Http1 {
            destination,
            sender,
        } = connection.0
        else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut destinations = self.destinations.lock().expect("pool lock");
        close_expired(&mut destinations, now);
        let connections = destinations
            .entry(destination)
            .or_insert_with_key(Connections::new);
        connections.speaks_http2 = Some(false);
        connections.last_used = now;
        if connections.idle_http1.len() < MAX_IDLE_PER_DESTINATION {
            connections.idle_http1.push_back((sender, now));
        }
    }

    /// Sends `request` (an absolute URI) as `policy` allows, adding the
    /// credentials it grants for the request's host, over a connection made
    /// as `transport` says. `connect_timeout` bounds making a new connection
    /// (and waiting for another request's); the caller bounds the rest.
    pub async fn send(
        &self,
        policy: &OutboundPolicy,
        transport: &Transport,
        mut request: Request<Bytes>,
        connect_timeout: Duration,
    ) -> Result<PooledResponse, HttpError> {
        let uri = request.uri().clone();
        let address = Box::pin(policy.check(&uri)).await?;
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = host_of(&uri);
        let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
        policy.apply_credentials(&scheme, &host, port, request.headers_mut());
        let destination = Destination {
            address,
            tls_name: (scheme == "https").then_some(host),
            protocol: transport.protocol,
            transport: transport.id,
        };
        let take_or_connect = || {
            Box::pin(within(
                connect_timeout,
                self.connect(&destination, transport),
            ))
        };
        let mut ready = match self.take(&destination) {
            Ok(pooled) => pooled,
            Err(_) => take_or_connect().await?,
        };
        // A request a connection could not take (see [`SendFailure`]) gets
        // one more, new or pooled.
        let mut retried = false;
        loop {
            match send_on(ready, &destination, request).await {
                Ok(response) => return Ok(response),
                Err(SendFailure::Retry(retry, _)) if !retried => {
                    retried = true;
                    request = *retry;
                    // Over HTTP/1.1, on a new connection: another pooled
                    // one may be as stale as the first.
                    ready = if self.speaks_http2(&destination) == Some(false) {
                        let new = within(connect_timeout, connect(&destination, transport));
                        let new = Box::pin(new).await?;
                        self.add(&destination, new)
                    } else {
                        take_or_connect().await?
                    };
                }
                Err(SendFailure::Retry(_, error) | SendFailure::Failed(error)) => {
                    return Err(error);
                }
            }
        }
    }

    /// A new connection to `destination`, or a stream on an HTTP/2 one that
    /// another request made while this one waited to make its own.
    async fn connect(
        &self,
        destination: &Destination,
        transport: &Transport,
    ) -> Result<Ready, HttpError> {
        let lock = match self.take(destination) {
            Ok(ready) => return Ok(ready),
            Err(Missing::Http1) => {
                return connect(destination, transport)
                    .await
                    .map(|connection| self.add(destination, connection));
            }
            Err(Missing::Shared(lock)) => lock,
        };
        let connecting = lock.lock().await;
        match self.take(destination) {
            Ok(ready) => return Ok(ready),
            // The first connection turned out HTTP/1.1: make one's own
            // without keeping others waiting.
            Err(Missing::Http1) => drop(connecting),
            Err(Missing::Shared(_)) => {}
        }
        let connection = connect(destination, transport).await?;
        Ok(self.add(destination, connection))
    }

    /// Records what a new connection speaks; an HTTP/2 one joins the pool.
    fn add(&self, destination: &Destination, connection: Connection) -> Ready {
        let now = Instant::now();
        let mut destinations = self.destinations.lock().expect("pool lock");
        let connections = destinations
            .entry(destination.clone())
            .or_insert_with_key(Connections::new);
        connections.last_used = now;
        match connection {
            Connection::Http1(sender) => {
                connections.speaks_http2 = Some(false);
                Ready::Http1(sender)
            }
            Connection::Http2(sender, state) => {
                connections.speaks_http2 = Some(true);
                let mut connection = Http2Connection {
                    sender,
                    state,
                    last_used: now,
                };
                let ready = connection.open_stream(now);
                connections.http2.push(connection);
                ready
            }
        }
    }

    /// How many HTTP/2 connections and idle HTTP/1.1 ones the pool holds.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let destinations = self.destinations.lock().expect("pool lock");
        destinations.values().fold((0, 0), |(h2, h1), c| {
            (h2 + c.http2.len(), h1 + c.idle_http1.len())
        })
    }
}

/// `connecting`, failed with a timeout past `limit`.
async fn within<T>(
    limit: Duration,
    connecting: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    tokio::time::timeout(limit, connecting)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
}

/// Sends one request (with an absolute URI) on a ready connection.
async fn send_on(
    ready: Ready,
    destination: &Destination,
    request: Request<Bytes>,
) -> Result<PooledResponse, SendFailure> {
    let retry = clone_request(&request);
    match ready {
        Ready::Http1(mut sender) => {
            // A connection the server closed while pooled fails here,
            // before anything was sent.
            let ready = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                let closed = HttpError::ConnectionTerminated;
                return Err(SendFailure::Retry(Box::new(retry), closed));
            }
            let request = origin_form(request).map_err(SendFailure::Failed)?;
            match sender.send_request(request.map(Full::new)).await {
                Ok(response) => Ok(PooledResponse {
                    response: response.map(|body| ResponseBody(BodyKind::Http1(body))),
                    connection: Some(PooledConnection(Pooled::Http1 {
                        destination: destination.clone(),
                        sender,
                    })),
                }),
                // Cancelled: the connection closed before the request went
                // out. Incomplete: the server closed a kept-alive connection
                // as the request arrived.
                Err(error) if error.is_canceled() || error.is_incomplete_message() => {
                    Err(SendFailure::Retry(Box::new(retry), error.into()))
                }
                Err(error) => Err(SendFailure::Failed(error.into())),
            }
        }
        Ready::Http2(sender, stream) => match send_http2(sender, request).await {
            Ok(response) => Ok(PooledResponse {
                response: response.map(|body| ResponseBody(BodyKind::Http2(body))),
                connection: Some(PooledConnection(Pooled::Http2 { _stream: stream })),
            }),
            Err(Http2Failure::ConnectionGone(error)) => {
                // A connection that went away (a server may close one
                // after so many requests, with GOAWAY) takes no more.
                stream.0.closed.store(true, Ordering::Relaxed);
                Err(SendFailure::Retry(Box::new(retry), http2_error(error)))
            }
            Err(Http2Failure::Refused(error)) => {
                Err(SendFailure::Retry(Box::new(retry), http2_error(error)))
            }
            Err(Http2Failure::Failed(error)) => Err(SendFailure::Failed(http2_error(error))),
        },
    }
}

/// Why an HTTP/2 request failed, as far as sending it again goes.
enum Http2Failure {
    /// The connection was going away, or gone, before the request went out.
    ConnectionGone(h2::Error),
    /// The server refused the request's stream unprocessed, most often one
    /// past its limit opened before its settings arrived (RFC 9113, 8.7).
    Refused(h2::Error),
    /// Anything else: the server may have processed the request.
    Failed(h2::Error),
}

impl Http2Failure {
    /// A failure before the request was sent, or as the server took it.
    fn unsent(error: h2::Error) -> Self {
        if refused_stream(&error) {
            Self::Refused(error)
        } else if error.is_io() || error.is_go_away() {
            Self::ConnectionGone(error)
        } else {
            Self::Failed(error)
        }
    }
}

/// Sends one request on an HTTP/2 connection and waits for its response's
/// head.
async fn send_http2(
    sender: Http2Sender,
    request: Request<Bytes>,
) -> Result<Response<h2::RecvStream>, Http2Failure> {
    let unsent = Http2Failure::unsent;
    let mut sender = sender.ready().await.map_err(unsent)?;
    let (head, body) = http2_form(request);
    let end_of_stream = body.is_empty();
    let (response, mut send) = sender.send_request(head, end_of_stream).map_err(unsent)?;
    if !end_of_stream {
        // Sent as the flow-control windows allow; h2 buffers the rest.
        send.send_data(body, true).map_err(unsent)?;
    }
    // Once sent, only a refusal says the server did not process it.
    response.await.map_err(|error| {
        if refused_stream(&error) {
            Http2Failure::Refused(error)
        } else {
            Http2Failure::Failed(error)
        }
    })
}

/// The request as HTTP/2 sends it: the absolute URI (its scheme and
/// authority become pseudo-headers), without the headers RFC 9113 forbids,
/// and with the body's length.
fn http2_form(request: Request<Bytes>) -> (Request<()>, Bytes) {
    let (mut head, body) = request.into_parts();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
    ] {
        head.headers.remove(name);
    }
    if head
        .headers
        .get(hyper::header::TE)
        .is_some_and(|te| te != "trailers")
    {
        head.headers.remove(hyper::header::TE);
    }
    if !body.is_empty() || matches!(head.method.as_str(), "POST" | "PUT" | "PATCH") {
        head.headers
            .insert(hyper::header::CONTENT_LENGTH, body.len().into());
    }
    (Request::from_parts(head, ()), body)
}

fn http2_error(error: h2::Error) -> HttpError {
    HttpError::Connect(std::io::Error::other(error))
}

/// Whether an HTTP/2 server refused the request's stream without
/// processing it, so that it may be sent again.
fn refused_stream(error: &h2::Error) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// The request as HTTP/1.1 sends it: the destination in the Host header,
/// and only the path and query on the request line.
fn origin_form(mut request: Request<Bytes>) -> Result<Request<Bytes>, HttpError> {
    let uri = request.uri().clone();
    if let Some(authority) = uri.authority() {
        let host = authority
            .as_str()
            .parse()
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;
        request.headers_mut().insert(hyper::header::HOST, host);
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    Ok(request)
}

/// Drops the connections idle for longer than [`IDLE_TIMEOUT`] (which
/// closes them), and the destinations left without any that were not used
/// for as long.
fn close_expired(destinations: &mut HashMap<Destination, Connections>, now: Instant) {
    let expired = |since: Instant| now.duration_since(since) > IDLE_TIMEOUT;
    destinations.retain(|_, connections| {
        let idle = &mut connections.idle_http1;
        while idle.front().is_some_and(|(_, since)| expired(*since)) {
            idle.pop_front();
        }
        connections
            .http2
            .retain(|c| !c.state.is_closed() && (c.state.streams() > 0 || !expired(c.last_used)));
        !connections.idle_http1.is_empty()
            || !connections.http2.is_empty()
            || Arc::strong_count(&connections.connecting) > 1
            || !expired(connections.last_used)
    });
}

fn host_of(uri: &Uri) -> String {
    uri.host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn clone_request(request: &Request<Bytes>) -> Request<Bytes> {
    let mut clone = Request::new(request.body().clone());
    *clone.method_mut() = request.method().clone();
    *clone.uri_mut() = request.uri().clone();
    *clone.headers_mut() = request.headers().clone();
    clone
}

/// A new connection, driven in the background.
enum Connection {
    Http1(Http1Sender),
    Http2(Http2Sender, Arc<Http2State>),
}

/// Opens a connection to exactly `destination.address`, with TLS when it
/// has a name, speaking what the destination's protocol and the server's
/// ALPN choice agree on.
async fn connect(
    destination: &Destination,
    transport: &Transport,
) -> Result<Connection, HttpError> {
    let tcp = TcpStream::connect(destination.address)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
            _ => HttpError::Connect(e),
        })?;
    let _ = tcp.set_nodelay(true);
    let Some(name) = &destination.tls_name else {
        return handshake(tcp, destination.speaks_http2() == Some(true)).await;
    };
    let name = ServerName::try_from(name.clone())?;
    let stream = tokio_rustls::TlsConnector::from(transport.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(HttpError::Tls)?;
    let http2 = match transport.protocol {
        HttpProtocol::Auto => stream.get_ref().1.alpn_protocol() == Some(b"h2"),
        HttpProtocol::Http1 => false,
        HttpProtocol::Http2 => true,
    };
    handshake(stream, http2).await
}

async fn handshake<S>(stream: S, http2: bool) -> Result<Connection, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    if http2 {
        let (sender, connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_header_list_size(HTTP2_MAX_HEADER_LIST)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(http2_error)?;
        let state = Arc::<Http2State>::default();
        tokio::spawn(drive_http2(connection, state.clone()));
        Ok(Connection::Http2(sender, state))
    } else {
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Connection::Http1(sender))
    }
}

/// An HTTP/2 connection's task: it reads and writes every frame of the
/// connection's streams, and pings the server while requests are in flight
/// (see [`HTTP2_PING_INTERVAL`]). When it ends, the connection is closed
/// and the requests still on it fail.
async fn drive_http2<S>(mut connection: h2::client::Connection<S, Bytes>, state: Arc<Http2State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let pings = connection.ping_pong();
    tokio::select! {
        result = &mut connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "an HTTP/2 connection to a provider ended");
            }
        }
        () = keep_alive(pings, &state) => {
            tracing::debug!("an HTTP/2 connection to a provider did not answer a ping; closed");
        }
    }
    // Marked before it is dropped, which fails the requests still on it:
    // none of them, retried, finds it in the pool again.
    state.closed.store(true, Ordering::Relaxed);
    drop(connection);
}

/// Returns when the server failed to answer a ping in time.
async fn keep_alive(pings: Option<h2::PingPong>, state: &Http2State) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(HTTP2_PING_INTERVAL).await;
        if state.streams() == 0 {
            continue;
        }
        let pong = tokio::time::timeout(HTTP2_PING_TIMEOUT, pings.ping(h2::Ping::opaque()));
        if !matches!(pong.await, Ok(Ok(_))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
