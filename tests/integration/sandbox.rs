//! Deny by default: a plugin reads only the folders, and sees only the
//! environment, that its manifest was granted; hostile calls fail their own
//! step while other tasks finish and the server keeps answering.

use std::time::{Duration, Instant};

use opspawn_testkit::StatusCode;
use serde_json::{Value, json};

use crate::{FINISH, Harness, SECRET, misbehaving_task, steps};

/// Runs one tool call of the misbehaving fixture; returns its step.
async fn tool_step(harness: &Harness, tool: &str, arguments: Value) -> Value {
    let client = harness.client();
    let id = client
        .submit(&misbehaving_task(tool, arguments))
        .await
        .unwrap();
    let task = client.wait_until_finished(&id, FINISH).await.unwrap();
    assert!(
        !task.to_string().contains(SECRET),
        "the secret leaked into the task: {task:#}"
    );
    steps(&task)[1].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_outside_the_granted_folders_cannot_be_read_or_written() {
    let harness = Harness::start();

    let granted = tool_step(
        &harness,
        "read_file",
        json!({"path": "/readonly/visible.txt"}),
    )
    .await;
    assert_eq!(granted["status"], "succeeded", "step: {granted:#}");
    assert_eq!(granted["output"]["content"], "granted content");

    for escape in [
        "/readonly/../secret.txt",
        "/readonly/../../secret.txt",
        "/readonly/link.txt",
        "/etc/passwd",
        "../secret.txt",
        "secret.txt",
    ] {
        let step = tool_step(&harness, "read_file", json!({"path": escape})).await;
        assert_eq!(step["status"], "failed", "{escape} was readable: {step:#}");
        assert_eq!(step["error"]["code"], "io_error", "{escape}: {step:#}");
    }

    let read_only = tool_step(
        &harness,
        "write_file",
        json!({"path": "/readonly/new.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        read_only["status"], "failed",
        "a read-only folder was written: {read_only:#}"
    );
    assert!(!harness.plugins.path().join("readonly/new.txt").exists());

    let writable = tool_step(
        &harness,
        "write_file",
        json!({"path": "/counts/new.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        writable["status"], "succeeded",
        "the writable grant works: {writable:#}"
    );
    assert!(harness.plugins.path().join("counts/new.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_granted_environment_variables_are_visible() {
    let harness = Harness::start_with(&[
        ("OPSPAWN_TEST_GRANTED", "visible"),
        ("OPSPAWN_TEST_HIDDEN", SECRET),
    ]);
    let hidden = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_HIDDEN"})).await;
    assert_eq!(hidden["output"]["value"], Value::Null, "step: {hidden:#}");
    let path = tool_step(&harness, "env", json!({"name": "PATH"})).await;
    assert_eq!(
        path["output"]["value"],
        Value::Null,
        "the host's own environment is not inherited"
    );
    let granted = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_GRANTED"})).await;
    assert_eq!(granted["output"]["value"], "visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_calls_fail_alone_while_other_tasks_finish() {
    let harness = Harness::start();
    let client = harness.client();
    let hostile = [
        ("spin", json!({}), "plugin_timeout"),
        ("sleep", json!({"ms": 3_600_000}), "plugin_timeout"),
        ("memory_bomb", json!({}), "plugin_memory_limit"),
        (
            "big_output",
            json!({"bytes": 100_000_000}),
            "plugin_memory_limit",
        ),
        ("trap", json!({}), "plugin_trap"),
        ("panic", json!({}), "plugin_trap"),
    ];
    let mut hostile_ids = Vec::new();
    for (tool, arguments, code) in &hostile {
        let id = client
            .submit(&misbehaving_task(tool, arguments.clone()))
            .await
            .unwrap();
        hostile_ids.push((id, *tool, *code));
    }
    let mut normal_ids = Vec::new();
    for n in 0..6 {
        let task = crate::calculator_task(&format!("{n}*7"), &format!("{}", n * 7));
        normal_ids.push(client.submit(&task).await.unwrap());
    }

    // The server keeps answering quickly while the hostile calls run.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let (status, _) = client.get("/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "healthz took {slowest:?}"
    );

    for id in normal_ids {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        assert_eq!(
            task["status"], "succeeded",
            "a normal task was disturbed: {task:#}"
        );
    }
    for (id, tool, code) in hostile_ids {
        let task = client.wait_until_finished(&id, FINISH).await.unwrap();
        let step = &steps(&task)[1];
        assert_eq!(step["error"]["code"], code, "{tool}: {step:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_policy_narrows_what_a_manifest_asks_for() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        r#"
        [policy]
        writable_dirs = false

        [policy.plugins.misbehaving]
        env = []
        max_call_timeout = "300ms"
        "#,
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[
        ("OPSPAWN_CONFIG", &config_path),
        ("OPSPAWN_TEST_GRANTED", "visible"),
    ]);

    let (_, list) = harness.client().get("/v1/plugins").await.unwrap();
    let misbehaving = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "misbehaving")
        .unwrap()
        .clone();
    let refused: Vec<&str> = misbehaving["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        refused.contains(&"environment variable OPSPAWN_TEST_GRANTED"),
        "{refused:?}"
    );
    assert!(
        refused.contains(&"write access to folder counts"),
        "{refused:?}"
    );
    assert_eq!(misbehaving["grants"]["env"], json!([]));
    assert_eq!(misbehaving["limits"]["call_timeout"], "300ms");

    let env = tool_step(&harness, "env", json!({"name": "OPSPAWN_TEST_GRANTED"})).await;
    assert_eq!(
        env["output"]["value"],
        Value::Null,
        "the refused variable is not visible"
    );
    let write = tool_step(
        &harness,
        "write_file",
        json!({"path": "/counts/x.txt", "content": "x"}),
    )
    .await;
    assert_eq!(
        write["status"], "failed",
        "the folder became read-only: {write:#}"
    );
    let spin = tool_step(&harness, "spin", json!({})).await;
    assert_eq!(spin["error"]["code"], "plugin_timeout");
    assert!(
        spin["duration_ms"].as_i64().unwrap() < 900,
        "the operator's shorter limit applies: {spin:#}"
    );
}
