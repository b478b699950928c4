//! Outbound HTTP for plugins (`wasi:http/outgoing-handler`), deny by default.
//!
//! A request leaves only if its scheme, host and port match a grant, and only
//! to an address the grant allows: a name that resolves to a loopback,
//! private, link-local or otherwise non-public address is refused unless the
//! grant names that address literally (`http://127.0.0.1:*`) or is for
//! `localhost`; a name is refused if any of its addresses is refused.
//! Redirects are not followed by the host: a plugin that follows one makes a
//! new request, which is checked again.
//!
//! Every request, plain or TLS, is sent to the very address that was checked:
//! a second DNS answer cannot move it, and a name with both a public and a
//! private address cannot smuggle a connection to the private one.
//!
//! Credentials are added here, to requests bound for the host they are
//! granted for, so a plugin never holds a key and cannot send one elsewhere.
//!
//! The server's own listen addresses are refused too, whatever the grant, so
//! a plugin cannot drive the API that runs it (create tasks, read others'),
//! unless the operator's policy says it may.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Uri;
use hyper::http::{HeaderName, HeaderValue};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// One grant: `scheme://host[:port]`, where host may be `*.example.com` (any
/// subdomain) or `*` (any public host) and port may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGrant {
    scheme: String,
    host: String,
    /// `None` means any port.
    port: Option<u16>,
}

impl HostGrant {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("outbound host {text:?} must look like https://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "outbound host {text:?}: only http and https are supported"
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
                let port = match port {
                    "*" => None,
                    digits => Some(digits.parse::<u16>().map_err(|_| {
                        format!("outbound host {text:?} has an invalid port {digits:?}")
                    })?),
                };
                (host, port)
            }
            _ => (rest, Some(default_port(&scheme))),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() || host.contains('/') {
            return Err(format!("outbound host {text:?} has no valid host"));
        }
        Ok(Self { scheme, host, port })
    }

    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host_matches = if self.host == "*" {
            true
        } else if let Some(suffix) = self.host.strip_prefix("*.") {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        } else {
            self.host == host
        };
        self.scheme == scheme && host_matches && self.port.is_none_or(|p| p == port)
    }

    /// Whether this grant names `ip` so explicitly that a non-public address
    /// is meant.
    fn names_address(&self, ip: IpAddr) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(granted) => granted == ip,
            Err(_) => self.host == "localhost" && ip.is_loopback(),
        }
    }
}

pub(super) fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// A header the host adds to requests for one granted host, with its value
/// taken from the host's environment when the request is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub host: HostGrant,
    pub header: HeaderName,
    /// The value, with `${VAR}` replaced by the environment variable `VAR`.
    pub template: String,
}

impl Credential {
    /// The header value, or `None` if a variable it needs is unset (the
    /// request then goes without it and the provider answers 401).
    pub(super) fn value(&self) -> Option<HeaderValue> {
        let mut value = String::new();
        let mut rest = self.template.as_str();
        while let Some(start) = rest.find("${") {
            value.push_str(&rest[..start]);
            let end = rest[start..].find('}')? + start;
            value.push_str(&std::env::var(&rest[start + 2..end]).ok()?);
            rest = &rest[end + 1..];
        }
        value.push_str(rest);
        let mut header = HeaderValue::from_str(&value).ok()?;
        header.set_sensitive(true);
        Some(header)
    }

    /// The environment variables the template reads.
    pub fn variables(&self) -> Vec<String> {
        template_variables(&self.template)
    }
}

/// The variables a `${VAR}` template reads.
pub fn template_variables(template: &str) -> Vec<String> {
    template
        .split("${")
        .skip(1)
        .filter_map(|part| part.split_once('}').map(|(name, _)| name.to_owned()))
        .collect()
}

/// What one plugin may reach, shared by all of its calls.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    pub grants: Vec<HostGrant>,
    pub credentials: Vec<Credential>,
    /// The server's own listen addresses, refused whatever the grants say;
    /// `None` when the operator lets this plugin reach its own server.
    pub own_server: Option<Arc<ServerAddresses>>,
}

/// Where this server listens, known once it has bound its socket.
#[derive(Debug, Default)]
pub struct ServerAddresses(RwLock<Vec<SocketAddr>>);

impl ServerAddresses {
    pub fn set(&self, addresses: Vec<SocketAddr>) {
        *self.0.write().expect("server addresses lock") = addresses;
    }

    /// Whether a connection to `target` would reach this server: the same
    /// address and port, or any address of this machine when the server
    /// listens on all of them (`0.0.0.0`, `[::]`). Connecting to `0.0.0.0`
    /// reaches the local machine, so it counts as loopback.
    pub fn includes(&self, target: SocketAddr) -> bool {
        let target_ip = canonical_ip(target.ip());
        self.0
            .read()
            .expect("server addresses lock")
            .iter()
            .filter(|listen| listen.port() == target.port())
            .any(|listen| {
                let listen_ip = canonical_ip(listen.ip());
                listen_ip == target_ip
                    || (listen_ip.is_unspecified() && is_local_address(target_ip))
                    || (target_ip.is_unspecified() && listen_ip.is_loopback())
            })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` belongs to this machine: the kernel lets a socket bind to
/// exactly the local addresses (loopback and every interface's).
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl OutboundPolicy {
    /// Checks a request against the grants and resolves its host; returns
    /// the address to connect to.
    pub(super) async fn check(&self, uri: &Uri) -> Result<SocketAddr, HttpError> {
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri
            .host()
            .ok_or(HttpError::HttpRequestUriInvalid)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
        let matching: Vec<&HostGrant> = self
            .grants
            .iter()
            .filter(|grant| grant.matches(&scheme, &host, port))
            .collect();
        if matching.is_empty() {
            tracing::warn!(%scheme, %host, port, "outbound request denied: host not granted");
            return Err(HttpError::HttpRequestDenied);
        }
        let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| HttpError::DnsError {
                    rcode: None,
                    info_code: None,
                })?
                .collect(),
        };
        let allowed = |addr: &SocketAddr| {
            is_public(addr.ip()) || matching.iter().any(|grant| grant.names_address(addr.ip()))
        };
        if let Some(own) = &self.own_server
            && addresses.iter().any(|address| own.includes(*address))
        {
            tracing::warn!(
                %host,
                port,
                "outbound request denied: it is this server's own address ([policy] allow_own_server)"
            );
            return Err(HttpError::HttpRequestDenied);
        }
        match addresses.first() {
            Some(first) if addresses.iter().all(allowed) => Ok(*first),
            Some(_) => {
                tracing::warn!(%host, ?addresses, "outbound request denied: non-public address");
                Err(HttpError::DestinationIpProhibited)
            }
            None => Err(HttpError::DestinationNotFound),
        }
    }
}

impl OutboundPolicy {
    /// Adds the credentials granted for `scheme://host:port` to `headers`,
    /// replacing whatever was written under their names.
    pub(super) fn apply_credentials(
        &self,
        scheme: &str,
        host: &str,
        port: u16,
        headers: &mut hyper::HeaderMap,
    ) {
        for credential in &self.credentials {
            if credential.host.matches(scheme, host, port) {
                headers.remove(&credential.header);
                if let Some(value) = credential.value() {
                    headers.insert(credential.header.clone(), value);
                }
            }
        }
    }
}

/// The `wasi:http` hooks for one call: the plugin's policy applied to each
/// outgoing request.
pub struct PolicyHooks {
    pub policy: Arc<OutboundPolicy>,
    /// The most bytes of one write to a request body: the host buffers at
    /// most two per body until the request is sent.
    pub body_chunk_bytes: usize,
}

impl WasiHttpHooks for PolicyHooks {
    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        self.body_chunk_bytes
    }

    fn send_request(
        &mut self,
        mut request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        let policy = self.policy.clone();
        Box::new(async move {
            let uri = request.uri().clone();
            let address = policy.check(&uri).await?;
            let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase();
            let port = uri.port_u16().unwrap_or_else(|| default_port(&scheme));
            policy.apply_credentials(&scheme, &host, port, request.headers_mut());
            send_to(address, &host, scheme == "https", request, options).await
        })
    }
}

type ConnectionDone = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// Sends a request over a new connection to `address`, with TLS for
/// `server_name` if asked: the connection goes exactly where the policy
/// looked, whatever DNS says now.
async fn send_to(
    address: SocketAddr,
    server_name: &str,
    tls: bool,
    mut request: hyper::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(hyper::Response<WasiBody>, ConnectionDone), HttpError> {
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(Duration::from_secs(30));
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(Duration::from_secs(600));
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
            _ => HttpError::Connect(e),
        })?;
    // On the wire the request line carries only the path; the Host header
    // (set by wasi:http from the URI) names the server.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let handshake = async {
        if tls {
            let name = ServerName::try_from(server_name.to_owned())?;
            let stream = tls_connector()
                .connect(name, tcp)
                .await
                .map_err(HttpError::Tls)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            Ok::<_, HttpError>((sender, drive(connection)))
        } else {
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            Ok((sender, drive(connection)))
        }
    };
    let (mut sender, connection) = tokio::time::timeout(connect_timeout, handshake)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;
    let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??;
    Ok((
        response.map(|body| body.map_err(HttpError::from).boxed_unsync()),
        connection,
    ))
}

/// Runs a connection in the background; the returned future reports how it
/// ended.
fn drive<C>(connection: C) -> ConnectionDone
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let task = tokio::spawn(connection);
    Box::new(async move {
        match task.await {
            Ok(result) => result.map_err(HttpError::from),
            Err(_) => Err(HttpError::ConnectionTerminated),
        }
    })
}

/// TLS with the Mozilla root certificates, built once.
pub(super) fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        Arc::new(tls_config(None).expect("the Mozilla roots make a TLS configuration"))
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// TLS for an https destination: the Mozilla roots, plus the certificates
/// (PEM) in `ca_file` when the operator names one, for a server whose
/// certificate a private certificate authority signed.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    if let Some(path) = ca_file {
        let unreadable =
            |e: &dyn std::fmt::Display| format!("cannot read ca_file {}: {e}", path.display());
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&e))?;
        if certificates.is_empty() {
            return Err(format!(
                "ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|e| unreadable(&e))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || ip.to_ipv4().is_some_and(|v4| !is_public_v4(v4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(text: &str) -> HostGrant {
        HostGrant::parse(text).unwrap()
    }

    #[test]
    fn grants_match_scheme_host_and_port() {
        let openai = grant("https://api.openai.com");
        assert!(openai.matches("https", "api.openai.com", 443));
        assert!(!openai.matches("http", "api.openai.com", 80));
        assert!(!openai.matches("https", "api.openai.com", 8443));
        assert!(!openai.matches("https", "evil.com", 443));

        let wildcard = grant("https://*.example.com:*");
        assert!(wildcard.matches("https", "a.example.com", 8443));
        assert!(wildcard.matches("https", "a.b.example.com", 443));
        assert!(!wildcard.matches("https", "example.com", 443));
        assert!(!wildcard.matches("https", "badexample.com", 443));

        let loopback = grant("http://127.0.0.1:*");
        assert!(loopback.matches("http", "127.0.0.1", 41234));
        assert!(loopback.names_address("127.0.0.1".parse().unwrap()));
        assert!(!grant("https://*").names_address("127.0.0.1".parse().unwrap()));
        assert!(grant("http://[::1]:8080").matches("http", "::1", 8080));
    }

    #[test]
    fn bad_grants_are_refused() {
        for bad in ["api.openai.com", "ftp://x", "https://", "https://host:port"] {
            assert!(HostGrant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_servers_own_addresses_are_recognised() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let own = ServerAddresses::default();
        assert!(!own.includes(addr("127.0.0.1:8080")), "not known yet");
        own.set(vec![addr("127.0.0.1:8080")]);
        assert!(own.includes(addr("127.0.0.1:8080")));
        assert!(own.includes(addr("[::ffff:127.0.0.1]:8080")));
        assert!(
            own.includes(addr("0.0.0.0:8080")),
            "0.0.0.0 connects locally"
        );
        assert!(!own.includes(addr("127.0.0.1:8081")), "another port");
        assert!(!own.includes(addr("127.0.0.2:8080")), "another address");

        own.set(vec![addr("0.0.0.0:9090")]);
        assert!(own.includes(addr("127.0.0.1:9090")));
        assert!(own.includes(addr("127.3.2.1:9090")));
        assert!(own.includes(addr("[::1]:9090")));
        assert!(!own.includes(addr("1.1.1.1:9090")), "not this machine");
        assert!(!own.includes(addr("127.0.0.1:9091")));
    }

    #[tokio::test]
    async fn requests_to_the_servers_own_address_are_denied() {
        let own = Arc::new(ServerAddresses::default());
        own.set(vec!["127.0.0.1:4321".parse().unwrap()]);
        let policy = |own_server| OutboundPolicy {
            grants: vec![grant("http://127.0.0.1:*")],
            credentials: Vec::new(),
            own_server,
        };
        let guarded = policy(Some(own));
        let uri = |text: &str| text.parse::<Uri>().unwrap();
        assert!(matches!(
            guarded.check(&uri("http://127.0.0.1:4321/v1/tasks")).await,
            Err(HttpError::HttpRequestDenied)
        ));
        assert!(guarded.check(&uri("http://127.0.0.1:4322/")).await.is_ok());
        let allowed = policy(None);
        assert!(
            allowed
                .check(&uri("http://127.0.0.1:4321/v1/tasks"))
                .await
                .is_ok()
        );
    }

    #[test]
    fn credentials_expand_variables_and_name_them() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("OPSPAWN_TEST_CREDENTIAL", "sk-123") };
        let credential = Credential {
            host: grant("https://api.openai.com"),
            header: HeaderName::from_static("authorization"),
            template: "Bearer ${OPSPAWN_TEST_CREDENTIAL}".into(),
        };
        assert_eq!(credential.value().unwrap(), "Bearer sk-123");
        assert_eq!(credential.variables(), ["OPSPAWN_TEST_CREDENTIAL"]);
        let missing = Credential {
            template: "Bearer ${OPSPAWN_TEST_UNSET_VARIABLE}".into(),
            ..credential
        };
        assert!(missing.value().is_none());
    }
}
