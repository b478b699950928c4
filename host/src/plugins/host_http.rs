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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioTimer};
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
/// 9113 asks for at least 100), but hyper does not pass it on, so the pool
/// assumes the floor. Past a server's lower limit, requests wait in the
/// connection's queue for a stream; none fails for it (one refused before
/// the server's settings arrived is sent again).
const STREAMS_PER_HTTP2_CONNECTION: usize = 100;
/// How often an HTTP/2 connection carrying requests is pinged, and how long
/// an answer may take before the connection is taken for dead: its requests
/// fail (and are retried as the call allows) instead of waiting for their
/// timeouts, and new requests go elsewhere.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

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
type Http2Sender = http2::SendRequest<Full<Bytes>>;

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
            .retain(|connection| !connection.sender.is_closed());
        let connection = self
            .http2
            .iter_mut()
            .filter(|c| c.streams.load(Ordering::Relaxed) < STREAMS_PER_HTTP2_CONNECTION)
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?;
        Some(connection.open_stream(now))
    }
}

struct Http2Connection {
    sender: Http2Sender,
    /// Requests in flight on it.
    streams: Arc<AtomicUsize>,
    /// When it last took a request.
    last_used: Instant,
}

impl Http2Connection {
    fn open_stream(&mut self, now: Instant) -> Ready {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.last_used = now;
        Ready::Http2(self.sender.clone(), Http2Stream(self.streams.clone()))
    }
}

/// One request's share of an HTTP/2 connection, given back when dropped.
struct Http2Stream(Arc<AtomicUsize>);

impl Drop for Http2Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
    pub response: Response<Incoming>,
    pub connection: Option<PooledConnection>,
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
    Retry(Box<Request<Full<Bytes>>>, HttpError),
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
        mut request: Request<Full<Bytes>>,
        connect_timeout: Duration,
    ) -> Result<PooledResponse, HttpError> {
        let uri = request.uri().clone();
        let address = policy.check(&uri).await?;
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
        let take_or_connect = || within(connect_timeout, self.connect(&destination, transport));
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
                        let new = within(connect_timeout, connect(&destination, transport)).await?;
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
            Connection::Http2(sender) => {
                connections.speaks_http2 = Some(true);
                let mut connection = Http2Connection {
                    sender,
                    streams: Arc::default(),
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
    request: Request<Full<Bytes>>,
) -> Result<PooledResponse, SendFailure> {
    let retry = clone_request(&request);
    let result = match ready {
        Ready::Http1(mut sender) => {
            // A connection the server closed while pooled fails here,
            // before anything was sent.
            let ready = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                let closed = HttpError::ConnectionTerminated;
                return Err(SendFailure::Retry(Box::new(retry), closed));
            }
            let request = origin_form(request).map_err(SendFailure::Failed)?;
            sender.send_request(request).await.map(|response| {
                let destination = destination.clone();
                (
                    response,
                    Pooled::Http1 {
                        destination,
                        sender,
                    },
                )
            })
        }
        // HTTP/2 takes the absolute URI: its scheme and authority become
        // the request's pseudo-headers.
        Ready::Http2(mut sender, stream) => sender
            .send_request(request)
            .await
            .map(|response| (response, Pooled::Http2 { _stream: stream })),
    };
    match result {
        Ok((response, pooled)) => Ok(PooledResponse {
            response,
            connection: Some(PooledConnection(pooled)),
        }),
        // Cancelled: the connection closed before the request went out.
        // Incomplete: an HTTP/1.1 server closed a kept-alive connection as
        // the request arrived. Refused: an HTTP/2 server refused the
        // stream unprocessed, most often one past its limit opened before
        // its settings arrived (RFC 9113, 8.7).
        Err(error)
            if error.is_canceled() || error.is_incomplete_message() || refused_stream(&error) =>
        {
            Err(SendFailure::Retry(Box::new(retry), error.into()))
        }
        Err(error) => Err(SendFailure::Failed(error.into())),
    }
}

/// Whether an HTTP/2 server refused the request's stream without
/// processing it, so that it may be sent again.
fn refused_stream(error: &hyper::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        == Some(h2::Reason::REFUSED_STREAM)
}

/// The request as HTTP/1.1 sends it: the destination in the Host header,
/// and only the path and query on the request line.
fn origin_form(mut request: Request<Full<Bytes>>) -> Result<Request<Full<Bytes>>, HttpError> {
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
        connections.http2.retain(|c| {
            !c.sender.is_closed()
                && (c.streams.load(Ordering::Relaxed) > 0 || !expired(c.last_used))
        });
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

fn clone_request(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut clone = Request::new(request.body().clone());
    *clone.method_mut() = request.method().clone();
    *clone.uri_mut() = request.uri().clone();
    *clone.headers_mut() = request.headers().clone();
    clone
}

/// A new connection, driven in the background.
enum Connection {
    Http1(Http1Sender),
    Http2(Http2Sender),
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
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_PING_INTERVAL)
            .keep_alive_timeout(HTTP2_PING_TIMEOUT)
            .handshake(io)
            .await?;
        tokio::spawn(connection);
        Ok(Connection::Http2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await?;
        tokio::spawn(connection);
        Ok(Connection::Http1(sender))
    }
}

#[cfg(test)]
mod tests;
