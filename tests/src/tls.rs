//! Loopback TLS for tests: a private certificate authority, a certificate it
//! signed for `127.0.0.1` and `localhost`, and a server that speaks
//! HTTP/1.1 or HTTP/2 over it, as the client's ALPN and the server's offer
//! agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        });
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
