//! `GET /v1/tasks/{id}/events`: live steps, replay for late subscribers,
//! resumption after `Last-Event-ID`, and the end of the stream.

use std::time::Duration;

use serde_json::json;

use crate::{FINISH, Harness};

fn slow_task() -> serde_json::Value {
    json!({
        "goal": "What is 6 times 7?",
        "tools": ["calculator"],
        "options": {"llm": {"script": [
            {"delay_ms": 300, "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]},
            {"delay_ms": 300, "content": "Thought: the calculator says 42.\nFinal Answer: 42"}
        ]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_live_then_end_with_the_task() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client.submit(&slow_task()).await.unwrap();
    let events = client.events(&id, None, FINISH).await.unwrap();

    // The scripted adapter's replies come whole: no streamed text, the
    // reply is in `step.finished` (streamed text: providers.rs).
    assert!(
        events.iter().all(|e| e.event != "llm.delta"),
        "events: {events:#?}"
    );
    let journaled: Vec<_> = events.iter().collect();
    let kinds: Vec<&str> = journaled.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "task.queued",
            "task.started",
            "step.started",
            "step.finished",
            "step.started",
            "step.finished",
            "step.started",
            "step.finished",
            "task.finished"
        ],
        "events: {events:#?}"
    );
    let ids: Vec<i64> = journaled.iter().map(|e| e.id.parse().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=9).collect::<Vec<_>>(),
        "ids count up from 1 without gaps"
    );
    // Each step.started carries its step's input, the live ones too (the
    // store keeps the input in the step's row only, and the host adds it to
    // the event for whoever is watching).
    let task = client.task(&id).await.unwrap();
    let started = journaled.iter().filter(|e| e.event == "step.started");
    for (event, step) in started.zip(task["steps"].as_array().unwrap()) {
        assert!(!step["input"].is_null(), "{step:#}");
        assert_eq!(event.data["data"]["input"], step["input"], "{event:?}");
    }
    let last = journaled.last().unwrap();
    assert_eq!(last.data["data"]["status"], "succeeded");
    assert_eq!(last.data["data"]["result"], "42");
    assert_eq!(journaled[3].data["data"]["kind"], "llm");
    assert_eq!(journaled[5].data["data"]["output"]["result"], 42);
    assert!(
        journaled[7].data["data"]["output"]["message"]["content"]
            .as_str()
            .is_some_and(|text| text.contains("Final Answer: 42")),
        "the reply's text is in its step's end: {:#}",
        journaled[7].data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_the_whole_history_and_can_resume() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client.submit(&slow_task()).await.unwrap();
    client.wait_until_finished(&id, FINISH).await.unwrap();

    let replay = client
        .events(&id, None, Duration::from_secs(10))
        .await
        .unwrap();
    let kinds: Vec<&str> = replay.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds.len(),
        9,
        "the finished task's events are replayed: {kinds:?}"
    );
    assert_eq!(kinds.first(), Some(&"task.queued"));
    assert_eq!(kinds.last(), Some(&"task.finished"));
    // Replayed from the store, each step.started has its input (the store
    // keeps it once, in the step) and each step.finished its output only.
    let task = client.task(&id).await.unwrap();
    for (event, step) in replay
        .iter()
        .filter(|e| e.event == "step.started")
        .zip(task["steps"].as_array().unwrap())
    {
        assert_eq!(event.data["data"]["input"], step["input"], "{event:?}");
    }
    for (event, step) in replay
        .iter()
        .filter(|e| e.event == "step.finished")
        .zip(task["steps"].as_array().unwrap())
    {
        assert_eq!(event.data["data"]["output"], step["output"], "{event:?}");
        assert!(event.data["data"].get("input").is_none(), "{event:?}");
    }

    let resumed = client
        .events(&id, Some(6), Duration::from_secs(10))
        .await
        .unwrap();
    let ids: Vec<&str> = resumed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["7", "8", "9"],
        "Last-Event-ID resumes after the event it names"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_joining_mid_run_misses_nothing() {
    let harness = Harness::start();
    let client = harness.client();
    let id = client.submit(&slow_task()).await.unwrap();
    client
        .wait_for(&id, FINISH, |t| {
            t["steps"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await
        .unwrap();
    let events = client.events(&id, None, FINISH).await.unwrap();
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.event != "llm.delta")
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=9).collect::<Vec<_>>(),
        "history then live, in order, once each"
    );
}
