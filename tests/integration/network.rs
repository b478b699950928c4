//! Outbound HTTP from a hostile plugin: the misbehaving fixture's `http_get`
//! asks for whatever it likes (hosts it was not granted, loopback behind a
//! wildcard, a redirect's target, forged credentials) and the host's
//! `wasi:http` policy decides. Every target is a loopback server that
//! records each connection, so a test shows both the step's error code and
//! that the forbidden target received nothing: not a request, not even a
//! connection. Each test would fail if its check in `plugins/outbound.rs`
//! were removed, because the forbidden target would then be reached.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{FINISH, Harness, misbehaving_task, steps};

/// The credential's value, in the server's environment only.
const KEY: &str = "sk-test-123";
const KEY_VAR: &str = "OPSPAWN_TEST_KEY";

/// One request a target received: its path and headers (names lowercased).
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
}

impl Received {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

/// How a target answers one path: status and extra headers.
#[derive(Debug, Clone)]
struct Route {
    path: String,
    status: u16,
    headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Recorded {
    connections: AtomicUsize,
    requests: Mutex<Vec<Received>>,
    /// Any other path answers 200.
    routes: Mutex<Vec<Route>>,
}

/// A tiny HTTP/1.1 server on loopback that records every connection and
/// request, and answers `200 served by <name> at <path>` unless a route says
/// otherwise.
struct Target {
    name: &'static str,
    port: u16,
    recorded: Arc<Recorded>,
}

impl Target {
    /// On 127.0.0.1 and an ephemeral port, and on `[::1]` with the same port
    /// where there is IPv6, so `localhost` reaches it whichever it resolves to.
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Self {
            name,
            port,
            recorded: Arc::default(),
        };
        target.serve(listener);
        if let Ok(v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await {
            target.serve(v6);
        }
        target
    }

    /// On exactly `address`.
    async fn start_at(name: &'static str, address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address).await.unwrap();
        let target = Self {
            name,
            port: address.port(),
            recorded: Arc::default(),
        };
        target.serve(listener);
        target
    }

    fn serve(&self, listener: TcpListener) {
        let recorded = self.recorded.clone();
        let name = self.name;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                recorded.connections.fetch_add(1, Ordering::SeqCst);
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let _ = answer(&mut stream, name, &recorded).await;
                });
            }
        });
    }

    /// Makes `path` answer `status` with `headers`.
    fn route(&self, path: &str, status: u16, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        self.recorded.routes.lock().unwrap().push(Route {
            path: path.to_owned(),
            status,
            headers,
        });
    }

    /// `http://127.0.0.1:<port>`.
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.recorded.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Received> {
        self.recorded.requests.lock().unwrap().clone()
    }

    /// Fails unless nothing at all reached this target.
    fn assert_untouched(&self) {
        assert_eq!(
            self.connections(),
            0,
            "the {} target was reached: {:?}",
            self.name,
            self.requests()
        );
    }
}

async fn answer(stream: &mut TcpStream, name: &str, recorded: &Recorded) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let headers = lines
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    recorded.requests.lock().unwrap().push(Received {
        path: path.clone(),
        headers,
    });
    let (status, extra) = recorded
        .routes
        .lock()
        .unwrap()
        .iter()
        .find(|route| route.path == path)
        .map_or((200, Vec::new()), |route| {
            (route.status, route.headers.clone())
        });
    let (reason, body) = match status {
        200 => ("OK", format!("served by {name} at {path}")),
        _ => ("Redirect", String::new()),
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A manifest granting `hosts`, with `extra` TOML appended.
fn manifest(hosts: &[String], extra: &str) -> String {
    format!(
        "[limits]\ncall_timeout_ms = 10000\n\n[capabilities]\noutbound_hosts = {}\n{extra}",
        json!(hosts)
    )
}

/// A server whose misbehaving fixture runs under `manifest` (none at all
/// when `None`), with `env` added to the server's environment.
fn start(manifest: Option<&str>, env: &[(&str, &str)]) -> Harness {
    Harness::start_with_plugins(env, |plugins| {
        let path = plugins.path().join("misbehaving.toml");
        match manifest {
            Some(manifest) => std::fs::write(path, manifest).unwrap(),
            None => std::fs::remove_file(path).unwrap(),
        }
    })
}

/// Runs one tool call of the fixture; returns its step. No task ever shows
/// the credential.
async fn tool_step(harness: &Harness, tool: &str, arguments: Value) -> Value {
    let client = harness.client();
    let id = client
        .submit(&misbehaving_task(tool, arguments))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert!(
        !task.to_string().contains(KEY),
        "the credential leaked into the task: {task:#}"
    );
    let step = steps(&task)[1].clone();
    assert_eq!(step["kind"], "tool", "{task:#}");
    step
}

async fn get(harness: &Harness, url: &str) -> Value {
    tool_step(harness, "http_get", json!({ "url": url })).await
}

/// Fails unless the step succeeded with `status`; returns its output.
fn expect_status(step: &Value, status: u16) -> &Value {
    assert_eq!(step["status"], "succeeded", "step: {step:#}");
    assert_eq!(step["output"]["status"], status, "step: {step:#}");
    &step["output"]
}

/// Fails unless the host refused the request with the `wasi:http` error
/// `wasi_code` (`HTTP-request-denied` when no grant matched,
/// `destination-IP-prohibited` when the address is not allowed).
fn expect_denied(step: &Value, wasi_code: &str) {
    assert_eq!(step["status"], "failed", "not denied: {step:#}");
    assert_eq!(step["error"]["code"], "http_denied", "step: {step:#}");
    let message = step["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(wasi_code), "step: {step:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_host_is_reachable() {
    let allowed = Target::start("allowed").await;
    let forbidden = Target::start("forbidden").await;
    let harness = start(Some(&manifest(&[allowed.origin()], "")), &[]);

    let url = format!("{}/hello?x=1", allowed.origin());
    let step = tool_step(
        &harness,
        "http_get",
        json!({"url": url, "headers": {"x-plugin": "set by the plugin"}}),
    )
    .await;
    let output = expect_status(&step, 200);
    assert_eq!(output["body"], "served by allowed at /hello?x=1");
    assert_eq!(output["request_headers"]["x-plugin"], "set by the plugin");
    let requests = allowed.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].header("x-plugin"), ["set by the plugin"]);
    // The host sends the name the plugin asked for, though it connected to
    // the checked address.
    assert_eq!(
        requests[0].header("host"),
        [format!("127.0.0.1:{}", allowed.port)]
    );
    forbidden.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_not_granted_is_denied_by_name_or_address() {
    let allowed = Target::start("allowed").await;
    let forbidden = Target::start("forbidden").await;
    // Another loopback address on the allowed port: only the grant's literal
    // address is meant.
    let shadow = Target::start_at(
        "shadow",
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), allowed.port),
    )
    .await;
    let harness = start(Some(&manifest(&[allowed.origin()], "")), &[]);

    // By name: `localhost` is not the `127.0.0.1` of the grant.
    let step = get(&harness, &format!("http://localhost:{}/", forbidden.port)).await;
    expect_denied(&step, "HTTP-request-denied");
    assert!(
        step["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("http://localhost:{}/", forbidden.port)),
        "the message names the URL: {step:#}"
    );
    // By address: the granted IP on another port, another loopback IP on the
    // granted port, and the granted host and port over another scheme.
    let step = get(&harness, &format!("{}/", forbidden.origin())).await;
    expect_denied(&step, "HTTP-request-denied");
    let step = get(&harness, &format!("http://127.0.0.2:{}/", allowed.port)).await;
    expect_denied(&step, "HTTP-request-denied");
    let step = get(&harness, &format!("https://127.0.0.1:{}/", allowed.port)).await;
    expect_denied(&step, "HTTP-request-denied");

    forbidden.assert_untouched();
    shadow.assert_untouched();
    allowed.assert_untouched();

    // The grant itself works.
    expect_status(&get(&harness, &format!("{}/", allowed.origin())).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_host_not_granted_is_denied() {
    let allowed = Target::start("allowed").await;
    let forbidden = Target::start("forbidden").await;
    let steal = format!("{}/steal", forbidden.origin());
    allowed.route("/redirect", 302, &[("location", &steal)]);
    allowed.route("/hop", 302, &[("location", "/landing")]);
    let harness = start(Some(&manifest(&[allowed.origin()], "")), &[]);
    let redirect = format!("{}/redirect", allowed.origin());

    // The host does not follow redirects: the plugin sees the 302.
    let step = get(&harness, &redirect).await;
    let output = expect_status(&step, 302);
    assert_eq!(output["headers"]["location"], steal.as_str());

    // A plugin that follows it makes a new request, which is checked again.
    let step = tool_step(
        &harness,
        "http_get",
        json!({"url": redirect, "follow_redirects": true}),
    )
    .await;
    expect_denied(&step, "HTTP-request-denied");
    assert!(
        step["error"]["message"].as_str().unwrap().contains(&steal),
        "the denied hop is named: {step:#}"
    );
    forbidden.assert_untouched();

    // Following a redirect within the grant works.
    let step = tool_step(
        &harness,
        "http_get",
        json!({"url": format!("{}/hop", allowed.origin()), "follow_redirects": true}),
    )
    .await;
    let output = expect_status(&step, 200);
    assert_eq!(output["body"], "served by allowed at /landing");
    let paths: Vec<String> = allowed.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/redirect", "/redirect", "/hop", "/landing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_needs_a_grant_that_names_it() {
    let target = Target::start("loopback").await;

    // A wildcard means any public host: `localhost` matches it by name but
    // resolves to loopback, and a loopback literal is not named by it.
    let wildcard = start(Some(&manifest(&["http://*:*".to_owned()], "")), &[]);
    let step = get(&wildcard, &format!("http://localhost:{}/", target.port)).await;
    expect_denied(&step, "destination-IP-prohibited");
    let step = get(&wildcard, &format!("{}/", target.origin())).await;
    expect_denied(&step, "destination-IP-prohibited");
    target.assert_untouched();
    drop(wildcard);

    // Granting `localhost` itself admits it.
    let url = format!("http://localhost:{}", target.port);
    let named = start(Some(&manifest(std::slice::from_ref(&url), "")), &[]);
    let step = get(&named, &format!("{url}/")).await;
    let output = expect_status(&step, 200);
    assert_eq!(output["body"], "served by loopback at /");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_their_host_and_never_to_the_plugin() {
    let keyed = Target::start("keyed").await;
    let other = Target::start("other").await;
    keyed.route(
        "/to-other",
        302,
        &[("location", &format!("{}/landing", other.origin()))],
    );
    let credential = format!(
        "[[capabilities.credentials]]\nhost = \"{}\"\nheader = \"authorization\"\nvalue = \"Bearer ${{{KEY_VAR}}}\"\n",
        keyed.origin()
    );
    let harness = start(
        Some(&manifest(&[keyed.origin(), other.origin()], &credential)),
        &[(KEY_VAR, KEY)],
    );
    let bearer = format!("Bearer {KEY}");

    // The host adds the credential for its host.
    let step = get(&harness, &format!("{}/plain", keyed.origin())).await;
    let output = expect_status(&step, 200);
    assert_eq!(output["request_headers"], json!({}));
    // Another granted host gets none.
    expect_status(
        &get(&harness, &format!("{}/plain", other.origin())).await,
        200,
    );
    // A header the plugin forges is replaced by the real one.
    let step = tool_step(
        &harness,
        "http_get",
        json!({
            "url": format!("{}/forged", keyed.origin()),
            "headers": {"authorization": "Bearer forged"},
        }),
    )
    .await;
    let output = expect_status(&step, 200);
    assert_eq!(output["request_headers"]["authorization"], "Bearer forged");
    // The plugin may send its own header to a host without a credential:
    // what stops the forgery above is the host's replacement, not a filter.
    let step = tool_step(
        &harness,
        "http_get",
        json!({
            "url": format!("{}/forged", other.origin()),
            "headers": {"authorization": "Bearer forged"},
        }),
    )
    .await;
    expect_status(&step, 200);
    // A redirect from the keyed host to the other does not carry it along.
    let step = tool_step(
        &harness,
        "http_get",
        json!({"url": format!("{}/to-other", keyed.origin()), "follow_redirects": true}),
    )
    .await;
    assert_eq!(
        expect_status(&step, 200)["body"],
        "served by other at /landing"
    );

    let keyed_requests = keyed.requests();
    assert_eq!(keyed_requests.len(), 3, "{keyed_requests:?}");
    for request in &keyed_requests {
        assert_eq!(
            request.header("authorization"),
            [bearer.as_str()],
            "{request:?}"
        );
    }
    let other_requests = other.requests();
    let seen: Vec<(&str, Vec<&str>)> = other_requests
        .iter()
        .map(|request| (request.path.as_str(), request.header("authorization")))
        .collect();
    assert_eq!(
        seen,
        [
            ("/plain", vec![]),
            ("/forged", vec!["Bearer forged"]),
            ("/landing", vec![]),
        ]
    );

    // The plugin cannot read the variable the credential comes from.
    let step = tool_step(&harness, "env", json!({ "name": KEY_VAR })).await;
    assert_eq!(step["status"], "succeeded", "step: {step:#}");
    assert_eq!(step["output"]["value"], Value::Null, "step: {step:#}");
    // Nor does the plugin listing or the server's log show it.
    let (_, plugins) = harness.client().get("/v1/plugins").await.unwrap();
    assert!(!plugins.to_string().contains(KEY), "{plugins:#}");
    assert!(
        plugins.to_string().contains(KEY_VAR),
        "the listing names the variable: {plugins:#}"
    );
    assert!(!harness.server.log().contains(KEY), "the log shows the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grant_nothing_is_reachable() {
    let target = Target::start("target").await;
    let harness = start(None, &[]);
    for url in [
        format!("{}/", target.origin()),
        format!("http://localhost:{}/", target.port),
    ] {
        let step = get(&harness, &url).await;
        expect_denied(&step, "HTTP-request-denied");
    }
    target.assert_untouched();
}

/// A plugin cannot use the API of the server that runs it, whatever its
/// grant names (the address itself, `localhost`), and an LLM adapter whose
/// base URL is the server's own address fails as misconfigured (a
/// permanent error). The operator's `[policy] allow_own_server = true` lets both
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_call_its_own_server_unless_the_operator_allows_it() {
    use opspawn_testkit::Provider;

    let other = Target::start("other").await;
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let own = format!("127.0.0.1:{port}");
    let base_url = format!("http://{own}/v1");
    let grants = [
        "http://127.0.0.1:*".to_owned(),
        "http://localhost:*".to_owned(),
    ];
    let start_own = |config: &std::path::Path| {
        Harness::start_with_plugins(
            &[
                ("OPSPAWN_ADDR", &own),
                ("OPSPAWN_CONFIG", config.to_str().unwrap()),
                ("OPENAI_BASE_URL", &base_url),
                ("OPENAI_API_KEY", KEY),
            ],
            |plugins| {
                std::fs::write(
                    plugins.path().join("misbehaving.toml"),
                    manifest(&grants, ""),
                )
                .unwrap();
                let openai = Provider::OpenAi;
                plugins.add(openai.plugin(), openai.wasm(), Some(&openai.manifest()));
            },
        )
    };
    let adapter_task = json!({
        "goal": "What is 6 times 7?",
        "tools": ["calculator"],
        "llm": "openai",
        "model": "gpt-test",
    });

    let config = tempfile::NamedTempFile::new().unwrap();
    let harness = start_own(config.path());
    assert_eq!(harness.server.base_url, format!("http://{own}"));
    for url in [
        format!("http://{own}/v1/tasks"),
        format!("http://localhost:{port}/healthz"),
    ] {
        let step = get(&harness, &url).await;
        expect_denied(&step, "HTTP-request-denied");
    }
    // The same grant reaches another loopback server.
    let step = get(&harness, &format!("{}/", other.origin())).await;
    expect_status(&step, 200);

    let client = harness.client();
    let id = client.submit(&adapter_task).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(
        task["error"]["code"], "llm_adapter_misconfigured",
        "{task:#}"
    );
    let message = task["error"]["message"].as_str().unwrap();
    assert!(message.contains("own address"), "{message}");
    drop(harness);

    std::fs::write(config.path(), "[policy]\nallow_own_server = true\n").unwrap();
    let harness = start_own(config.path());
    let step = get(&harness, &format!("http://{own}/healthz")).await;
    let output = expect_status(&step, 200);
    assert!(
        output["body"]
            .as_str()
            .unwrap()
            .contains("\"status\":\"ok\""),
        "{output:#}"
    );
    let client = harness.client();
    let id = client.submit(&adapter_task).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_ne!(
        task["error"]["code"], "llm_adapter_misconfigured",
        "allowed, the adapter reaches the server (which has no chat endpoint): {task:#}"
    );
}
