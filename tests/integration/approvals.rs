//! Human approval end to end: `[approvals]` rules in the server's
//! configuration mark tool calls; a task whose planner asks for one waits
//! in `waiting_approval`, holding no worker, until each call is answered
//! through `POST /v1/tasks/{id}/approvals/{call}` (or times out). Runs on
//! SQLite and, with `OPSPAWN_TEST_DATABASE=postgres`, on Postgres.

use std::collections::HashMap;
use std::time::Duration;

use opspawn_testkit::{Client, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness, steps};

/// A server whose configuration file holds `approvals` (TOML).
fn start(approvals: &str) -> (Harness, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), approvals).unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[("OPSPAWN_CONFIG", &path)]);
    (harness, config)
}

const CALCULATOR_NEEDS_APPROVAL: &str = r#"
[[approvals.rules]]
tool = "calculator"
"#;

async fn wait_until_waiting(client: &Client, id: &str) -> Value {
    client
        .wait_for(id, FINISH, |t| t["status"] == "waiting_approval")
        .await
        .unwrap()
}

async fn approvals(client: &Client, id: &str) -> Vec<Value> {
    let (status, body) = client
        .get(&format!("/v1/tasks/{id}/approvals"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body["approvals"].as_array().unwrap().clone()
}

async fn answer(client: &Client, id: &str, call: &str, body: Value) -> (StatusCode, Value) {
    client
        .post(&format!("/v1/tasks/{id}/approvals/{call}"), &body)
        .await
        .unwrap()
}

/// Two calls pending in one step, answered out of order: each is answered
/// once (a second answer is `409`), the task runs only once both are, the
/// approved one runs with the approver's input, and the rejected one
/// reaches the planner as an error observation while the task goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_calls_answered_out_of_order_run_once_each_as_answered() {
    let (harness, _config) = start(CALCULATOR_NEEDS_APPROVAL);
    let client = harness.client();
    let id = client
        .submit(&json!({
            "goal": "Add up, with approval",
            "tools": ["calculator"],
            // Shorter than the wait below: the wait must not count.
            "timeout_secs": 4,
            "options": {"llm": {"script": [
                {"tool_calls": [
                    {"id": "first", "name": "calculator", "arguments": {"expression": "1+1"}},
                    {"id": "second", "name": "calculator", "arguments": {"expression": "2+2"}}
                ]},
                {"content": "Final Answer: done"}
            ]}}
        }))
        .await
        .unwrap();
    let task = wait_until_waiting(&client, &id).await;
    assert_eq!(
        steps(&task).len(),
        1,
        "no call of the step ran before its answers: {task:#}"
    );
    assert_eq!(steps(&task)[0]["status"], "succeeded", "{task:#}");
    let (_, listed) = client
        .get("/v1/tasks?status=waiting_approval")
        .await
        .unwrap();
    assert!(
        listed["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "the list filters by waiting_approval: {listed}"
    );
    let pending = approvals(&client, &id).await;
    let calls: Vec<(&str, &str, i64)> = pending
        .iter()
        .map(|a| {
            (
                a["call_id"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
                a["step"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [("first", "pending", 2), ("second", "pending", 3)],
        "{pending:#?}"
    );

    // The second call first, approved with other arguments.
    let (status, decided) = answer(
        &client,
        &id,
        "second",
        json!({"decision": "approve", "input": {"expression": "10*10"}, "comment": "bigger"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["decided_by"], "anonymous");
    let (status, again) = answer(&client, &id, "second", json!({"decision": "reject"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], "approval_already_decided");
    // Still waiting: the first call is not answered yet. (The wait outlasts
    // the task's time limit, which counts only the time it runs.)
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let task = client.task(&id).await.unwrap();
    assert_eq!(task["status"], "waiting_approval", "{task:#}");
    assert_eq!(steps(&task).len(), 1, "{task:#}");

    let (status, body) = answer(&client, &id, "nope", json!({"decision": "approve"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "approval_not_found");
    let (status, body) = answer(
        &client,
        &id,
        "first",
        json!({"decision": "reject", "input": {"expression": "3+3"}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");

    let (status, decided) = answer(
        &client,
        &id,
        "first",
        json!({"decision": "reject", "comment": "not this one"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(decided["status"], "rejected");
    let (status, again) = answer(&client, &id, "first", json!({"decision": "approve"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(task["result"], "done");
    let journal = steps(&task);
    let kinds: Vec<&str> = journal
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["llm", "tool", "tool", "llm"], "{task:#}");
    let rejected = &journal[1];
    assert_eq!(rejected["status"], "failed", "{rejected:#}");
    assert_eq!(rejected["error"]["code"], "approval_rejected");
    assert!(
        rejected["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rejected by anonymous")
            && rejected["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not this one"),
        "{rejected:#}"
    );
    let approved = &journal[2];
    assert_eq!(approved["status"], "succeeded", "{approved:#}");
    assert_eq!(
        approved["input"]["arguments"],
        json!({"expression": "10*10"}),
        "the journal holds the call as approved: {approved:#}"
    );
    assert!(
        approved["output"].to_string().contains("100"),
        "the tool received the edited input: {approved:#}"
    );
    // The planner saw the rejection as the call's error: the next LLM
    // request carries it.
    let next_request = journal[3]["input"].to_string();
    assert!(
        next_request.contains("approval_rejected") && next_request.contains("not this one"),
        "{next_request}"
    );

    // The audit trail: who decided what, and when, in the task's events.
    let events = client.events(&id, None, FINISH).await.unwrap();
    let waiting: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "task.waiting_approval")
        .map(|e| &e.data)
        .collect();
    assert_eq!(waiting.len(), 1, "{events:#?}");
    let named: Vec<&str> = waiting[0]["data"]["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(named, ["first", "second"], "{:#}", waiting[0]);
    let decided: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e.event == "approval.decided")
        .map(|e| {
            let d = &e.data["data"];
            assert!(d["decided_at"].is_string(), "{d}");
            (
                d["call_id"].as_str().unwrap().to_owned(),
                d["decision"].as_str().unwrap().to_owned(),
                d["decided_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("second".into(), "approved".into(), "anonymous".into()),
            ("first".into(), "rejected".into(), "anonymous".into()),
        ]
    );
}

/// A task waiting for approval survives a `kill -9` and a restart: it is
/// still waiting, and once approved it runs each call exactly once. A call
/// the rules' argument pattern does not match needs no approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_approval_survives_a_restart() {
    let (mut harness, _config) = start(
        r#"
[[approvals.rules]]
tool = "count"
when = { "/file" = "/counts/guarded*" }
"#,
    );
    let client = harness.client();
    let id = client
        .submit(&json!({
            "goal": "Count, with approval",
            "tools": ["count"],
            "options": {"llm": {"script": [
                {"tool_calls": [
                    {"id": "free", "name": "count", "arguments": {"file": "/counts/free"}},
                    {"id": "guarded", "name": "count", "arguments": {"file": "/counts/guarded"}}
                ]},
                {"content": "Final Answer: counted"}
            ]}}
        }))
        .await
        .unwrap();
    wait_until_waiting(&client, &id).await;
    let pending = approvals(&client, &id).await;
    assert_eq!(pending.len(), 1, "only the guarded call: {pending:#?}");
    assert_eq!(pending[0]["call_id"], "guarded");

    harness.server.kill9();
    harness.server.restart().unwrap();
    let client = harness.server.client();
    // Give the restarted host time to claim anything it would claim.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let task = client.task(&id).await.unwrap();
    assert_eq!(task["status"], "waiting_approval", "{task:#}");
    assert_eq!(task["attempt"], 1, "nobody claimed it: {task:#}");
    let pending = approvals(&client, &id).await;
    assert_eq!(pending[0]["status"], "pending", "{pending:#?}");

    let (status, body) = answer(&client, &id, "guarded", json!({"decision": "approve"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(task["attempt"], 2, "claimed again once answered: {task:#}");
    let kinds: Vec<&str> = steps(&task)
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["succeeded"; 4], "{task:#}");

    // The counting tool writes a line per execution: each call ran once.
    let mut runs: HashMap<&str, usize> = HashMap::new();
    let logs: Vec<(String, String)> = ["free", "guarded"]
        .iter()
        .map(|name| {
            let path = harness.plugins.path().join("counts").join(name);
            (name.to_string(), std::fs::read_to_string(path).unwrap())
        })
        .collect();
    for (name, log) in &logs {
        for line in log.lines() {
            assert!(line.starts_with(&id), "{name}: {line}");
            *runs.entry(name.as_str()).or_default() += 1;
        }
    }
    assert_eq!(
        runs,
        HashMap::from([("free", 1), ("guarded", 1)]),
        "{logs:?}"
    );
}

/// A call nobody answers is rejected when its time runs out, and the task
/// goes on with that rejection as the call's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_call_is_rejected_at_the_timeout() {
    let (harness, _config) = start(&format!(
        "[approvals]\ntimeout = \"2s\"\ncheck_interval = \"100ms\"\n{CALCULATOR_NEEDS_APPROVAL}"
    ));
    let client = harness.client();
    let id = client
        .submit(&crate::calculator_task("6*7", "unknown"))
        .await
        .unwrap();
    wait_until_waiting(&client, &id).await;
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let tool = &steps(&task)[1];
    assert_eq!(tool["error"]["code"], "approval_rejected", "{tool:#}");
    assert!(
        tool["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in time"),
        "{tool:#}"
    );
    let answered = approvals(&client, &id).await;
    assert_eq!(answered[0]["status"], "rejected", "{answered:#?}");
    assert_eq!(answered[0]["decided_by"], "timeout");
    let (status, body) = answer(
        &client,
        &id,
        answered[0]["call_id"].as_str().unwrap(),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "too late: {body}");
}

/// A waiting task holds no claim, so cancelling it ends it at once; its
/// calls can no longer be answered. With API tokens, the token's name is
/// who decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_cancels_at_once_and_deciders_are_named_by_token() {
    let token = "ops_approver_token";
    let config = format!(
        "{CALCULATOR_NEEDS_APPROVAL}\n[[auth.tokens]]\ntenant = \"acme\"\nsha256 = \"{}\"\nname = \"alice\"\n",
        opspawn::api::auth::token_hash(token)
    );
    let (harness, _config) = start(&config);
    let base = harness.client().base_url.clone();
    let http = opspawn_testkit::http_client_builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let post = |path: String, body: Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let wait_status = |id: String, wanted: &'static str| async move {
        let deadline = std::time::Instant::now() + FINISH;
        loop {
            let task = get(format!("/v1/tasks/{id}")).await;
            if task["status"] == wanted {
                return task;
            }
            assert!(std::time::Instant::now() < deadline, "{task:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let submit = |expression: &'static str| async move {
        let (status, task) = post(
            "/v1/tasks".into(),
            crate::calculator_task(expression, "whatever"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        task["id"].as_str().unwrap().to_owned()
    };
    let approved = submit("1+2").await;
    wait_status(approved.clone(), "waiting_approval").await;
    let listed = get(format!("/v1/tasks/{approved}/approvals")).await;
    let call = listed["approvals"][0]["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, decided) = post(
        format!("/v1/tasks/{approved}/approvals/{call}"),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(decided["decided_by"], "alice");
    let task = wait_status(approved, "succeeded").await;
    assert!(
        steps(&task)[1]["output"].to_string().contains('3'),
        "{task:#}"
    );

    let cancelled = submit("2+2").await;
    wait_status(cancelled.clone(), "waiting_approval").await;
    let (status, task) = post(format!("/v1/tasks/{cancelled}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "cancelled at once: {task}");
    assert_eq!(task["status"], "cancelled");
    let listed = get(format!("/v1/tasks/{cancelled}/approvals")).await;
    let first = &listed["approvals"][0];
    assert_eq!(first["status"], "rejected", "{listed}");
    assert_eq!(first["decided_by"], "cancel");
    let (status, body) = post(
        format!(
            "/v1/tasks/{cancelled}/approvals/{}",
            first["call_id"].as_str().unwrap()
        ),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let task = get(format!("/v1/tasks/{cancelled}")).await;
    assert_eq!(task["status"], "cancelled", "{task:#}");
    assert_eq!(steps(&task).len(), 1, "the call never ran: {task:#}");
}

/// The calculator's manifest with a rule of its own: expressions that
/// mention 666 wait for approval.
const CALCULATOR_ASKING_APPROVAL: &str = r#"
[limits]
memory_mib = 16
call_timeout_ms = 2000

[[approvals]]
tool = "calculator"
when = { "/expression" = "*666*" }
"#;

/// A plugin's manifest asks for approval of its own calls, with no operator
/// rule: the matching call waits, the other of the same step runs once it
/// is answered, the rule shows in `GET /v1/plugins`, and a rule naming a
/// tool the plugin does not offer fails its load instead of never asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_manifest_asks_approval_for_its_own_calls() {
    let harness = crate::Harness::start_with_plugins(&[], |plugins| {
        plugins.add("calculator", "calculator", Some(CALCULATOR_ASKING_APPROVAL));
        plugins.add(
            "typo",
            "calculator",
            Some("[[approvals]]\ntool = \"calculatr\"\n"),
        );
    });
    let client = harness.client();
    let (status, listed) = client.get("/v1/plugins").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{listed}");
    let calculator = listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "calculator")
        .unwrap_or_else(|| panic!("the calculator is loaded: {listed:#}"));
    assert_eq!(
        calculator["approvals"],
        json!([{"tool": "calculator", "when": {"/expression": "*666*"}}]),
        "{calculator:#}"
    );
    let typo = listed["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"].as_str().unwrap().ends_with("typo.wasm"))
        .unwrap_or_else(|| panic!("the misnamed rule fails the load: {listed:#}"));
    assert!(
        typo["error"].as_str().unwrap().contains("\"calculatr\""),
        "{typo:#}"
    );

    let id = client
        .submit(&json!({
            "goal": "Two sums, one of them with approval",
            "tools": ["calculator"],
            "options": {"llm": {"script": [
                {"tool_calls": [
                    {"id": "plain", "name": "calculator", "arguments": {"expression": "2+2"}},
                    {"id": "marked", "name": "calculator", "arguments": {"expression": "666+1"}}
                ]},
                {"content": "Final Answer: done"}
            ]}}
        }))
        .await
        .unwrap();
    wait_until_waiting(&client, &id).await;
    let pending = approvals(&client, &id).await;
    let calls: Vec<&str> = pending
        .iter()
        .map(|a| a["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        calls,
        ["marked"],
        "only the matching call waits: {pending:#?}"
    );
    let (status, decided) = answer(&client, &id, "marked", json!({"decision": "approve"})).await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let outputs: Vec<String> = steps(&task)
        .iter()
        .filter(|s| s["kind"] == "tool")
        .map(|s| s["output"].to_string())
        .collect();
    assert!(
        outputs.len() == 2 && outputs[0].contains('4') && outputs[1].contains("667"),
        "both calls ran, in order: {outputs:?}"
    );
}
