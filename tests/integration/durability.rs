//! Durability: `kill -9` in the middle of a run, then a restart. Every task
//! is still there, and the running one resumes from its journal without
//! running a finished step again.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::{FINISH, Harness, signal, steps};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_task_without_repeating_finished_steps() {
    let mut harness = Harness::start();
    let client = harness.client();
    let counted = json!({"name": "count", "arguments": {"file": "/counts/log"}});
    let id = client
        .submit(&json!({
            "goal": "Count twice, slowly",
            "tools": ["count"],
            "options": {"llm": {"script": [
                {"tool_calls": [counted]},
                {"delay_ms": 3000, "tool_calls": [counted]},
                {"content": "Final Answer: counted"}
            ]}}
        }))
        .await
        .unwrap();
    let finished_before = client
        .submit(&crate::calculator_task("1+1", "2"))
        .await
        .unwrap();
    client
        .wait_until_finished(&finished_before, FINISH)
        .await
        .unwrap();

    // Kill the server while step 3 (the slow LLM reply) is in flight.
    client
        .wait_for(&id, FINISH, |t| {
            t["steps"]
                .as_array()
                .is_some_and(|s| s.len() == 3 && s[2]["status"] == "running")
        })
        .await
        .unwrap();
    harness.server.kill9();
    harness.server.restart().unwrap();
    let client = harness.server.client();

    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded", "task: {task:#}");
    assert_eq!(task["result"], "counted");
    assert_eq!(task["attempt"], 2, "claimed again after the restart");
    let steps = steps(&task);
    let attempts: Vec<i64> = steps
        .iter()
        .map(|s| s["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(
        attempts,
        [1, 1, 2, 2, 2],
        "steps 1-2 finished before the kill and were not run again; step 3 was in flight and re-ran"
    );

    // The counting tool wrote one line per execution: each ran once.
    let log = std::fs::read_to_string(harness.plugins.path().join("counts/log")).unwrap();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        let mut fields = line.split(' ');
        assert_eq!(fields.next(), Some(id.as_str()), "line: {line}");
        *runs.entry(fields.next().unwrap()).or_default() += 1;
    }
    assert_eq!(runs, HashMap::from([("2", 1), ("4", 1)]), "log:\n{log}");

    let earlier = client.task(&finished_before).await.unwrap();
    assert_eq!(
        earlier["status"], "succeeded",
        "finished tasks survive the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_under_the_same_key_and_permanent_ones_are_not() {
    let harness = Harness::start();
    let client = harness.client();
    // The count tool records each try, then sleeps past its 1 s limit.
    let slow = json!({"name": "count", "arguments": {"file": "/counts/retries", "sleep_ms": 5000}});
    let id = client
        .submit(&json!({
            "goal": "Count slowly",
            "tools": ["count"],
            "max_retries": 2,
            "options": {"llm": {"script": [
                {"tool_calls": [slow]},
                {"content": "Final Answer: gave up counting"}
            ]}}
        }))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["error"]["code"], "plugin_timeout", "{step:#}");
    let log = std::fs::read_to_string(harness.plugins.path().join("counts/retries")).unwrap();
    let tries: Vec<&str> = log.lines().collect();
    assert_eq!(tries.len(), 3, "one try and two retries: {log}");
    assert!(
        tries.iter().all(|line| line.ends_with(&format!("{id}:2"))),
        "every try carries the step's idempotency key: {log}"
    );

    // A calculator error is the input's fault: it is not retried.
    let bad = client
        .submit(&crate::calculator_task("1/0", "none"))
        .await
        .unwrap();
    let task = client.wait_until_finished(&bad, FINISH).await.unwrap();
    assert_eq!(steps(&task)[1]["error"]["code"], "division_by_zero");
    let server_log = harness.server.log();
    assert!(
        server_log.contains("retrying a step"),
        "the retries above were logged"
    );
    assert!(
        !server_log
            .lines()
            .any(|l| l.contains("retrying a step") && l.contains(&bad)),
        "a permanent error was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_pruned_after_their_retention() {
    let harness = Harness::start_with(&[
        ("OPSPAWN_RETENTION", "1s"),
        ("OPSPAWN_PRUNE_INTERVAL", "200ms"),
    ]);
    let client = harness.client();
    let id = client
        .submit(&crate::calculator_task("1+1", "2"))
        .await
        .unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, _) = client.get(&format!("/v1/tasks/{id}")).await.unwrap();
        if status == opspawn_testkit::StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task was not pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, list) = client.get("/v1/tasks").await.unwrap();
    assert!(list["tasks"].as_array().unwrap().is_empty(), "{list}");
    if std::env::var("OPSPAWN_TEST_DATABASE").as_deref() != Ok("postgres") {
        let url = format!(
            "sqlite://{}",
            harness.server.data_dir.join("opspawn.db").display()
        );
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let (payloads,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM payloads")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(payloads, 0, "the pruned task's payload went with it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_step_payloads_are_stored_out_of_line_and_read_back_whole() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client
        .submit(&crate::misbehaving_task(
            "big_output",
            json!({"bytes": 40_000}),
        ))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    let step = &steps(&task)[1];
    assert_eq!(step["status"], "succeeded", "{step:#}");
    assert_eq!(
        step["output"].as_str().map(str::len),
        Some(40_000),
        "read back whole"
    );

    let events = client.events(&id, None, FINISH).await.unwrap();
    let finished = events
        .iter()
        .find(|e| e.event == "step.finished" && e.data["data"]["seq"] == 2)
        .unwrap();
    assert_eq!(
        finished.data["data"]["output"]["out_of_line"], true,
        "events stay small"
    );

    if std::env::var("OPSPAWN_TEST_DATABASE").as_deref() != Ok("postgres") {
        let url = format!(
            "sqlite://{}",
            harness.server.data_dir.join("opspawn.db").display()
        );
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let (inline, reference): (String, Option<String>) =
            sqlx::query_as("SELECT output, output_ref FROM steps WHERE task_id = ? AND seq = 2")
                .bind(&id)
                .fetch_one(&mut db)
                .await
                .unwrap();
        assert_eq!(inline, "null", "the steps table keeps no copy");
        assert_eq!(
            reference.map(|r| r.len()),
            Some(64),
            "a SHA-256 names the payload"
        );
    }
}

/// A server whose stdout has gone (its terminal closed, or the process
/// reading it exited) still shuts down cleanly on SIGTERM: the lines it
/// prints on the way down are lost, not the wait for its running steps.
#[test]
fn sigterm_with_stdout_gone_shuts_down_cleanly() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let mut server = Command::new(crate::binary())
        .arg("serve")
        .env("OPSPAWN_ADDR", "127.0.0.1:0")
        .env("OPSPAWN_DATA_DIR", data.path())
        .env("OPSPAWN_PLUGIN_DIR", plugins.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("opspawn listening on ") {
        line.clear();
        let read = stdout.read_line(&mut line).unwrap();
        assert!(read > 0, "the server exited before it listened");
    }
    // Its signal handlers are installed before it says it listens.
    drop(stdout);

    let pid = server.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(signalled.unwrap().success());
    let give_up = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > give_up {
            let _ = server.kill();
            panic!("the server did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "it exited with {status}; its log:\n{log}");
    assert!(!log.contains("panicked"), "its log:\n{log}");
}

/// A request waiting for a task to finish (`Prefer: wait`) when the server
/// is told to stop is answered with the task as it is, at once, rather
/// than held until the shutdown's drain cuts its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_requests_waiting_for_a_task() {
    use std::time::Instant;

    let harness = Harness::start();
    let client = harness.client();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let later = json!({"goal": "later", "run_at": "2099-01-01T00:00:00Z"});
            let started = Instant::now();
            let answer = client
                .http()
                .post(client.url("/v1/tasks"))
                .header("prefer", "wait=30")
                .json(&later)
                .send()
                .await;
            (answer, started.elapsed())
        }
    });
    // The wait has begun once the task is in the list.
    let give_up = Instant::now() + FINISH;
    loop {
        let (_, page) = client.get("/v1/tasks?status=queued").await.unwrap();
        if page["tasks"].as_array().is_some_and(|t| !t.is_empty()) {
            break;
        }
        assert!(Instant::now() < give_up, "the task never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&harness.server, "-TERM");

    let (answer, waited) = waiting.await.unwrap();
    let answer = answer.expect("an answer, not a connection cut at the end of the drain");
    assert_eq!(answer.status(), reqwest::StatusCode::CREATED);
    let task: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(task["status"], "queued", "{task}");
    // The drain lasts 10 s; the wait would have run 30.
    assert!(waited < Duration::from_secs(8), "answered after {waited:?}");
}
