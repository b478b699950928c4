//! Crash test on SQLite: hundreds of multi-step tasks while the server is
//! killed with SIGKILL again and again. Every task must end, and the
//! counting tool must show that no journaled step ran twice (only a step in
//! flight at a kill may run again, once per later claim).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Harness;

const TASKS: usize = 300;
const KILLS: usize = 4;
/// Tasks running at once: a bound on the steps in flight at a kill.
const MAX_RUNNING: usize = 8;

/// Three calls of the counting tool, then an answer: seven steps.
pub fn counting_task(n: usize) -> Value {
    let count = json!({"name": "count", "arguments": {"file": "/counts/log", "sleep_ms": 15}});
    json!({
        "goal": format!("counting task {n}"),
        "tools": ["count"],
        "options": {"llm": {"script": [
            {"tool_calls": [count]},
            {"tool_calls": [count]},
            {"tool_calls": [count]},
            {"content": "Final Answer: counted three times"}
        ]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_repeated_kill_9_without_repeating_journaled_steps() {
    let max_running = MAX_RUNNING.to_string();
    let mut harness = Harness::start_with(&[("OPSPAWN_MAX_RUNNING_TASKS", &max_running)]);
    let client = harness.client();
    let submitted = futures::future::join_all((0..TASKS).map(|n| {
        let client = client.clone();
        async move { client.submit(&counting_task(n)).await.unwrap() }
    }))
    .await;

    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(400 + 150 * kill as u64)).await;
        harness.server.kill9();
        harness.server.restart().unwrap();
    }

    let client = harness.server.client();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut tasks = HashMap::new();
    for id in &submitted {
        let left = deadline.saturating_duration_since(Instant::now());
        let task = client.wait_until_finished(id, left).await.unwrap();
        tasks.insert(id.clone(), task);
    }
    let unsuccessful: Vec<String> = tasks
        .values()
        .filter(|t| t["status"] != "succeeded")
        .map(|t| format!("{} {}: {}", t["id"], t["status"], t["error"]))
        .collect();
    assert!(
        unsuccessful.is_empty(),
        "every task ends, and ends well; these did not: {unsuccessful:#?}"
    );

    // What the counting tool saw: one line per execution.
    let log = std::fs::read_to_string(harness.plugins.path().join("counts/log")).unwrap();
    let mut executions: HashMap<(String, u64), usize> = HashMap::new();
    for line in log.lines() {
        let mut fields = line.split(' ');
        let task = fields.next().unwrap().to_owned();
        let step: u64 = fields.next().unwrap().parse().unwrap();
        let key = fields.next().unwrap();
        assert_eq!(
            key,
            format!("{task}:{step}"),
            "the idempotency key is stable"
        );
        *executions.entry((task, step)).or_default() += 1;
    }

    let mut repeated = 0;
    for (id, task) in &tasks {
        for step in task["steps"].as_array().unwrap() {
            if step["kind"] != "tool" {
                continue;
            }
            let seq = step["seq"].as_u64().unwrap();
            let runs = executions.get(&(id.clone(), seq)).copied().unwrap_or(0);
            assert!(runs >= 1, "journaled step {seq} of {id} never ran");
            if runs > 1 {
                // Only a step that was in flight at a kill runs again, and
                // then under a later claim: at most once per claim (one in
                // flight at two kills runs three times, under three claims).
                let attempt = step["attempt"].as_u64().unwrap();
                assert!(
                    runs as u64 <= attempt,
                    "step {seq} of {id} ran {runs} times under {attempt} claims: {step:#}"
                );
                repeated += runs - 1;
            }
        }
    }
    assert!(
        repeated <= KILLS * MAX_RUNNING,
        "steps ran {repeated} extra times; at most {} can be in flight at {KILLS} kills",
        KILLS * MAX_RUNNING
    );
    let restarted = tasks
        .values()
        .filter(|t| t["attempt"].as_i64().unwrap() > 1)
        .count();
    assert!(
        restarted > 0,
        "the kills interrupted some tasks (else this test proves nothing)"
    );
    println!(
        "{TASKS} tasks, {KILLS} kills: {restarted} tasks resumed, in-flight steps re-ran {repeated} times"
    );
}
