//! What the end-to-end tests and the benchmark share: the compiled plugins,
//! a real `opspawn serve` process on loopback, a small HTTP client, and
//! loopback mocks of the LLM providers ([`providers`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

pub use providers::{MockProviders, Provider, ProviderRequest};
pub use reqwest::StatusCode;

pub mod providers;
pub mod tls;

/// A client for the gRPC API, generated from `proto/opspawn/v1/tasks.proto`.
pub mod grpc {
    tonic::include_proto!("opspawn.v1");
}

/// The example plugins every server in the tests loads.
pub const EXAMPLES: &[&str] = &["calculator", "react", "scripted"];

/// Where the build script put the compiled components.
pub fn wasm_dir() -> PathBuf {
    PathBuf::from(env!("OPSPAWN_TEST_WASM_DIR"))
}

/// The path of one compiled component, such as `calculator`.
pub fn wasm(name: &str) -> PathBuf {
    wasm_dir().join(format!("{name}.wasm"))
}

/// A component built against the frozen `wit/v0.1.0` before 0.2.0 existed
/// (`tests/fixtures/wit-0.1.0/<name>.wasm`): proof that old plugins keep
/// loading and running.
pub fn legacy_wasm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/wit-0.1.0")
        .join(format!("{name}.wasm"))
}

/// The plugin sources (for manifests beside them).
pub fn plugin_sources() -> PathBuf {
    PathBuf::from(env!("OPSPAWN_TEST_PLUGIN_SRC"))
}

/// A temporary plugin folder.
pub struct PluginFolder {
    dir: tempfile::TempDir,
}

impl PluginFolder {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("creating a plugin folder"),
        }
    }

    /// A folder with the example plugins and their manifests.
    pub fn with_examples() -> Self {
        let folder = Self::new();
        for name in EXAMPLES {
            let manifest = plugin_sources().join(name).join(format!("{name}.toml"));
            let manifest = std::fs::read_to_string(manifest).ok();
            folder.add(name, name, manifest.as_deref());
        }
        folder
    }

    /// Copies component `wasm_name` in as `<as_name>.wasm`, with a manifest.
    pub fn add(&self, as_name: &str, wasm_name: &str, manifest: Option<&str>) -> &Self {
        self.add_file(as_name, &wasm(wasm_name), manifest)
    }

    /// Copies the component at `wasm` in as `<as_name>.wasm`, with a manifest.
    pub fn add_file(&self, as_name: &str, wasm: &Path, manifest: Option<&str>) -> &Self {
        let dest = self.dir.path().join(format!("{as_name}.wasm"));
        std::fs::copy(wasm, &dest)
            .unwrap_or_else(|e| panic!("copying {} into the plugin folder: {e}", wasm.display()));
        if let Some(manifest) = manifest {
            std::fs::write(dest.with_extension("toml"), manifest).expect("writing a manifest");
        }
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for PluginFolder {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `opspawn serve` child process on an ephemeral loopback port.
pub struct Server {
    binary: PathBuf,
    child: Child,
    pub base_url: String,
    /// `http://127.0.0.1:PORT` of the gRPC API, when `OPSPAWN_GRPC__LISTEN`
    /// turned it on.
    pub grpc_url: Option<String>,
    pub data_dir: PathBuf,
    pub plugin_dir: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// Whether starting waits for the plugins to load, not just for the
    /// server to listen.
    wait_for_plugins: bool,
}

impl Server {
    /// Starts a server whose data lives in `data_dir`, loading plugins from
    /// `plugin_dir`, and waits until it listens and the plugins there have
    /// loaded (or failed to). `env` adds or overrides environment variables.
    pub fn start(
        binary: &Path,
        data_dir: &Path,
        plugin_dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, data_dir, plugin_dir, env, true)
    }

    /// Like [`Server::start`], but returns as soon as the server listens,
    /// while its plugins may still be loading.
    pub fn start_listening(
        binary: &Path,
        data_dir: &Path,
        plugin_dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, data_dir, plugin_dir, env, false)
    }

    fn start_with(
        binary: &Path,
        data_dir: &Path,
        plugin_dir: &Path,
        env: &[(&str, &str)],
        wait_for_plugins: bool,
    ) -> anyhow::Result<Self> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log = data_dir.join("server.log");
        let (child, Listening { base_url, grpc_url }) =
            spawn(binary, data_dir, plugin_dir, &env, &log, wait_for_plugins)?;
        Ok(Self {
            binary: binary.to_owned(),
            child,
            base_url,
            grpc_url,
            data_dir: data_dir.to_owned(),
            plugin_dir: plugin_dir.to_owned(),
            env,
            log,
            wait_for_plugins,
        })
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base_url)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL: no shutdown, no flushing.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same data, on a new port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        let (child, listening) = spawn(
            &self.binary,
            &self.data_dir,
            &self.plugin_dir,
            &self.env,
            &self.log,
            self.wait_for_plugins,
        )?;
        self.child = child;
        self.base_url = listening.base_url;
        self.grpc_url = listening.grpc_url;
        Ok(())
    }

    /// What the server wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Where a started server listens, as it printed.
#[derive(Clone)]
struct Listening {
    base_url: String,
    grpc_url: Option<String>,
}

fn spawn(
    binary: &Path,
    data_dir: &Path,
    plugin_dir: &Path,
    env: &[(String, String)],
    log: &Path,
    wait_for_plugins: bool,
) -> anyhow::Result<(Child, Listening)> {
    std::fs::create_dir_all(data_dir)?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let cache = std::env::temp_dir().join("opspawn-test-compile-cache");
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .env("OPSPAWN_ADDR", "127.0.0.1:0")
        .env("OPSPAWN_DATA_DIR", data_dir)
        .env("OPSPAWN_PLUGIN_DIR", plugin_dir)
        .env("OPSPAWN_CACHE_DIR", &cache)
        .env("OPSPAWN_LOG", "info,opspawn=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;

    // Read stdout on a thread for the listening line (and, if asked, the
    // line saying the plugins have loaded), then keep draining it so the
    // server never blocks on a full pipe.
    let stdout = child.stdout.take().expect("piped stdout");
    let (found, ready) = mpsc::channel();
    std::thread::spawn(move || {
        let mut url = None;
        // Printed before the HTTP line, when gRPC is on.
        let mut grpc_url = None;
        let mut plugins_ready = !wait_for_plugins;
        let mut found = Some(found);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(listening) = line.strip_prefix("opspawn gRPC listening on ") {
                grpc_url = Some(format!("http://{}", listening.trim()));
            }
            if let Some(listening) = line.strip_prefix("opspawn listening on ") {
                url = Some(Listening {
                    base_url: listening.trim().to_owned(),
                    grpc_url: grpc_url.clone(),
                });
            }
            if line == "plugins ready" {
                plugins_ready = true;
            }
            if plugins_ready
                && let Some(url) = &url
                && let Some(found) = found.take()
            {
                let _ = found.send(url.clone());
            }
        }
    });
    match ready.recv_timeout(Duration::from_secs(120)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "the server did not start listening (and load its plugins) within 120 s; \
                 its log:\n{log}"
            )
        }
    }
}

/// A reqwest client builder, with ring installed first as the process's
/// TLS provider: the workspace builds reqwest with rustls and no provider of
/// its own (see the workspace's Cargo.toml, `rmcp`).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A JSON-over-HTTP client for the REST API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    pub base_url: String,
}

impl Client {
    pub fn new(base_url: &str) -> Self {
        Self {
            http: http_client_builder()
                .build()
                .expect("an HTTP client with default settings"),
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self.http.get(self.url(path)).send().await?;
        Ok((response.status(), response.json().await?))
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self.http.post(self.url(path)).json(body).send().await?;
        Ok((response.status(), response.json().await?))
    }

    /// Submits a task and returns its id, failing unless the server says 201.
    pub async fn submit(&self, body: &Value) -> anyhow::Result<String> {
        let (status, task) = self.post("/v1/tasks", body).await?;
        if status != StatusCode::CREATED {
            bail!("submitting {body} answered {status}: {task}");
        }
        Ok(task["id"].as_str().context("no id")?.to_owned())
    }

    pub async fn task(&self, id: &str) -> anyhow::Result<Value> {
        let (status, task) = self.get(&format!("/v1/tasks/{id}")).await?;
        if status != StatusCode::OK {
            bail!("GET task {id} answered {status}: {task}");
        }
        Ok(task)
    }

    /// Polls until the task is succeeded, failed or cancelled.
    pub async fn wait_until_finished(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let task = self.task(id).await?;
            if matches!(
                task["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return Ok(task);
            }
            if Instant::now() > deadline {
                bail!("task {id} did not finish within {timeout:?}; it is {task}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until `check` holds for the task.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let task = self.task(id).await?;
            if check(&task) {
                return Ok(task);
            }
            if Instant::now() > deadline {
                bail!(
                    "task {id} did not reach the expected state within {timeout:?}; it is {task}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Reads a task's SSE stream to its end: `(event name, id, data)`.
    pub async fn events(
        &self,
        id: &str,
        last_event_id: Option<i64>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<SseEvent>> {
        self.events_until(id, last_event_id, timeout, |_| false)
            .await
    }

    /// Reads a task's SSE stream until its end, or until `enough` says so
    /// of what was read (the connection is then dropped, as a client that
    /// goes away mid-stream would).
    pub async fn events_until(
        &self,
        id: &str,
        last_event_id: Option<i64>,
        timeout: Duration,
        enough: impl Fn(&[SseEvent]) -> bool,
    ) -> anyhow::Result<Vec<SseEvent>> {
        let mut request = self.http.get(self.url(&format!("/v1/tasks/{id}/events")));
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            bail!("events for {id} answered {}", response.status());
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !content_type.starts_with("text/event-stream") {
            bail!("events for {id} came as {content_type:?}, not text/event-stream");
        }
        let mut stream = response.bytes_stream().eventsource();
        let mut events = Vec::new();
        let read = async {
            while let Some(event) = stream.next().await {
                let event = event?;
                events.push(SseEvent {
                    event: event.event,
                    id: event.id,
                    data: serde_json::from_str(&event.data)?,
                });
                if enough(&events) {
                    break;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(timeout, read)
            .await
            .context("the event stream did not end in time")??;
        Ok(events)
    }
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// The MCP peers the tests run against, installed by `scripts/common.sh`
/// (`ensure_mcp_peers`, run by `scripts/test.sh`) into `mcp-peers/` of the
/// cargo target folder, or wherever `OPSPAWN_MCP_PEERS` says.
/// `tests/fixtures/grpc/client.py`: a gRPC client that learns the API from
/// server reflection (run it with [`mcp::python`], whose virtualenv holds
/// grpcio).
pub fn grpc_client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/grpc/client.py")
}

/// The Python and JavaScript plugin toolchains and example components,
/// built by `scripts/common.sh` (`build_script_plugins`, run by
/// `scripts/test.sh`) into the cargo target folder.
pub mod script_plugins {
    use std::path::PathBuf;

    /// `<target>`, from the running binary's path: a test binary's
    /// (`<target>/<profile>/deps/`) or the benchmark's (`<target>/<profile>/`).
    pub fn target_dir() -> PathBuf {
        let exe = std::env::current_exe().expect("the running binary's path");
        let mut profile = exe.parent().expect("a binary lives in a folder");
        if profile.ends_with("deps") {
            profile = profile
                .parent()
                .expect("deps/ is inside the profile's folder");
        }
        profile
            .parent()
            .expect("the profile's folder is inside the target folder")
            .to_owned()
    }

    /// A built example component, if it is built.
    pub fn built_example(name: &str) -> Option<PathBuf> {
        let path = target_dir()
            .join("plugin-examples")
            .join(format!("{name}.wasm"));
        path.is_file().then_some(path)
    }

    fn installed(path: PathBuf) -> PathBuf {
        assert!(
            path.exists(),
            "{} is missing: the Python and JavaScript plugin examples are not built. Run \
             scripts/test.sh, or `source scripts/common.sh && build_script_plugins` with the \
             same CARGO_TARGET_DIR",
            path.display()
        );
        path
    }

    /// A built example component: `word-count-python` or `word-count-js`.
    pub fn example(name: &str) -> PathBuf {
        installed(
            target_dir()
                .join("plugin-examples")
                .join(format!("{name}.wasm")),
        )
    }

    /// The `componentize-py` command of the toolchains' virtualenv.
    pub fn componentize_py() -> PathBuf {
        installed(target_dir().join("plugin-toolchains/venv/bin/componentize-py"))
    }

    /// The `componentize-js` command of the toolchains' npm install.
    pub fn componentize_js() -> PathBuf {
        installed(target_dir().join("plugin-toolchains/node/node_modules/.bin/componentize-js"))
    }
}

pub mod mcp {
    use std::path::{Path, PathBuf};

    fn peers() -> PathBuf {
        if let Some(dir) = std::env::var_os("OPSPAWN_MCP_PEERS") {
            return PathBuf::from(dir);
        }
        // <target>/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let target = exe
            .ancestors()
            .nth(3)
            .expect("the test binary lives in <target>/<profile>/deps");
        target.join("mcp-peers")
    }

    fn installed(path: PathBuf) -> PathBuf {
        assert!(
            path.exists(),
            "{} is missing: the MCP peers are not installed. Run scripts/test.sh, or \
             `source scripts/common.sh && ensure_mcp_peers` with the same CARGO_TARGET_DIR \
             (or point OPSPAWN_MCP_PEERS at them)",
            path.display()
        );
        path
    }

    /// The Python of the virtualenv holding the official Python SDK (`mcp`).
    pub fn python() -> PathBuf {
        installed(peers().join("venv/bin/python"))
    }

    /// `tests/fixtures/mcp/server.py`: the fixture server (official Python SDK).
    pub fn fixture_server() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mcp/server.py")
    }

    /// `tests/fixtures/mcp/client.py`: a client (official Python SDK).
    pub fn client_script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mcp/client.py")
    }

    /// The entry point of `@modelcontextprotocol/server-everything` (run with
    /// `node`, and `stdio` or `streamableHttp`).
    pub fn everything() -> PathBuf {
        installed(
            peers().join("node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"),
        )
    }

    /// A loopback port nothing listens on, for a server started next that
    /// must be told its port. It comes from below the kernel's ephemeral
    /// range (Linux hands out 32768 and up for port 0): a port 0 hands out
    /// could go to another test's server binding port 0 while this one's
    /// peer (a Python or Node process, slow to start) was not yet
    /// listening, and then the wait for the port would find the wrong
    /// server. Each call tries the next port from a start that differs by
    /// process.
    pub fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        const FIRST: u32 = 10_000;
        const COUNT: u32 = 20_000;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = std::process::id().wrapping_mul(7_919) % COUNT;
        for _ in 0..COUNT {
            let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT;
            let port = u16::try_from(FIRST + offset).expect("below 65536");
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
        panic!(
            "no free loopback port from {FIRST} to {}",
            FIRST + COUNT - 1
        );
    }

    /// Waits until something accepts connections on the loopback port.
    pub async fn wait_for_port(port: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing listens on 127.0.0.1:{port} after 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
