//! Capacity: a task waiting on its LLM holds no worker, so a host runs far
//! more tasks at once than it has threads; and when the queue is full,
//! submissions are refused with `429 queue_full` rather than piling up,
//! while every task accepted still runs.

use std::time::{Duration, Instant, SystemTime};

use opspawn_testkit::StatusCode;
use serde_json::{Value, json};

use crate::{FINISH, Harness};

/// A task whose one LLM reply takes `delay_ms`: it spends nearly all its
/// life waiting, as agents do.
fn waiting_task(n: usize, delay_ms: u64) -> Value {
    json!({
        "goal": format!("wait {n}"),
        "tools": [],
        "options": {"llm": {"script": [
            {"delay_ms": delay_ms, "content": format!("Final Answer: waited {n}")}
        ]}}
    })
}

fn time(task: &Value, field: &str) -> SystemTime {
    let text = task[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {task:#}"));
    humantime::parse_rfc3339(text).unwrap()
}

/// The most tasks whose [started, finished] spans overlap at one instant.
fn peak_overlap(tasks: &[Value]) -> usize {
    let mut edges: Vec<(SystemTime, i32)> = tasks
        .iter()
        .flat_map(|t| [(time(t, "started_at"), 1), (time(t, "finished_at"), -1)])
        .collect();
    // At equal times, ends before starts: touching spans do not overlap.
    edges.sort();
    let (mut running, mut peak) = (0_i32, 0_i32);
    for (_, change) in edges {
        running += change;
        peak = peak.max(running);
    }
    peak as usize
}

/// Tasks at once, each mostly waiting on its one scripted LLM reply.
const WAITING_TASKS: usize = 300;
const REPLY_MS: u64 = 1000;
/// Instance slots in the capacity test: far fewer than the tasks waiting.
const INSTANCE_SLOTS: usize = 8;

/// A task waiting on its LLM holds no worker and no plugin instance: with
/// only a handful of instance slots, hundreds of tasks still wait at once,
/// and every one succeeds (calls wait for a slot; none fails for want of one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_tasks_wait_on_their_llm_at_once_with_few_instance_slots() {
    let slots = INSTANCE_SLOTS.to_string();
    let harness = Harness::start_with(&[("OPSPAWN_PLUGINS__INSTANCES", &slots)]);
    let client = harness.client();
    let started = Instant::now();
    let ids = futures::future::join_all((0..WAITING_TASKS).map(|n| {
        let client = client.clone();
        async move { client.submit(&waiting_task(n, REPLY_MS)).await.unwrap() }
    }))
    .await;
    let mut tasks = Vec::new();
    for id in &ids {
        tasks.push(client.wait_until_finished(id, FINISH).await.unwrap());
    }
    let took = started.elapsed();

    let failed: Vec<&Value> = tasks
        .iter()
        .filter(|t| t["status"] != "succeeded")
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed, such as {:#}",
        failed.len(),
        failed[0]
    );
    // Eight at a time, as the old worker pool ran them, would take 25 s.
    assert!(
        took < Duration::from_secs(10),
        "{WAITING_TASKS} tasks of one {REPLY_MS} ms reply took {took:?}"
    );
    let peak = peak_overlap(&tasks);
    assert!(
        peak >= WAITING_TASKS / 2,
        "at most {peak} of {WAITING_TASKS} tasks ran at once"
    );
    assert!(
        peak > INSTANCE_SLOTS * 10,
        "{peak} tasks at once is not far beyond {INSTANCE_SLOTS} instance slots"
    );
    println!(
        "{WAITING_TASKS} tasks of one {REPLY_MS} ms reply, {INSTANCE_SLOTS} instance slots: \
         {took:.1?}, {peak} at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_queue_full_and_loses_nothing() {
    const CAP: usize = 3;
    let harness = Harness::start_with(&[
        ("OPSPAWN_MAX_RUNNING_TASKS", "1"),
        ("OPSPAWN_MAX_QUEUED_TASKS", "3"),
    ]);
    let client = harness.client();
    // Takes the only running slot, so what follows stays queued.
    let blocker = client.submit(&waiting_task(0, 1500)).await.unwrap();
    client
        .wait_for(&blocker, FINISH, |t| t["status"] == "running")
        .await
        .unwrap();
    // Past the queue count's cache, which still saw the blocker queued.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut accepted = vec![blocker];
    let mut refusals = 0;
    for n in 1..=CAP + 3 {
        let response = client
            .http()
            .post(client.url("/v1/tasks"))
            .json(&waiting_task(n, 0))
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::CREATED => {
                let task: Value = response.json().await.unwrap();
                accepted.push(task["id"].as_str().unwrap().to_owned());
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(
                    retry_after.is_some_and(|seconds| seconds >= 1),
                    "Retry-After in whole seconds: {:?}",
                    response.headers()
                );
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "queue_full", "{body}");
                refusals += 1;
            }
            other => panic!("submission {n} answered {other}"),
        }
    }
    assert_eq!(
        (accepted.len() - 1, refusals),
        (CAP, 3),
        "the queue holds {CAP} tasks; the rest are refused"
    );

    // Every accepted task runs to its end.
    for id in &accepted {
        let task = client.wait_until_finished(id, FINISH).await.unwrap();
        assert_eq!(task["status"], "succeeded", "{task:#}");
    }
    // And with the queue drained, submissions are welcome again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = client.submit(&waiting_task(99, 0)).await.unwrap();
    let task = client.wait_until_finished(&again, FINISH).await.unwrap();
    assert_eq!(task["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_full_queue_is_refused_and_others_are_not() {
    let tokens = ["token-a", "token-b"];
    let mut config = String::from("[auth]\n");
    for (token, tenant) in tokens.iter().zip(["a", "b"]) {
        let hash = opspawn::api::auth::token_hash(token);
        config.push_str(&format!(
            "[[auth.tokens]]\ntenant = \"{tenant}\"\nsha256 = \"{hash}\"\n"
        ));
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let harness = Harness::start_with(&[
        ("OPSPAWN_CONFIG", file.path().to_str().unwrap()),
        // One task runs at a time, so the rest stay queued.
        ("OPSPAWN_MAX_RUNNING_TASKS", "1"),
        ("OPSPAWN_MAX_QUEUED_PER_TENANT", "2"),
    ]);
    let client = harness.client();
    let submit = |token: &'static str, n: usize| {
        let client = client.clone();
        async move {
            let response = client
                .http()
                .post(client.url("/v1/tasks"))
                .bearer_auth(token)
                .json(&waiting_task(n, 2000))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    };
    // Tenant a: one task runs, two queue, and the next is refused. (The
    // pause lets the first start, and the queue count's cache expire.)
    let mut statuses = Vec::new();
    for n in 0..4 {
        statuses.push(submit(tokens[0], n).await.0);
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let (status, body) = submit(tokens[0], 4).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("queue_full"))
    );
    // Tenant b has a queue of its own.
    let (status, body) = submit(tokens[1], 5).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// The server turns transparent huge pages off for itself: its allocator
/// asks for them, and then every first touch of a growing heap zeroes a
/// whole 2 MiB page and a region partly used counts 2 MiB resident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_without_transparent_huge_pages() {
    let harness = Harness::start();
    assert_eq!(
        harness.server_status("THP_enabled").as_deref(),
        Some("0"),
        "the server's /proc status should say THP_enabled: 0"
    );
}
