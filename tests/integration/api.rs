//! The REST API through a real server: tasks that run, listing, cancelling.
//! Bad requests and their codes are tested in process (`host/src/api/tests.rs`).

use std::time::Duration;

use opspawn_testkit::StatusCode;
use serde_json::{Value, json};

use crate::{FINISH, Harness, calculator_task, steps};

/// A call task makes its one tool call, with no planner or LLM, in one
/// step, and ends with that call's outcome: the output as its result, or
/// the tool's error as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_task_makes_one_call_and_ends_with_its_outcome() {
    let harness = Harness::start();
    let client = harness.client();
    let call = |expression: &str| {
        json!({
            "goal": format!("Evaluate {expression}"),
            "call": {"tool": "calculator", "arguments": {"expression": expression}},
        })
    };
    let id = client.submit(&call("6*7")).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let made = steps(&task);
    assert_eq!(made.len(), 1, "{task:#}");
    assert_eq!(made[0]["kind"], "tool");
    assert_eq!(made[0]["plugin"], "calculator");
    assert_eq!(made[0]["output"]["result"], 42, "{task:#}");
    let result: Value = serde_json::from_str(task["result"].as_str().unwrap()).unwrap();
    assert_eq!(
        result, made[0]["output"],
        "the result is the output, as JSON"
    );
    assert_eq!(task["usage"]["input_tokens"], 0, "no LLM was called");

    let id = client.submit(&call("1/0")).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(steps(&task).len(), 1, "{task:#}");
    assert_eq!(task["error"], steps(&task)[0]["error"], "{task:#}");
    assert!(
        task["error"]["message"]
            .as_str()
            .unwrap()
            .contains("division"),
        "{task:#}"
    );

    let bad_input = json!({
        "goal": "Evaluate nothing",
        "call": {"tool": "calculator", "arguments": {"expr": "1"}},
    });
    let id = client.submit(&bad_input).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["error"]["code"], "invalid_tool_input", "{task:#}");

    // The same from the command line.
    let output = std::process::Command::new(crate::binary())
        .args(["run", "Evaluate 2^10", "--call", "calculator"])
        .args(["--arguments", r#"{"expression": "2^10"}"#, "--detach"])
        .args(["--server", &harness.server.base_url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["call"]["tool"], "calculator", "{task:#}");
    assert_eq!(steps(&task)[0]["output"]["result"], 1024, "{task:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_using_task_reaches_the_right_answer() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&calculator_task("(2 + 3) * 4 - 2^3", "12"))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();

    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert_eq!(task["result"], "12");
    let steps = steps(&task);
    let kinds: Vec<&str> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["llm", "tool", "llm"], "steps: {steps:#?}");
    let tool = &steps[1];
    assert_eq!(tool["plugin"], "calculator");
    assert_eq!(tool["input"]["name"], "calculator");
    assert_eq!(
        tool["output"]["result"], 12,
        "the calculator computed the expression"
    );
    for step in steps {
        assert_eq!(step["status"], "succeeded");
        assert!(step["started_at"].is_string() && step["finished_at"].is_string());
    }
    assert!(
        task["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "usage is summed per task"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_react_planner_follows_plain_text_actions() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&json!({
            "goal": "What is two to the tenth?",
            "tools": ["calculator"],
            "options": {"llm": {"script": [
                {"content": "Thought: I should compute it.\nAction: calculator\nAction Input: {\"expression\": \"2^10\"}"},
                {"content": "Thought: done.\nFinal Answer: 1024"}
            ]}}
        }))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert_eq!(task["result"], "1024");
    assert_eq!(steps(&task)[1]["output"]["result"], 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripted_demo_answers_arithmetic_without_a_script() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&json!({"goal": "What is (2+3)*4?"}))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert_eq!(task["result"], "20");
    assert_eq!(task["planner"], "react", "the configured default planner");
    assert_eq!(task["llm"], "scripted", "the configured default adapter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calculator_error_reaches_the_planner_as_an_observation() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&calculator_task("1 / (2 - 2)", "undefined"))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(
        task["status"], "succeeded",
        "the planner carried on: {task:#}"
    );
    let tool = &steps(&task)[1];
    assert_eq!(tool["status"], "failed");
    assert_eq!(tool["error"]["code"], "division_by_zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_limit_stops_a_task() {
    let harness = Harness::start();
    let client = harness.client();
    let mut task = calculator_task("1+1", "2");
    task["max_steps"] = json!(2);
    let id = client.submit(&task).await.unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "failed");
    assert_eq!(
        task["error"]["code"], "step_limit_exceeded",
        "task: {task:#}"
    );
    assert_eq!(steps(&task).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_list_newest_first_with_a_cursor_and_a_status_filter() {
    let harness = Harness::start();
    let client = harness.client();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            client
                .submit(&calculator_task(&format!("{n}+1"), "x"))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        client.wait_until_finished(id, FINISH).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut path = "/v1/tasks?limit=2".to_owned();
    loop {
        let (status, page) = client.get(&path).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let tasks = page["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 2);
        seen.extend(tasks.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/tasks?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let (_, succeeded) = client.get("/v1/tasks?status=succeeded").await.unwrap();
    assert_eq!(succeeded["tasks"].as_array().unwrap().len(), 5);
    let (_, failed) = client.get("/v1/tasks?status=failed").await.unwrap();
    assert_eq!(failed["tasks"].as_array().unwrap().len(), 0);
}

async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) {
    let actual = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    assert_eq!(actual, status, "body: {body}");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "every error explains itself: {body}"
    );
}

/// Request validation and error codes are tested in process
/// (`host/src/api/tests.rs`); this is what needs a real server: a refused
/// oversized body on a real connection leaves the server working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_and_the_server_carries_on() {
    let harness = Harness::start();
    let client = harness.client();
    let tasks = client.url("/v1/tasks");

    // Last, and on its own connection: the server may close it after refusing.
    let oversize = format!(r#"{{"goal": "{}"}}"#, "x".repeat(2 << 20));
    let response = opspawn_testkit::http_client_builder()
        .build()
        .unwrap()
        .post(&tasks)
        .header("content-type", "application/json")
        .body(oversize)
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    // Nothing bad input did left a task behind, and the server still works.
    let (_, list) = client.get("/v1/tasks").await.unwrap();
    assert_eq!(
        list["tasks"].as_array().unwrap().len(),
        0,
        "no task was created: {list}"
    );
    let (status, health) = client.get("/healthz").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_task_at_the_next_step_boundary() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&json!({
            "goal": "Sleep a lot",
            "tools": ["sleep"],
            "options": {"llm": {"script": [
                {"tool_calls": [{"name": "sleep", "arguments": {"ms": 600}}]},
                {"tool_calls": [{"name": "sleep", "arguments": {"ms": 600}}]},
                {"tool_calls": [{"name": "sleep", "arguments": {"ms": 600}}]},
                {"content": "Final Answer: rested"}
            ]}}
        }))
        .await
        .unwrap();
    client
        .wait_for(&id, FINISH, |t| {
            t["steps"].as_array().is_some_and(|s| s.len() >= 2)
        })
        .await
        .unwrap();
    let (status, body) = client
        .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "body: {body}");
    assert_eq!(body["cancel_requested"], true);

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "cancelled", "task: {task:#}");
    let steps = steps(&task);
    assert!(steps.len() < 7, "it stopped early: {steps:#?}");
    assert!(
        steps.iter().all(|s| s["status"] != "running"),
        "the step in progress finished before the task stopped: {steps:#?}"
    );

    let (status, body) = client
        .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "task_already_finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_queued_task_takes_effect_at_once() {
    let harness = Harness::start_with(&[("OPSPAWN_MAX_RUNNING_TASKS", "1")]);
    let client = harness.client();
    let busy = client
        .submit(&crate::misbehaving_task("sleep", json!({"ms": 800})))
        .await
        .unwrap();
    let queued = client.submit(&calculator_task("1+1", "2")).await.unwrap();
    let (status, body) = client
        .post(&format!("/v1/tasks/{queued}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "body: {body}");
    assert_eq!(body["status"], "cancelled");
    client.wait_until_finished(&busy, FINISH).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task = client.task(&queued).await.unwrap();
    assert_eq!(task["status"], "cancelled");
    assert!(
        steps(&task).is_empty(),
        "a cancelled queued task never runs: {task:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_input_is_checked_against_its_schema_before_the_call() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&json!({
            "goal": "Misuse the calculator",
            "tools": ["calculator"],
            "max_retries": 0,
            "options": {"llm": {"script": [
                {"tool_calls": [{"name": "calculator", "arguments": {"expr": "1+1"}}]},
                {"content": "Final Answer: oops"}
            ]}}
        }))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["error"]["code"], "invalid_tool_input", "{step:#}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("expression"),
        "the message says what is missing: {message}"
    );
}
