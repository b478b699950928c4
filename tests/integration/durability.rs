//! Durability: `kill -9` in the middle of a run, then a restart. Every task
//! is still there, and the running one resumes from its journal without
//! running a finished step again.

use std::collections::HashMap;

use serde_json::json;

use crate::{FINISH, Harness, steps};

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
