use std::sync::atomic::AtomicUsize;

use axum::Router;
use axum::http::Version;
use http_body_util::BodyExt;
use opspawn_testkit::tls::{self, TestAuthority};
use tokio::sync::watch;

use super::*;
use crate::plugins::outbound::HostGrant;

const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
const H1_ONLY: &[&[u8]] = &[b"http/1.1"];

/// A loopback server that holds every request until released, as a
/// provider that thinks: requests pile up in flight, so a test sees how
/// many connections a burst of them takes.
struct HeldServer {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    arrived: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl HeldServer {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let (listener, address) = tls::loopback_listener().await;
        let arrived = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let router = Router::new().fallback({
            let arrived = arrived.clone();
            move |version: Version| async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                let mut released = released.clone();
                let _ = released.wait_for(|released| *released).await;
                format!("{version:?}")
            }
        });
        let connections = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(tls::serve(listener, tls, router, connections.clone()));
        Self {
            address,
            connections,
            arrived,
            release,
            server,
        }
    }

    /// Waits until `count` requests have arrived, then answers them all.
    async fn release_when_arrived(&self, count: usize) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while self.arrived.load(Ordering::SeqCst) < count {
            assert!(
                Instant::now() < give_up,
                "only {} of {count} requests arrived",
                self.arrived.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.release.send_replace(true);
    }

    fn hold_again(&self) {
        self.arrived.store(0, Ordering::SeqCst);
        self.release.send_replace(false);
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HeldServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn granting(url: &str) -> OutboundPolicy {
    let origin = url.split('/').take(3).collect::<Vec<_>>().join("/");
    OutboundPolicy {
        grants: vec![HostGrant::parse(&origin).expect("a literal loopback grant")],
        credentials: Vec::new(),
        own_server: None,
    }
}

/// Sends `count` GETs to `url` at once, each answer read to its end and its
/// connection put back; returns the versions they came over.
async fn burst(
    pool: &ConnectionPool,
    server: &HeldServer,
    transport: &Transport,
    url: &str,
    count: usize,
) -> Vec<Version> {
    let policy = granting(url);
    let requests = futures::future::join_all((0..count).map(|_| async {
        let request = Request::get(url).body(Bytes::new()).unwrap();
        let sent = pool
            .send(&policy, transport, request, Duration::from_secs(10))
            .await
            .expect("the request succeeds");
        let version = sent.response.version();
        let body = sent.response.into_body().collect().await.unwrap();
        assert_eq!(
            body.to_bytes(),
            format!("{version:?}"),
            "the server saw it so"
        );
        if let Some(connection) = sent.connection {
            pool.put_back(connection);
        }
        version
    }));
    let (versions, ()) = tokio::join!(requests, server.release_when_arrived(count));
    versions
}

/// Two bursts of `count` requests at once over TLS to a server offering
/// `alpn`: the first comes over `version` on `connections` connections,
/// leaving the pool with `pooled` (HTTP/2, idle HTTP/1.1); the second
/// reuses them.
async fn assert_tls_bursts_reuse(
    alpn: &[&[u8]],
    count: usize,
    version: Version,
    connections: usize,
    pooled: (usize, usize),
) {
    let authority = TestAuthority::new();
    let server = HeldServer::start(Some(authority.server_config(alpn))).await;
    let transport = Transport::new(HttpProtocol::Auto, Some(&authority.ca_file())).unwrap();
    let url = format!("https://{}/v1/chat", server.address);
    let pool = ConnectionPool::default();

    let versions = burst(&pool, &server, &transport, &url, count).await;
    assert!(versions.iter().all(|v| *v == version), "{versions:?}");
    assert_eq!(server.connections(), connections);
    assert_eq!(pool.counts(), pooled);

    server.hold_again();
    burst(&pool, &server, &transport, &url, count).await;
    assert_eq!(
        server.connections(),
        connections,
        "the second burst reused them"
    );
}

/// Over TLS the pool offers HTTP/2, and a burst shares a few connections,
/// up to 100 requests on each, instead of one connection per request; a
/// second burst reuses them.
#[tokio::test]
async fn requests_over_tls_share_http2_connections_of_up_to_100_streams() {
    // 250 requests at 100 a connection.
    assert_tls_bursts_reuse(H2_AND_H1, 250, Version::HTTP_2, 3, (3, 0)).await;
}

/// A server that allows fewer streams than the pool assumes makes requests
/// past its limit wait their turn on the connection; none fails.
#[tokio::test]
async fn requests_past_a_servers_lower_stream_limit_wait_and_succeed() {
    let (listener, address) = tls::loopback_listener().await;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let router = Router::new().fallback({
        let (in_flight, most) = (in_flight.clone(), most.clone());
        move || async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            "ok"
        }
    });
    let connections = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn(tls::serve_with_stream_limit(
        listener,
        None,
        router,
        connections.clone(),
        10,
    ));
    let url = format!("http://{address}/v1/chat");
    let (pool, policy) = (ConnectionPool::default(), granting(&url));
    let transport = Transport::new(HttpProtocol::Http2, None).unwrap();
    let answers = futures::future::join_all((0..30).map(|_| async {
        let request = Request::get(&url).body(Bytes::new()).unwrap();
        let sent = pool
            .send(&policy, &transport, request, Duration::from_secs(10))
            .await
            .expect("the request succeeds");
        sent.response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
    }))
    .await;
    server.abort();
    assert!(answers.iter().all(|a| a == "ok"));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(most.load(Ordering::SeqCst), 10, "the server's limit held");
}

/// A TLS server that does not take HTTP/2 gets HTTP/1.1: a connection per
/// request in flight, kept for the next.
#[tokio::test]
async fn a_tls_server_without_http2_gets_http1_connections_kept_for_reuse() {
    assert_tls_bursts_reuse(H1_ONLY, 20, Version::HTTP_11, 20, (0, 20)).await;
}

/// Over cleartext the pool speaks HTTP/1.1 unless the endpoint asks for
/// HTTP/2, which it then speaks by prior knowledge.
#[tokio::test]
async fn cleartext_is_http1_unless_http2_is_asked_for() {
    let server = HeldServer::start(None).await;
    let url = format!("http://{}/v1/chat", server.address);
    let pool = ConnectionPool::default();

    let auto = Transport::new(HttpProtocol::Auto, None).unwrap();
    let versions = burst(&pool, &server, &auto, &url, 5).await;
    assert!(
        versions.iter().all(|v| *v == Version::HTTP_11),
        "{versions:?}"
    );
    assert_eq!(server.connections(), 5);

    server.hold_again();
    let http2 = Transport::new(HttpProtocol::Http2, None).unwrap();
    let versions = burst(&pool, &server, &http2, &url, 5).await;
    assert!(
        versions.iter().all(|v| *v == Version::HTTP_2),
        "{versions:?}"
    );
    assert_eq!(server.connections(), 6, "one more, shared by all five");
}

/// A certificate no trusted authority signed fails the connection, and
/// naming its authority in `ca_file` is what makes it pass.
#[tokio::test]
async fn a_certificate_from_an_untrusted_authority_is_refused() {
    let authority = TestAuthority::new();
    let server = HeldServer::start(Some(authority.server_config(H2_AND_H1))).await;
    let url = format!("https://{}/v1/chat", server.address);
    let request = Request::get(&url).body(Bytes::new()).unwrap();
    let untrusting = Transport::new(HttpProtocol::Auto, None).unwrap();
    let error = ConnectionPool::default()
        .send(
            &granting(&url),
            &untrusting,
            request,
            Duration::from_secs(10),
        )
        .await
        .err()
        .expect("the handshake fails");
    assert!(
        matches!(&error, HttpError::Tls(e) if e.to_string().contains("UnknownIssuer")),
        "{error:?}"
    );
    assert_eq!(server.arrived.load(Ordering::SeqCst), 0);
}

/// Endpoints that trust the same certificates over the same protocol share
/// a transport, and so their pooled connections; others do not.
#[test]
fn transports_are_shared_by_equal_settings_only() {
    let authority = TestAuthority::new();
    let ca = authority.ca_file();
    let auto = Transport::new(HttpProtocol::Auto, Some(&ca)).unwrap();
    assert_eq!(auto, Transport::new(HttpProtocol::Auto, Some(&ca)).unwrap());
    assert_ne!(
        auto,
        Transport::new(HttpProtocol::Http1, Some(&ca)).unwrap()
    );
    assert_ne!(auto, Transport::new(HttpProtocol::Auto, None).unwrap());
    let missing = Transport::new(HttpProtocol::Auto, Some(Path::new("/nonexistent/ca.pem")));
    assert!(missing.unwrap_err().contains("cannot read ca_file"));
}

/// Connections idle past the timeout are closed, HTTP/1.1 and HTTP/2 alike,
/// and destinations left with none are dropped; an HTTP/2 connection still
/// carrying a request is kept however long ago it took one.
#[tokio::test]
async fn connections_idle_too_long_are_closed() {
    let server = HeldServer::start(None).await;
    let url = format!("http://{}/v1/chat", server.address);
    let pool = ConnectionPool::default();
    let http1 = Transport::new(HttpProtocol::Http1, None).unwrap();
    let http2 = Transport::new(HttpProtocol::Http2, None).unwrap();
    burst(&pool, &server, &http1, &url, 2).await;
    server.hold_again();
    burst(&pool, &server, &http2, &url, 2).await;
    assert_eq!(pool.counts(), (1, 2));

    let now = Instant::now();
    let mut destinations = pool.destinations.lock().unwrap();
    close_expired(
        &mut destinations,
        now + IDLE_TIMEOUT - Duration::from_secs(1),
    );
    assert_eq!(destinations.len(), 2, "none is past the timeout yet");

    let held = destinations
        .values_mut()
        .find_map(|c| c.http2_stream(now))
        .expect("an HTTP/2 connection with room");
    close_expired(&mut destinations, now + IDLE_TIMEOUT * 2);
    assert_eq!(
        destinations.len(),
        1,
        "the HTTP/1.1 destination had only idle ones"
    );
    assert_eq!(destinations.values().next().unwrap().http2.len(), 1);

    drop(held);
    close_expired(&mut destinations, now + IDLE_TIMEOUT * 2);
    assert!(destinations.is_empty());
}

/// Over HTTP/2 a request body larger than the server's flow-control window
/// arrives whole, and so does a response larger than the host's windows:
/// the host gives capacity back as it reads, or the provider would stall
/// after the first 2 MiB.
#[tokio::test]
async fn http2_bodies_larger_than_the_flow_control_windows_arrive_whole() {
    const RESPONSE_BYTES: usize = 12 << 20;
    const REQUEST_BYTES: usize = 3 << 20;
    let (listener, address) = tls::loopback_listener().await;
    let router = Router::new()
        .route(
            "/large",
            axum::routing::get(|| async { vec![b'x'; RESPONSE_BYTES] }),
        )
        .route(
            "/echo-length",
            axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    let server = tokio::spawn(tls::serve(listener, None, router, Arc::default()));
    let base = format!("http://{address}");
    let (pool, policy) = (ConnectionPool::default(), granting(&base));
    let transport = Transport::new(HttpProtocol::Http2, None).unwrap();
    let send = |request: Request<Bytes>| {
        let (pool, policy, transport) = (&pool, &policy, &transport);
        async move {
            let sent = pool
                .send(policy, transport, request, Duration::from_secs(10))
                .await
                .expect("the request succeeds");
            assert_eq!(sent.response.version(), Version::HTTP_2);
            let body = sent.response.into_body().collect();
            tokio::time::timeout(Duration::from_secs(20), body)
                .await
                .expect("the body arrives without stalling")
                .expect("the body is read")
                .to_bytes()
        }
    };

    let large = send(
        Request::get(format!("{base}/large"))
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(large.len(), RESPONSE_BYTES);

    let body = Bytes::from(vec![b'y'; REQUEST_BYTES]);
    let echo = Request::post(format!("{base}/echo-length"))
        .body(body)
        .unwrap();
    assert_eq!(send(echo).await, REQUEST_BYTES.to_string());
    server.abort();
}

/// A server may close an HTTP/2 connection after so many requests: it says
/// GOAWAY, answers what it took and takes no more. A request that finds the
/// connection going away is sent on a new one, and the pool stops using
/// the old one, though a request is still in flight on it.
#[tokio::test]
async fn a_request_on_a_connection_going_away_goes_on_a_new_one() {
    let (listener, address) = tls::loopback_listener().await;
    let going_away = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let connections = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn({
        let (going_away, release, connections) =
            (going_away.clone(), release.clone(), connections.clone());
        async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
                let (going_away, release) = (going_away.clone(), release.clone());
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(tcp).await.unwrap();
                    let mut answered = 0;
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        answered += 1;
                        if first && answered == 1 {
                            // The first connection's first request is held
                            // while the connection goes away.
                            connection.graceful_shutdown();
                            going_away.notify_one();
                            let release = release.clone();
                            tokio::spawn(async move {
                                release.notified().await;
                                let _ = respond.send_response(Response::new(()), true);
                            });
                        } else {
                            let _ = respond.send_response(Response::new(()), true);
                        }
                    }
                });
            }
        }
    });
    let url = format!("http://{address}/v1/chat");
    let (pool, policy) = (ConnectionPool::default(), granting(&url));
    let transport = Transport::new(HttpProtocol::Http2, None).unwrap();
    let get = || Request::get(&url).body(Bytes::new()).unwrap();
    let timeout = Duration::from_secs(10);
    let held = pool.send(&policy, &transport, get(), timeout);
    let after = async {
        going_away.notified().await;
        // Time for the GOAWAY to reach the pool's connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent = pool.send(&policy, &transport, get(), timeout).await;
        release.notify_one();
        sent
    };
    let (held, after) = tokio::join!(held, after);
    server.abort();
    assert_eq!(
        held.expect("the held request is answered")
            .response
            .status(),
        200
    );
    let after = after.expect("the later request went on a new connection");
    assert_eq!(after.response.status(), 200);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        pool.counts(),
        (1, 0),
        "the pool kept only the new connection"
    );
}

/// An HTTP/2 connection whose server stops answering (here: it stops
/// reading, so it answers no ping) is closed once a ping goes unanswered,
/// and the request waiting on it fails then, not at its own timeout.
#[tokio::test]
async fn a_request_on_a_connection_that_stopped_answering_fails_at_the_missed_ping() {
    let (listener, address) = tls::loopback_listener().await;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(tcp).await.unwrap();
        let _held = connection.accept().await;
        // The request arrived; from now on nothing is read or answered,
        // while the socket stays open.
        std::future::pending::<()>().await;
        drop(connection);
    });
    let url = format!("http://{address}/v1/chat");
    let (pool, policy) = (ConnectionPool::default(), granting(&url));
    let transport = Transport::new(HttpProtocol::Http2, None).unwrap();
    let request = Request::get(&url).body(Bytes::new()).unwrap();
    let started = Instant::now();
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        pool.send(&policy, &transport, request, Duration::from_secs(10)),
    )
    .await
    .expect("the request ends once the ping goes unanswered");
    server.abort();
    assert!(sent.is_err(), "the request failed");
    assert!(
        started.elapsed() >= HTTP2_PING_INTERVAL,
        "it failed only after a ping went unanswered"
    );
    let destinations = pool.destinations.lock().unwrap();
    let connections: Vec<_> = destinations.values().flat_map(|c| &c.http2).collect();
    assert_eq!(connections.len(), 1);
    assert!(
        connections[0].state.is_closed(),
        "the pool takes no more requests to it"
    );
}
