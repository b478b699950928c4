//! End-to-end tests: each starts a real `opspawn serve` process on an
//! ephemeral loopback port, with the real compiled plugins, and drives it
//! over HTTP.

mod api;
mod approvals;
mod authoring;
mod budgets;
mod capacity;
mod connections;
mod crash;
mod dashboard;
mod durability;
mod folder;
mod grpc;
mod limits;
mod mcp;
mod mcp_server;
mod memory;
mod network;
mod observability;
mod plugins;
mod providers;
mod sandbox;
mod scaleout;
mod schedules;
mod streaming;
mod tenancy;
mod threads;
mod traces;
mod versions;

use std::path::Path;
use std::time::Duration;

use opspawn_testkit::{Client, PluginFolder, Server, StatusCode};
use serde_json::{Value, json};

/// Generous: these machines are shared and slow; a pass is usually far quicker.
pub const FINISH: Duration = Duration::from_secs(60);

/// A one-pixel PNG, base64: an image every provider takes.
pub const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// Sends `signal` (such as `-TERM` or `-STOP`) to a server's process.
pub fn signal(server: &Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} failed");
}

/// A server with the example plugins and the misbehaving fixture, in its own
/// temporary data directory and, on Postgres, its own schema.
pub struct Harness {
    pub server: Server,
    pub plugins: PluginFolder,
    _data: tempfile::TempDir,
    /// The Postgres URL and schema the server uses, dropped with the harness.
    postgres: Option<(String, String)>,
}

/// Selects the store the servers use: `sqlite` (the default) or `postgres`.
const DATABASE_VAR: &str = "OPSPAWN_TEST_DATABASE";
/// The Postgres database the tests use; each harness gets a schema of its own.
const POSTGRES_URL_VAR: &str = "OPSPAWN_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Text no plugin may ever read.
pub const SECRET: &str = "the-host-secret-4f1c";

/// The misbehaving fixture's manifest: short limits so tests run fast, and a
/// writable folder for the counting tool.
pub const MISBEHAVING_MANIFEST: &str = r#"
[limits]
memory_mib = 32
call_timeout_ms = 1000
max_output_bytes = 65536

[capabilities]
env = ["OPSPAWN_TEST_GRANTED"]

[[capabilities.dirs]]
path = "counts"
guest_path = "/counts"
writable = true

[[capabilities.dirs]]
path = "readonly"
guest_path = "/readonly"
"#;

impl Harness {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A field of the server's `/proc/<pid>/status` (`VmHWM`, `THP_enabled`,
    /// ...), its value trimmed; `None` when the kernel shows no such field.
    pub fn server_status(&self, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server.pid()))
            .expect("reading the server's /proc status");
        status.lines().find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            Some(value.trim().to_owned())
        })
    }

    /// Starts a server with `env` added to its environment (after, so
    /// overriding, what the harness sets).
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_with_plugins(env, |_| {})
    }

    /// Like [`Harness::start_with`], with `add` putting more plugins into the
    /// folder before the server starts.
    pub fn start_with_plugins(env: &[(&str, &str)], add: impl FnOnce(&PluginFolder)) -> Self {
        let plugins = PluginFolder::with_examples();
        std::fs::create_dir_all(plugins.path().join("counts")).unwrap();
        let readonly = plugins.path().join("readonly");
        std::fs::create_dir_all(&readonly).unwrap();
        std::fs::write(readonly.join("visible.txt"), "granted content").unwrap();
        // A secret beside the granted folder, and a symlink pointing at it.
        std::fs::write(plugins.path().join("secret.txt"), SECRET).unwrap();
        std::os::unix::fs::symlink(plugins.path().join("secret.txt"), readonly.join("link.txt"))
            .unwrap();
        plugins.add("misbehaving", "misbehaving", Some(MISBEHAVING_MANIFEST));
        add(&plugins);
        let data = tempfile::tempdir().unwrap();

        let postgres = match std::env::var(DATABASE_VAR).as_deref() {
            Err(_) | Ok("" | "sqlite") => None,
            Ok("postgres") => {
                let url = std::env::var(POSTGRES_URL_VAR)
                    .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
                let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
                Some((url, schema))
            }
            Ok(other) => panic!("{DATABASE_VAR}={other:?}: use sqlite or postgres"),
        };
        let database_url = postgres.as_ref().map(|(url, schema)| {
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}opspawn_schema={schema}")
        });
        let mut server_env: Vec<(&str, &str)> = Vec::new();
        if let Some(database_url) = &database_url {
            server_env.push(("OPSPAWN_DATABASE_URL", database_url));
            // A restarted server cannot take its old claims over at once on
            // Postgres, as it does on SQLite: they stay claimed until their
            // leases expire. Short leases keep the durability test well
            // within FINISH.
            server_env.push(("OPSPAWN_LEASE", "3s"));
        }
        server_env.extend_from_slice(env);

        let server = Server::start(binary(), data.path(), plugins.path(), &server_env)
            .expect("the server starts");
        Self {
            server,
            plugins,
            _data: data,
            postgres,
        }
    }

    pub fn client(&self) -> Client {
        self.server.client()
    }
}

impl Drop for Harness {
    /// On Postgres, stops the server and drops its schema, so test runs do
    /// not pile schemas up. (A run that is killed leaves its schemas behind.)
    fn drop(&mut self) {
        let Some((url, schema)) = self.postgres.take() else {
            return;
        };
        self.server.kill9();
        // Drop runs inside the test's runtime, where blocking on a future is
        // not allowed: use a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                // The name is ours: t_ and hex digits.
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("dropping the test schema failed: {error:#}");
        }
    }
}

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_opspawn"))
}

/// The three-step task of the README: the scripted LLM asks for the
/// calculator, the calculator answers, the LLM gives the final answer.
pub fn calculator_task(expression: &str, answer: &str) -> Value {
    json!({
        "goal": format!("What is {expression}?"),
        "tools": ["calculator"],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]},
            {"content": format!("Thought: the calculator answered.\nFinal Answer: {answer}")}
        ]}}
    })
}

/// A task whose scripted LLM calls one tool of the misbehaving fixture and
/// then finishes.
pub fn misbehaving_task(tool: &str, arguments: Value) -> Value {
    json!({
        "goal": format!("Call {tool}"),
        "tools": [tool],
        // Each failure here should be seen once, not retried.
        "max_retries": 0,
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": tool, "arguments": arguments}]},
            {"content": "Final Answer: carried on"}
        ]}}
    })
}

pub fn steps(task: &Value) -> &Vec<Value> {
    task["steps"].as_array().expect("the task has steps")
}

/// Sends `method path` with `body` as JSON, as the holder of `token` if
/// given; answers the status and the body (`null` when it is not JSON).
pub async fn send(
    client: &Client,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = client
        .http()
        .request(method.parse().unwrap(), client.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}
