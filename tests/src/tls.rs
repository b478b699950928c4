//! Loopback TLS for tests: a private certificate authority, a certificate it
//! signed for `127.0.0.1` and `localhost`, and a server that speaks
//! HTTP/1.1 or HTTP/2 over it, as the client's ALPN and the server's offer
//! agree.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Streams a test server's HTTP/2 connection allows at once: the floor RFC
/// 9113 asks servers for, and what many of them announce.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// A certificate authority made for one test, with the certificate it
/// signed for the loopback server. The CA's certificate is in
/// [`Self::ca_file`], for a client to trust.
pub struct TestAuthority {
    dir: tempfile::TempDir,
    certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl TestAuthority {
    pub fn new() -> Self {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Opspawn test authority");
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("the CA's certificate");
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server parameters");
        let server_key = rcgen::KeyPair::generate().expect("a server key");
        let certificate = server
            .signed_by(&server_key, &ca)
            .expect("the server's certificate");
        let dir = tempfile::tempdir().expect("a directory for the CA's certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("writing ca.pem");
        Self {
            dir,
            certificate: certificate.der().clone(),
            key: PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes())
                .expect("the server key as PEM"),
        }
    }

    /// The authority's certificate (PEM), for a client to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server configuration with the loopback certificate, offering
    /// `alpn` (such as `[b"h2", b"http/1.1"]`; empty offers none).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.certificate.clone()], self.key.clone_key())
        .expect("the loopback certificate and its key");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for TestAuthority {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `router` on `listener`, over TLS when `tls` is given, speaking
/// HTTP/2 when the client starts it (by ALPN, or by prior knowledge over
/// cleartext) and HTTP/1.1 otherwise. `connections` counts the connections
/// accepted. Runs until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    connections: Arc<AtomicUsize>,
) {
    serve_with_stream_limit(listener, tls, router, connections, MAX_CONCURRENT_STREAMS).await;
}

/// [`serve`], allowing `max_streams` requests at once on an HTTP/2
/// connection.
pub async fn serve_with_stream_limit(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    connections: Arc<AtomicUsize>,
    max_streams: u32,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(max_streams);
            match acceptor {
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let stream = TokioIo::new(CoalescedWrites::new(stream));
                    let _ = builder.serve_connection(stream, service).await;
                }
                None => {
                    let stream = TokioIo::new(CoalescedWrites::new(tcp));
                    let _ = builder.serve_connection(stream, service).await;
                }
            }
        });
    }
}

/// The most a connection gathers before it writes, whatever is pending.
const COALESCE_LIMIT: usize = 64 << 10;

/// A connection's writes, gathered until every stream that had something
/// to send in this turn of the runtime has sent it, then written at once.
///
/// hyper's HTTP/2 server flushes after each frame a stream hands it, and
/// tokio runs the connection's task right after the stream that woke it: a
/// mock provider streaming to thousands of requests made one TLS record and
/// one `writev` for each server-sent event (about 50,000 a second in the
/// slow-LLM benchmark, most of that process's CPU). A busy HTTP/2 server
/// writes what its streams have ready together; so does this. A flush with
/// something gathered first yields once, so the streams woken at the same
/// tick add theirs, then writes it all. What is written is the same bytes.
struct CoalescedWrites<S> {
    inner: S,
    pending: Vec<u8>,
    /// The flush has yielded once; the next one writes.
    yielded: bool,
}

impl<S> CoalescedWrites<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            yielded: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> CoalescedWrites<S> {
    /// Writes everything gathered to the connection.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescedWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() >= COALESCE_LIMIT {
            ready!(self.poll_write_pending(cx))?;
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() && !self.yielded {
            // Woken at once, but queued behind the tasks already ready.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_write_pending(cx))?;
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A listener on an ephemeral loopback port, and its address.
pub async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding to loopback");
    let address = listener.local_addr().expect("the listener's address");
    (listener, address)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A connection that records each write it is asked for.
    #[derive(Default)]
    struct Recorded {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorded {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_before_a_flush_reach_the_connection_as_one_write_of_the_same_bytes() {
        let mut connection = CoalescedWrites::new(Recorded::default());
        connection.write_all(b"data: one\n\n").await.unwrap();
        connection.write_all(b"data: two\n\n").await.unwrap();
        assert!(
            connection.inner.writes.is_empty(),
            "nothing written before a flush"
        );
        connection.flush().await.unwrap();
        assert_eq!(
            connection.inner.writes,
            [b"data: one\n\ndata: two\n\n".to_vec()]
        );

        connection.write_all(b"data: three\n\n").await.unwrap();
        connection.shutdown().await.unwrap();
        assert_eq!(
            connection.inner.writes.len(),
            2,
            "a shutdown writes what is left"
        );
        assert_eq!(connection.inner.writes[1], b"data: three\n\n");
    }

    #[tokio::test]
    async fn past_the_limit_what_was_gathered_is_written_before_more_is_taken() {
        let mut connection = CoalescedWrites::new(Recorded::default());
        let block = vec![b'x'; COALESCE_LIMIT];
        connection.write_all(&block).await.unwrap();
        connection.write_all(b"more").await.unwrap();
        assert_eq!(connection.inner.writes, [block]);
        connection.flush().await.unwrap();
        assert_eq!(connection.inner.writes[1], b"more");
    }
}
