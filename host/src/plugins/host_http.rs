//! The host's own outbound HTTP, used to perform the requests that
//! translating LLM adapters prepare.
//!
//! Every request passes the same checks as a plugin's `wasi:http` request
//! (see [`outbound`](super::outbound)): its host must be granted, its name
//! must resolve only to addresses the grant allows, and the connection goes
//! to the address that was checked. Connections are kept for reuse, keyed by
//! that exact address and TLS name, so a reused connection never bypasses a
//! check: it was made to the very address a check just returned.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, Uri};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use wasmtime_wasi_http::Error as HttpError;
use wasmtime_wasi_http::io::TokioIo;

use super::outbound::{OutboundPolicy, default_port, tls_connector};

/// Idle connections kept per destination; more are closed when returned.
/// As many as a host runs tasks by default, so that each of thousands of
/// tasks waiting on one provider finds its connection again for its next
/// call: with 512, 10,000 tasks on a slow LLM made most of their second
/// calls on new connections, and the server spent 5 to 10 % more CPU.
const MAX_IDLE_PER_DESTINATION: usize = 10_000;
/// How long a connection may stay idle in the pool, as reqwest's default.
/// Older ones are closed when the pool is next used, for any destination;
/// a provider closes its side sooner or later anyway, which ends the
/// connection and frees its buffers.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Where a connection goes: the checked address and, for TLS, the name
/// the certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Destination {
    address: SocketAddr,
    tls_name: Option<String>,
}

type Sender = SendRequest<Full<Bytes>>;

/// Idle HTTP/1.1 connections, ready for another request, each with when it
/// was put back: the most recent last.
#[derive(Default)]
pub struct ConnectionPool {
    idle: Mutex<HashMap<Destination, VecDeque<(Sender, Instant)>>>,
}

/// A response, with the connection it came on. Hand the connection back
/// with [`ConnectionPool::put_back`] once the body was read to its end;
/// dropping it closes the connection.
pub struct PooledResponse {
    pub response: Response<Incoming>,
    pub connection: Option<PooledConnection>,
}

pub struct PooledConnection {
    destination: Destination,
    sender: Sender,
}

impl ConnectionPool {
    fn take(&self, destination: &Destination) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        close_expired(&mut idle, Instant::now());
        let senders = idle.get_mut(destination)?;
        while let Some((sender, _)) = senders.pop_back() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read to its end.
    pub fn put_back(&self, connection: PooledConnection) {
        let PooledConnection {
            destination,
            sender,
        } = connection;
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        close_expired(&mut idle, now);
        let senders = idle.entry(destination).or_default();
        if senders.len() < MAX_IDLE_PER_DESTINATION {
            senders.push_back((sender, now));
        }
    }

    /// Sends `request` (an absolute URI) as `policy` allows, adding the
    /// credentials it grants for the request's host. `connect_timeout`
    /// bounds making a new connection; the caller bounds the rest.
    pub async fn send(
        &self,
        policy: &OutboundPolicy,
        mut request: Request<Full<Bytes>>,
        connect_timeout: Duration,
    ) -> Result<PooledResponse, HttpError> {
        let uri = request.uri().clone();
        let address = policy.check(&uri).await?;
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = host_of(&uri);
        let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
        policy.apply_credentials(&scheme, &host, port, request.headers_mut());
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        request.headers_mut().insert(
            hyper::header::HOST,
            authority
                .parse()
                .map_err(|_| HttpError::HttpRequestUriInvalid)?,
        );
        // On the wire the request line carries only the path and query.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
        let destination = Destination {
            address,
            tls_name: (scheme == "https").then_some(host),
        };

        if let Some(mut sender) = self.take(&destination) {
            // A pooled connection the server closed meanwhile fails before
            // the request was sent; then a fresh connection takes it.
            let ready = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                let retry = clone_request(&request);
                match sender.send_request(request).await {
                    Ok(response) => {
                        return Ok(PooledResponse {
                            response,
                            connection: Some(PooledConnection {
                                destination,
                                sender,
                            }),
                        });
                    }
                    Err(error) if error.is_canceled() || error.is_incomplete_message() => {
                        request = retry;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        let mut sender = tokio::time::timeout(connect_timeout, connect(&destination))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;
        let response = sender.send_request(request).await?;
        Ok(PooledResponse {
            response,
            connection: Some(PooledConnection {
                destination,
                sender,
            }),
        })
    }
}

/// Drops the connections idle for longer than [`IDLE_TIMEOUT`] (which
/// closes them), and the destinations left without any.
fn close_expired(idle: &mut HashMap<Destination, VecDeque<(Sender, Instant)>>, now: Instant) {
    idle.retain(|_, senders| {
        while senders
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
        {
            senders.pop_front();
        }
        !senders.is_empty()
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

/// Opens a connection to exactly `destination.address`, with TLS when it
/// has a name, and drives it in the background.
async fn connect(destination: &Destination) -> Result<Sender, HttpError> {
    let tcp = TcpStream::connect(destination.address)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
            _ => HttpError::Connect(e),
        })?;
    let _ = tcp.set_nodelay(true);
    match &destination.tls_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone())?;
            let stream = tls_connector()
                .connect(name, tcp)
                .await
                .map_err(HttpError::Tls)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            Ok(sender)
        }
        None => {
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            Ok(sender)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection over an in-memory pipe, whose other end is dropped.
    async fn sender() -> Sender {
        let (ours, _theirs) = tokio::io::duplex(64);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    /// Connections idle past the timeout are closed, wherever they go,
    /// and the rest kept in the order they came back.
    #[tokio::test]
    async fn connections_idle_too_long_are_closed() {
        let destination = |port| Destination {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            tls_name: None,
        };
        let start = Instant::now();
        let mut idle = HashMap::new();
        idle.insert(
            destination(1),
            VecDeque::from([
                (sender().await, start),
                (sender().await, start + IDLE_TIMEOUT),
            ]),
        );
        idle.insert(destination(2), VecDeque::from([(sender().await, start)]));

        close_expired(&mut idle, start + IDLE_TIMEOUT);
        assert_eq!(
            idle[&destination(1)].len(),
            2,
            "none is past the timeout yet"
        );
        close_expired(&mut idle, start + IDLE_TIMEOUT + Duration::from_millis(1));
        assert_eq!(idle.len(), 1, "a destination left with none is dropped");
        let kept = &idle[&destination(1)];
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1, start + IDLE_TIMEOUT);
    }
}
