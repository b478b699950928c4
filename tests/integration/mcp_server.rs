//! Opspawn as an MCP server, driven by the official Python SDK's client
//! (`tests/fixtures/mcp/client.py`): `/mcp` over streamable HTTP, and
//! `opspawn mcp` over stdio for a running server.

use std::process::Command;

use opspawn::api::auth::token_hash;
use opspawn_testkit::mcp;
use serde_json::{Value, json};

use crate::{FINISH, Harness, binary, calculator_task};

/// Runs the Python client with `connection` arguments and `actions`; its
/// JSON answer.
fn python_client(connection: &[&str], actions: &Value) -> Value {
    let output = Command::new(mcp::python())
        .arg(mcp::client_script())
        .args(connection)
        .arg(actions.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!(
            "the client printed no JSON: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn results_of(answer: &Value) -> &Vec<Value> {
    answer["results"]
        .as_array()
        .unwrap_or_else(|| panic!("the client failed: {answer:#}"))
}

fn tool_names(listed: &Value) -> Vec<&str> {
    listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| tool["name"].as_str().unwrap())
        .collect()
}

/// A `run_task` argument: the README's calculator task.
fn run_task(expression: &str, answer: &str) -> Value {
    json!({"call": "run_task", "arguments": calculator_task(expression, answer)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_lists_tools_calls_them_and_runs_tasks_over_http() {
    let harness = Harness::start();
    let url = format!("{}/mcp", harness.client().base_url);
    let answer = python_client(
        &["--url", &url],
        &json!([
            {"list_tools": true},
            {"call": "calculator", "arguments": {"expression": "(2+3)*4"}},
            {"call": "calculator", "arguments": {"expression": "1/0"}},
            run_task("6*7", "42"),
            {"list_resources": true},
        ]),
    );
    let results = results_of(&answer);
    let names = tool_names(&results[0]);
    for name in ["calculator", "run_task", "get_task", "cancel_task"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let calculator = results[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|tool| tool["name"] == "calculator")
        .unwrap();
    assert_eq!(calculator["inputSchema"]["required"], json!(["expression"]));

    // A tool call runs as a task of its own: journaled, in the task list.
    assert_eq!(results[1]["is_error"], false, "{answer:#}");
    assert_eq!(results[1]["structured"]["result"], 20, "{answer:#}");
    assert_eq!(results[2]["is_error"], true, "{answer:#}");
    assert!(
        results[2]["text"].as_str().unwrap().contains("division"),
        "{answer:#}"
    );

    let ran = &results[3];
    assert_eq!(ran["is_error"], false, "{answer:#}");
    assert_eq!(ran["text"], "42", "{answer:#}");
    assert_eq!(ran["structured"]["status"], "succeeded", "{answer:#}");
    assert_eq!(
        ran["progress"].as_array().unwrap().len(),
        3,
        "a progress notification per step: {answer:#}"
    );
    let task_id = ran["structured"]["task_id"].as_str().unwrap();
    let uris: Vec<&str> = results[4]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    assert!(
        uris.contains(&format!("opspawn://tasks/{task_id}").as_str()),
        "{uris:?}"
    );
    assert_eq!(uris.len(), 3, "two tool calls and one task: {uris:?}");

    let (_, page) = harness.client().get("/v1/tasks").await.unwrap();
    let goals: Vec<&str> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["goal"].as_str().unwrap())
        .collect();
    assert!(
        goals.contains(&"Call the tool calculator (for an MCP client)"),
        "{goals:?}"
    );

    let answer = python_client(
        &["--url", &url],
        &json!([
            {"read": format!("opspawn://tasks/{task_id}")},
            {"call": "get_task", "arguments": {"id": task_id}},
        ]),
    );
    let results = results_of(&answer);
    let text = results[0]["contents"][0]["text"].as_str().unwrap();
    let task: Value = serde_json::from_str(text).unwrap();
    assert_eq!(task["result"], "42", "{task:#}");
    assert_eq!(results[1]["structured"]["status"], "succeeded");
}

/// A client that declares MCP Tasks gets `run_task` as a task handle at
/// once, follows it with `tasks/get` (from a later session too, the task
/// being Opspawn's own durable one), and cancels one with `tasks/cancel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_tasks_client_starts_a_task_follows_it_and_cancels_one() {
    let harness = Harness::start();
    let url = format!("{}/mcp", harness.client().base_url);
    let started = python_client(
        &["--url", &url, "--tasks"],
        &json!([
            {"start": "run_task", "arguments": calculator_task("6*7", "42")},
            {"await_task": "$task", "timeout": 60},
            {"task_update": "$task"},
        ]),
    );
    let results = results_of(&started);
    let handle = &results[0]["task"];
    assert_eq!(handle["resultType"], "task", "{started:#}");
    assert!(
        ["working", "completed"].contains(&handle["status"].as_str().unwrap()),
        "{started:#}"
    );
    assert_eq!(handle["pollIntervalMs"], 500, "{started:#}");
    let task_id = handle["taskId"].as_str().unwrap();
    let (status, task) = harness
        .client()
        .get(&format!("/v1/tasks/{task_id}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "the MCP task is the Opspawn task: {task:#}");

    let followed = &results[1];
    assert_eq!(
        followed["statuses"].as_array().unwrap().last().unwrap(),
        "completed"
    );
    let last = &followed["last"];
    assert_eq!(last["taskId"], task_id, "{started:#}");
    assert_eq!(last["result"]["content"][0]["text"], "42", "{started:#}");
    assert_eq!(last["result"]["structuredContent"]["status"], "succeeded");
    assert_eq!(
        results[2]["error"]["code"], -32602,
        "no task asks for input: {started:#}"
    );

    // A later session fetches the result, and cancels a task not yet run.
    let later = python_client(
        &["--url", &url, "--tasks"],
        &json!([
            {"task_get": task_id},
            {"start": "run_task", "arguments": {
                "goal": "Wait an hour", "run_at": "2999-01-01T00:00:00Z"
            }},
            {"task_cancel": "$task"},
            {"task_get": "$task"},
            {"task_get": "no-such-task"},
        ]),
    );
    let results = results_of(&later);
    assert_eq!(results[0]["status"], "completed", "{later:#}");
    assert_eq!(results[0]["result"]["content"][0]["text"], "42");
    assert_eq!(results[1]["task"]["status"], "working", "{later:#}");
    assert_eq!(results[1]["task"]["statusMessage"], "queued", "{later:#}");
    assert!(results[2].get("error").is_none(), "{later:#}");
    assert_eq!(results[3]["status"], "cancelled", "{later:#}");
    assert_eq!(results[4]["error"]["code"], -32602, "{later:#}");
    assert!(
        results[4]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not_found"),
        "{later:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_an_mcp_client_needs_one_and_sees_only_its_tenants_tasks() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[[auth.tokens]]\ntenant = \"acme\"\nsha256 = \"{}\"\n\n\
             [[auth.tokens]]\ntenant = \"globex\"\nsha256 = \"{}\"\n",
            token_hash("acme-token"),
            token_hash("globex-token")
        ),
    )
    .unwrap();
    let harness = Harness::start_with(&[("OPSPAWN_CONFIG", config.path().to_str().unwrap())]);
    let url = format!("{}/mcp", harness.client().base_url);

    let refused = python_client(&["--url", &url], &json!([{"list_tools": true}]));
    assert!(refused["error"].is_string(), "{refused:#}");
    let response = harness
        .client()
        .http()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let acme = python_client(
        &["--url", &url, "--token", "acme-token"],
        &json!([run_task("2+2", "4")]),
    );
    let ran = &results_of(&acme)[0];
    assert_eq!(ran["text"], "4", "{acme:#}");
    let task_id = ran["structured"]["task_id"].as_str().unwrap();

    let globex = python_client(
        &["--url", &url, "--token", "globex-token"],
        &json!([
            {"call": "get_task", "arguments": {"id": task_id}},
            {"call": "cancel_task", "arguments": {"id": task_id}},
            {"list_resources": true},
        ]),
    );
    let results = results_of(&globex);
    for result in &results[..2] {
        assert_eq!(result["is_error"], true, "{globex:#}");
        assert!(
            result["text"].as_str().unwrap().contains("forbidden"),
            "{globex:#}"
        );
    }
    assert_eq!(results[2]["resources"], json!([]), "{globex:#}");

    let globex_tasks = python_client(
        &["--url", &url, "--token", "globex-token", "--tasks"],
        &json!([{"task_get": task_id}, {"task_cancel": task_id}]),
    );
    for result in results_of(&globex_tasks) {
        assert_eq!(result["error"]["code"], -32602, "{globex_tasks:#}");
        assert!(
            result["error"]["message"]
                .as_str()
                .unwrap()
                .contains("forbidden"),
            "{globex_tasks:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opspawn_mcp_serves_a_running_server_over_stdio() {
    let harness = Harness::start();
    let base = harness.client().base_url.clone();
    let answer = python_client(
        &[
            "--stdio",
            binary().to_str().unwrap(),
            "mcp",
            "--server",
            &base,
        ],
        &json!([
            {"list_tools": true},
            {"call": "calculator", "arguments": {"expression": "2^10"}},
            run_task("(1+2)*3", "9"),
        ]),
    );
    let results = results_of(&answer);
    assert!(
        tool_names(&results[0]).contains(&"calculator"),
        "{answer:#}"
    );
    assert_eq!(results[1]["structured"]["result"], 1024, "{answer:#}");
    assert_eq!(results[2]["text"], "9", "{answer:#}");
}

/// Malformed JSON-RPC, unknown methods, oversized messages and a client
/// that goes away mid-call get protocol errors or are cleaned up, and the
/// host carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mcp_input_is_refused_and_the_host_carries_on() {
    let harness = Harness::start();
    let client = harness.client();
    let url = client.url("/mcp");
    let post = |body: String| {
        client
            .http()
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body)
            .send()
    };
    let malformed = post("{not json".into()).await.unwrap();
    assert!(
        malformed.status().is_client_error(),
        "{}",
        malformed.status()
    );
    let oversized = post(format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"x":"{}"}}}}"#,
        "x".repeat(2 << 20)
    ))
    .await
    .unwrap();
    assert_eq!(oversized.status(), 413);

    // An unknown method, in a session: a JSON-RPC error, not a crash.
    let answer = python_client(
        &["--url", &url],
        &json!([{"call": "no_such_tool", "arguments": {}}]),
    );
    let result = &results_of(&answer)[0];
    assert_eq!(result["is_error"], true, "{answer:#}");

    // A client that vanishes while its task runs: the task is durable, as
    // one submitted over REST: it runs to its end (or `cancel_task`), and
    // the server serves on meanwhile.
    // The LLM answers after 5 s; the run stops at the next step boundary.
    let script = json!([{"delay_ms": 5000, "content": "Final Answer: late"}]);
    let mut vanishing = Command::new(mcp::python())
        .arg(mcp::client_script())
        .args(["--url", &url])
        .arg(
            json!([{"call": "run_task", "arguments": {
                "goal": "wait",
                "tools": [],
                "options": {"llm": {"script": script}},
            }}])
            .to_string(),
        )
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + FINISH;
    let task_id = loop {
        let (_, page) = client.get("/v1/tasks?status=running").await.unwrap();
        if let Some(id) = page["tasks"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the task never ran");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = vanishing.kill();
    let _ = vanishing.wait();
    let task = client.wait_until_finished(&task_id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let (status, _) = client.get("/healthz").await.unwrap();
    assert_eq!(status, 200);
    let task = client.submit(&calculator_task("1+1", "2")).await.unwrap();
    let task = client.wait_until_finished(&task, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
}
