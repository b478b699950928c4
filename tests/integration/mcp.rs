//! Opspawn as an MCP client, against real MCP peers in real processes: the
//! fixture server written with the official Python SDK
//! (`tests/fixtures/mcp/server.py`, which records every call it gets) and
//! the reference server `@modelcontextprotocol/server-everything`, over
//! stdio and streamable HTTP on loopback. Tasks call their tools through the
//! ReAct planner and the scripted LLM, as they would a component's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opspawn_testkit::{Client, mcp};
use serde_json::{Value, json};

use crate::{FINISH, Harness, SECRET, calculator_task, misbehaving_task, steps};

/// A configuration file and the fixture's record of the calls it got.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    record: PathBuf,
}

impl Setup {
    /// `servers` is TOML for `[[mcp.servers]]` entries; `{python}`,
    /// `{fixture}`, `{record}` and `{everything}` are filled in.
    fn new(servers: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("calls.jsonl");
        let config = dir.path().join("opspawn.toml");
        let toml = servers
            .replace("{python}", mcp::python().to_str().unwrap())
            .replace("{fixture}", mcp::fixture_server().to_str().unwrap())
            .replace("{record}", record.to_str().unwrap())
            .replace("{everything}", mcp::everything().to_str().unwrap());
        std::fs::write(&config, toml).unwrap();
        Self {
            _dir: dir,
            config,
            record,
        }
    }

    fn start(&self, env: &[(&str, &str)]) -> Harness {
        let mut all = vec![("OPSPAWN_CONFIG", self.config.to_str().unwrap())];
        all.extend_from_slice(env);
        Harness::start_with(&all)
    }

    /// The calls the fixture recorded, oldest first.
    fn calls(&self) -> Vec<Value> {
        recorded_calls(&self.record)
    }
}

/// The calls the fixture server recorded in `record`, oldest first.
fn recorded_calls(record: &Path) -> Vec<Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The fixture over stdio, as the operator would configure it.
const FIXTURE: &str = r#"
[[mcp.servers]]
name = "fixture"
command = "{python}"
args = ["{fixture}", "--record", "{record}"]
call_timeout = "2s"
restart_delay = "3s"
deny_tools = ["add_tool"]
"#;

/// A task whose scripted LLM makes `calls` one after the other (each an
/// action of its own), then answers `answer`.
fn script_task(tools: &[&str], calls: &[(&str, Value)], answer: &str) -> Value {
    let mut script: Vec<Value> = calls
        .iter()
        .map(|(name, arguments)| json!({"tool_calls": [{"name": name, "arguments": arguments}]}))
        .collect();
    script.push(json!({"content": format!("Final Answer: {answer}")}));
    json!({
        "goal": "use the MCP tools",
        "tools": tools,
        "max_retries": 0,
        "options": {"llm": {"script": script}},
    })
}

async fn run(client: &Client, body: &Value) -> Value {
    let id = client.submit(body).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap()
}

/// A task that calls `tool` once with `arguments`, then answers "done".
fn one_call_task(tool: &str, arguments: Value) -> Value {
    script_task(&[tool], &[(tool, arguments)], "done")
}

/// Runs [`one_call_task`] to its end.
async fn run_one_call(client: &Client, tool: &str, arguments: Value) -> Value {
    run(client, &one_call_task(tool, arguments)).await
}

/// The tool steps of a task, in order.
fn tool_steps(task: &Value) -> Vec<Value> {
    steps(task)
        .iter()
        .filter(|step| step["kind"] == "tool")
        .cloned()
        .collect()
}

async fn mcp_server(client: &Client, name: &str) -> Value {
    let (_, list) = client.get("/v1/plugins").await.unwrap();
    list["mcp_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|server| server["name"] == name)
        .unwrap_or_else(|| panic!("MCP server {name} is listed: {list:#}"))
        .clone()
}

fn tool_names(server: &Value) -> Vec<String> {
    server["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| tool["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `GET /v1/plugins` until the server's view passes `check`.
async fn wait_for_server(client: &Client, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + FINISH;
    loop {
        let server = mcp_server(client, name).await;
        if check(&server) {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "MCP server {name} did not reach the expected state: {server:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_servers_tools_are_listed_and_run_as_journaled_steps() {
    let setup = Setup::new(FIXTURE);
    let harness = setup.start(&[]);
    let client = harness.client();

    let server = mcp_server(&client, "fixture").await;
    assert_eq!(server["status"], "ready", "{server:#}");
    let names = tool_names(&server);
    for name in [
        "fixture__echo",
        "fixture__shout",
        "fixture__fail",
        "fixture__hang",
    ] {
        assert!(names.contains(&name.to_owned()), "{name} in {names:?}");
    }
    assert!(
        !names.contains(&"fixture__add_tool".to_owned()),
        "a denied tool is not offered: {names:?}"
    );
    let echo = &server["tools"][names.iter().position(|n| n == "fixture__echo").unwrap()];
    assert_eq!(echo["mcp_name"], "echo");
    assert_eq!(
        echo["input_schema"]["required"],
        json!(["text"]),
        "{echo:#}"
    );
    // The CLI lists it too.
    let listed = Command::new(crate::binary())
        .args(["plugins", "list", "--server", &client.base_url])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("fixture") && listed.contains("fixture__echo"),
        "{listed}"
    );

    let task = run(
        &client,
        &script_task(
            &["fixture__echo", "fixture__shout", "fixture__fail"],
            &[
                ("fixture__echo", json!({"text": "hi"})),
                ("fixture__shout", json!({"text": "hi"})),
                ("fixture__fail", json!({"message": "it broke"})),
                ("fixture__echo", json!({"text": 5})),
                ("calculator", json!({"expression": "1+1"})),
            ],
            "done",
        ),
    )
    .await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let tools = tool_steps(&task);
    // structuredContent when the tool gives it; its text otherwise.
    assert_eq!(tools[0]["plugin"], "mcp:fixture", "{task:#}");
    assert_eq!(tools[0]["output"], json!({"echoed": "hi"}), "{task:#}");
    assert_eq!(tools[1]["output"], "HI", "{task:#}");
    // isError fails the step with the tool's message.
    assert_eq!(tools[2]["status"], "failed", "{task:#}");
    assert_eq!(tools[2]["error"]["code"], "mcp_tool_error", "{task:#}");
    assert!(
        tools[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("it broke"),
        "{task:#}"
    );
    // The schema the server published is checked before the call.
    assert_eq!(tools[3]["error"]["code"], "invalid_tool_input", "{task:#}");
    // The task's tool list applies to MCP tasks as to any.
    assert_eq!(tools[4]["error"]["code"], "tool_not_allowed", "{task:#}");

    let calls = setup.calls();
    assert_eq!(
        calls.len(),
        3,
        "refused input never reaches the server: {calls:#?}"
    );
    let id = task["id"].as_str().unwrap();
    for (call, step) in calls.iter().zip(&tools) {
        let key = format!("{id}:{}", step["seq"]);
        assert_eq!(call["meta"]["opspawn/idempotency_key"], key, "{call:#}");
        assert_eq!(call["meta"]["opspawn/task_id"], id, "{call:#}");
        assert_eq!(call["meta"]["opspawn/step"], step["seq"], "{call:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_times_out_and_is_retried_under_the_same_key() {
    let setup = Setup::new(FIXTURE);
    let harness = setup.start(&[]);
    let client = harness.client();
    // The first try for a key sleeps past the 2 s call_timeout; the retry
    // (same step, same key) answers at once.
    let mut body = one_call_task("fixture__hang", json!({"seconds": 30}));
    body["max_retries"] = json!(2);
    let started = Instant::now();
    let task = run(&client, &body).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    assert_eq!(step["output"]["tries"], 2, "{task:#}");
    assert!(started.elapsed() < Duration::from_secs(20), "cut at 2 s");
    let calls = setup.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(
        calls[0]["meta"]["opspawn/idempotency_key"],
        calls[1]["meta"]["opspawn/idempotency_key"]
    );

    // Without retries left, the timeout fails the step with its code.
    let mut body = one_call_task("fixture__hang", json!({"seconds": 30, "always": true}));
    body["max_retries"] = json!(0);
    let task = run(&client, &body).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["error"]["code"], "mcp_timeout", "{task:#}");
    // The host carries on: a component's tool still runs.
    let task = run(&client, &calculator_task("6*7", "42")).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_that_exits_is_restarted_and_its_calls_fail_meanwhile() {
    let setup = Setup::new(FIXTURE);
    let harness = setup.start(&[]);
    let client = harness.client();
    let before = mcp_server(&client, "fixture").await;
    let first_pid = before["pid"].as_u64().unwrap();

    let task = run_one_call(&client, "fixture__crash", json!({})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["error"]["code"], "mcp_unavailable", "{task:#}");

    // Down for its 3 s restart delay: the tools stay listed, and calls
    // fail at once with the retryable code.
    let down = wait_for_server(&client, "fixture", |s| s["status"] == "restarting").await;
    assert!(
        tool_names(&down).contains(&"fixture__whoami".to_owned()),
        "{down:#}"
    );
    assert!(
        down["error"].as_str().unwrap().contains("again"),
        "{down:#}"
    );
    let task = run_one_call(&client, "fixture__whoami", json!({})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["error"]["code"], "mcp_unavailable", "{task:#}");

    let up = wait_for_server(&client, "fixture", |s| s["status"] == "ready").await;
    assert_eq!(up["restarts"], 1, "{up:#}");
    let task = run_one_call(&client, "fixture__whoami", json!({})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    assert_ne!(step["output"]["pid"].as_u64().unwrap(), first_pid);
    assert!(harness.server.log().contains("MCP server is down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_tool_list_is_picked_up() {
    let setup = Setup::new(&FIXTURE.replace("deny_tools = [\"add_tool\"]", ""));
    let harness = setup.start(&[]);
    let client = harness.client();
    let task = run_one_call(&client, "fixture__add_tool", json!({"name": "late"})).await;
    assert_eq!(tool_steps(&task)[0]["status"], "succeeded", "{task:#}");
    wait_for_server(&client, "fixture", |s| {
        tool_names(s).contains(&"fixture__late".to_owned())
    })
    .await;
    let task = run_one_call(&client, "fixture__late", json!({"text": "x"})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    assert!(step["output"].to_string().contains("late: x"), "{task:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_start_is_reported_and_the_host_serves() {
    let setup = Setup::new(&format!(
        "{FIXTURE}
[[mcp.servers]]
name = \"missing\"
command = \"/nonexistent/mcp-server\"

[[mcp.servers]]
name = \"bad__name\"
command = \"x\"
"
    ));
    let harness = setup.start(&[]);
    let client = harness.client();
    let missing = mcp_server(&client, "missing").await;
    assert_ne!(missing["status"], "ready", "{missing:#}");
    assert!(
        missing["error"].as_str().unwrap().contains("cannot start"),
        "{missing:#}"
    );
    let bad = mcp_server(&client, "bad__name").await;
    assert_eq!(bad["status"], "failed", "{bad:#}");
    assert_eq!(mcp_server(&client, "fixture").await["status"], "ready");
    let task = run(&client, &calculator_task("2+2", "4")).await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let log = harness.server.log();
    assert!(
        log.contains("missing") && log.contains("cannot start"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_runs_over_stdio() {
    let setup = Setup::new(
        r#"
[[mcp.servers]]
name = "everything"
command = "node"
args = ["{everything}", "stdio"]
allow_tools = ["echo", "get-sum", "get-structured-content"]
"#,
    );
    let harness = setup.start(&[]);
    let client = harness.client();
    let server = mcp_server(&client, "everything").await;
    assert_eq!(server["status"], "ready", "{server:#}");
    let mut names = tool_names(&server);
    names.sort();
    assert_eq!(
        names,
        [
            "everything__echo",
            "everything__get-structured-content",
            "everything__get-sum"
        ],
        "only the allowed tools: {server:#}"
    );
    let task = run(
        &client,
        &script_task(
            &["everything__get-sum", "everything__echo"],
            &[
                ("everything__get-sum", json!({"a": 2, "b": 3})),
                ("everything__echo", json!({"message": "hello"})),
            ],
            "5",
        ),
    )
    .await;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let tools = tool_steps(&task);
    assert!(tools[0]["output"].to_string().contains('5'), "{task:#}");
    assert!(tools[1]["output"].to_string().contains("hello"), "{task:#}");
}

/// A child process killed when the test ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_peer(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Peer {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    Peer(command.spawn().unwrap())
}

/// The fixture server over streamable HTTP on a free port, recording the
/// calls it gets.
struct HttpFixture {
    /// First, so that the server stops before its record is removed.
    _peer: Peer,
    port: u16,
    _record_dir: tempfile::TempDir,
    record: PathBuf,
}

impl HttpFixture {
    /// Starts the fixture with `extra` arguments (`--tls DIR`) and waits
    /// for its port.
    async fn start(extra: &[&str]) -> Self {
        let record_dir = tempfile::tempdir().unwrap();
        let record = record_dir.path().join("calls.jsonl");
        let port = mcp::free_port();
        let fixture = mcp::fixture_server();
        let port_text = port.to_string();
        let mut args = vec![
            fixture.to_str().unwrap(),
            "--record",
            record.to_str().unwrap(),
            "--http",
            &port_text,
        ];
        args.extend_from_slice(extra);
        let peer = start_peer(&mcp::python(), &args, &[]);
        mcp::wait_for_port(port).await;
        Self {
            _peer: peer,
            port,
            _record_dir: record_dir,
            record,
        }
    }

    /// Checks that the first call the fixture got carried the credential.
    fn expect_credential(&self) {
        let calls = recorded_calls(&self.record);
        assert_eq!(
            calls[0]["headers"]["authorization"],
            format!("Bearer {SECRET}"),
            "{calls:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_runs_over_streamable_http() {
    let port = mcp::free_port();
    let _peer = start_peer(
        Path::new("node"),
        &[mcp::everything().to_str().unwrap(), "streamableHttp"],
        &[("PORT", &port.to_string())],
    );
    mcp::wait_for_port(port).await;
    let setup = Setup::new(&format!(
        r#"
[[mcp.servers]]
name = "everything"
url = "http://127.0.0.1:{port}/mcp"
"#
    ));
    let harness = setup.start(&[]);
    let client = harness.client();
    let server = mcp_server(&client, "everything").await;
    assert_eq!(server["status"], "ready", "{server:#}");
    assert_eq!(server["transport"]["type"], "streamable_http");
    let task = run_one_call(&client, "everything__echo", json!({"message": "over http"})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    assert!(step["output"].to_string().contains("over http"), "{task:#}");
}

/// The credential for an HTTP server goes in its requests' headers and
/// nowhere else: not in the tool list, the task, the log, nor any plugin's
/// environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_servers_credential_reaches_it_and_nothing_else() {
    let fixture = HttpFixture::start(&[]).await;
    let port = fixture.port;
    // The variable the misbehaving plugin's manifest asks for: it must not
    // get it now that it holds an MCP credential.
    let setup = Setup::new(&format!(
        r#"
[[mcp.servers]]
name = "remote"
url = "http://127.0.0.1:{port}/mcp"

[[mcp.servers.credentials]]
header = "Authorization"
value = "Bearer ${{OPSPAWN_TEST_GRANTED}}"
"#
    ));
    let harness = setup.start(&[("OPSPAWN_TEST_GRANTED", SECRET)]);
    let client = harness.client();
    let task = run_one_call(&client, "remote__echo", json!({"text": "hi"})).await;
    assert_eq!(tool_steps(&task)[0]["status"], "succeeded", "{task:#}");
    fixture.expect_credential();

    let (_, list) = client.get("/v1/plugins").await.unwrap();
    let listed = list.to_string();
    assert!(!listed.contains(SECRET), "{list:#}");
    assert!(
        listed.contains("OPSPAWN_TEST_GRANTED"),
        "the variable's name is shown"
    );
    assert!(!task.to_string().contains(SECRET), "{task:#}");
    assert!(!harness.server.log().contains(SECRET));
    let misbehaving = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "misbehaving")
        .unwrap();
    assert_eq!(misbehaving["grants"]["env"], json!([]), "{misbehaving:#}");
    let read = run(
        &client,
        &misbehaving_task("env", json!({"name": "OPSPAWN_TEST_GRANTED"})),
    )
    .await;
    assert!(!read.to_string().contains(SECRET), "{read:#}");
}

/// An https server whose certificate a private CA signed is reached when
/// the operator trusts that CA with `ca_file`, with the credential sent
/// over TLS; the same server without it is refused, reported and skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_server_is_reached_with_its_ca_and_refused_without() {
    let tls = tempfile::tempdir().unwrap();
    let fixture = HttpFixture::start(&["--tls", tls.path().to_str().unwrap()]).await;
    let port = fixture.port;
    let ca = tls.path().join("ca.pem");
    assert!(ca.exists(), "the fixture wrote its CA before serving");
    let setup = Setup::new(&format!(
        r#"
[[mcp.servers]]
name = "secure"
url = "https://127.0.0.1:{port}/mcp"
ca_file = {ca:?}

[[mcp.servers.credentials]]
header = "Authorization"
value = "Bearer ${{OPSPAWN_TEST_GRANTED}}"

[[mcp.servers]]
name = "untrusted"
url = "https://127.0.0.1:{port}/mcp"
"#
    ));
    let harness = setup.start(&[("OPSPAWN_TEST_GRANTED", SECRET)]);
    let client = harness.client();
    let secure = wait_for_server(&client, "secure", |s| s["status"] == "ready").await;
    assert!(
        tool_names(&secure).contains(&"secure__echo".to_owned()),
        "{secure:#}"
    );
    let task = run_one_call(&client, "secure__echo", json!({"text": "over tls"})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    assert!(step["output"].to_string().contains("over tls"), "{task:#}");
    fixture.expect_credential();

    let untrusted = wait_for_server(&client, "untrusted", |s| s["error"].is_string()).await;
    assert_ne!(untrusted["status"], "ready", "{untrusted:#}");
    let error = untrusted["error"].as_str().unwrap();
    assert!(
        error.contains("TLS: invalid peer certificate: UnknownIssuer") && error.contains("ca_file"),
        "the error says what to fix: {untrusted:#}"
    );
    assert!(
        tool_names(&untrusted).is_empty(),
        "an untrusted server offers no tools: {untrusted:#}"
    );
}

/// A stdio server gets `PATH` and the variables the operator named, by
/// name, and nothing else of the host's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_gets_only_the_variables_named() {
    let cwd = tempfile::tempdir().unwrap();
    let setup = Setup::new(&format!(
        "{FIXTURE}cwd = {:?}\nenv = [\"OPSPAWN_TEST_MCP_GIVEN\"]\n",
        cwd.path().canonicalize().unwrap()
    ));
    let harness = setup.start(&[
        ("OPSPAWN_TEST_MCP_GIVEN", "given"),
        ("OPSPAWN_TEST_MCP_KEPT", SECRET),
    ]);
    let client = harness.client();
    let task = run_one_call(&client, "fixture__whoami", json!({})).await;
    let step = &tool_steps(&task)[0];
    assert_eq!(step["status"], "succeeded", "{task:#}");
    let env: Vec<&str> = step["output"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"OPSPAWN_TEST_MCP_GIVEN"), "{env:?}");
    assert!(env.contains(&"PATH"), "{env:?}");
    for kept in ["OPSPAWN_TEST_MCP_KEPT", "OPSPAWN_DATA_DIR", "HOME"] {
        assert!(!env.contains(&kept), "{kept} reached the server: {env:?}");
    }
    assert_eq!(
        step["output"]["cwd"],
        cwd.path().canonicalize().unwrap().to_str().unwrap()
    );
}

/// A task that uses an MCP tool, resumed after the host was killed, waits
/// for the server's first start instead of failing with `unknown_tool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_task_waits_for_its_mcp_server_to_start() {
    let setup = Setup::new(FIXTURE);
    let mut harness = setup.start(&[]);
    let client = harness.client();
    let mut body = one_call_task("fixture__echo", json!({"text": "after"}));
    body["options"]["llm"]["script"][0]["delay_ms"] = json!(3000);
    let id = client.submit(&body).await.unwrap();
    client
        .wait_for(&id, FINISH, |task| {
            task["steps"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await
        .unwrap();
    harness.server.restart().unwrap();
    let task = harness
        .client()
        .wait_until_finished(&id, FINISH)
        .await
        .unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(tool_steps(&task)[0]["output"], json!({"echoed": "after"}));
}
