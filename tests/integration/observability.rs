//! What operators plug in: Prometheus metrics scraped from a real server
//! and read with a real Prometheus text parser, and request ids in answers
//! and in the log.

use std::collections::HashMap;

use opspawn::api::auth::token_hash;
use opspawn_testkit::{Client, StatusCode};
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::{Value as Json, json};

use crate::{FINISH, Harness, calculator_task};

const API_TOKEN: &str = "acme-token";
const SCRAPE_TOKEN: &str = "scrape-token";

/// A server with one tenant's token and a metrics token of its own.
fn observed() -> (Harness, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            r#"
            [metrics]
            token_sha256 = "{}"

            [[auth.tokens]]
            tenant = "acme"
            sha256 = "{}"
            "#,
            token_hash(SCRAPE_TOKEN),
            token_hash(API_TOKEN),
        ),
    )
    .unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let harness = Harness::start_with(&[
        ("OPSPAWN_CONFIG", &path),
        ("OPSPAWN_LOG", "warn,opspawn=info,opspawn::http=debug"),
    ]);
    (harness, config)
}

async fn submit(client: &Client, body: &Json) -> String {
    let response = client
        .http()
        .post(client.url("/v1/tasks"))
        .bearer_auth(API_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let task: Json = response.json().await.unwrap();
    task["id"].as_str().unwrap().to_owned()
}

async fn wait_until_finished(client: &Client, id: &str) -> Json {
    let deadline = tokio::time::Instant::now() + FINISH;
    loop {
        let task: Json = client
            .http()
            .get(client.url(&format!("/v1/tasks/{id}")))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if task["finished_at"].is_string() {
            return task;
        }
        assert!(tokio::time::Instant::now() < deadline, "{task}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `GET /metrics` with `token`: the status, and the body parsed as the
/// Prometheus text format when the answer is 200.
async fn scrape(client: &Client, token: Option<&str>) -> (StatusCode, Option<Scrape>, String) {
    let mut request = client.http().get(client.url("/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    if status != StatusCode::OK {
        return (status, None, text);
    }
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let parsed = Scrape::parse(lines).expect("the Prometheus text format");
    (status, Some(parsed), text)
}

/// The samples of `metric` whose labels include every pair of `labels`.
fn samples<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The sum of the values of `metric` with `labels` (for a histogram, of
/// its `_count`).
fn total(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, metric, labels)
        .into_iter()
        .map(|sample| match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("{metric} is a summary"),
        })
        .sum()
}

#[tokio::test]
async fn metrics_need_their_token_and_parse_as_prometheus_text() {
    let (harness, _config) = observed();
    let client = harness.client();

    let id = submit(&client, &calculator_task("(2+3)*4", "20")).await;
    let task = wait_until_finished(&client, &id).await;
    assert_eq!(task["status"], "succeeded", "{task}");
    // One task that waits: the queue is not empty at the scrape.
    let later = json!({"goal": "later", "run_at": "2100-01-01T00:00:00Z"});
    submit(&client, &later).await;

    let (status, _, body) = scrape(&client, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let body: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    for wrong in ["guess", API_TOKEN] {
        let (status, _, body) = scrape(&client, Some(wrong)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}: {body}");
        assert!(body.contains("invalid_token"), "{body}");
    }

    let (status, scraped, text) = scrape(&client, Some(SCRAPE_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let scraped = scraped.unwrap();
    let expect_some = |metric: &str, labels: &[(&str, &str)]| {
        let value = total(&scraped, metric, labels);
        assert!(value > 0.0, "{metric} {labels:?} is {value} in:\n{text}");
        value
    };
    assert_eq!(
        expect_some("opspawn_tasks_submitted_total", &[("tenant", "acme")]),
        2.0
    );
    assert_eq!(
        expect_some(
            "opspawn_tasks_finished_total",
            &[("tenant", "acme"), ("status", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        expect_some("opspawn_tasks", &[("tenant", "acme"), ("status", "queued")]),
        1.0
    );
    assert_eq!(expect_some("opspawn_queue_depth", &[]), 1.0);
    assert_eq!(
        total(&scraped, "opspawn_queue_oldest_age_seconds", &[]),
        0.0,
        "a task scheduled for later is not waiting yet"
    );
    assert!(!samples(&scraped, "opspawn_running_tasks", &[]).is_empty());
    // The three steps: LLM, calculator, LLM.
    expect_some(
        "opspawn_step_duration_seconds",
        &[("kind", "llm"), ("plugin", "scripted"), ("outcome", "ok")],
    );
    expect_some(
        "opspawn_step_duration_seconds",
        &[
            ("kind", "tool"),
            ("plugin", "calculator"),
            ("outcome", "ok"),
        ],
    );
    expect_some(
        "opspawn_plugin_call_duration_seconds",
        &[("plugin", "react"), ("kind", "planner"), ("outcome", "ok")],
    );
    expect_some(
        "opspawn_plugin_call_duration_seconds",
        &[
            ("plugin", "calculator"),
            ("kind", "tool"),
            ("outcome", "ok"),
        ],
    );
    expect_some(
        "opspawn_llm_tokens_total",
        &[("adapter", "scripted"), ("direction", "input")],
    );
    expect_some(
        "opspawn_llm_tokens_total",
        &[("adapter", "scripted"), ("direction", "output")],
    );
    // A 3-step task: the first step starts alone; each later start, and
    // the task's end, is written with the end of the step before.
    for operation in [
        "create_task",
        "claim_batch",
        "start_step",
        "finish_step_then_start",
        "finish_step_then_task",
    ] {
        expect_some(
            "opspawn_store_operation_duration_seconds",
            &[("operation", operation), ("outcome", "ok")],
        );
    }
    expect_some("opspawn_plugin_loads_total", &[("outcome", "loaded")]);
    expect_some("opspawn_plugins_loaded", &[("kind", "tool")]);
    assert_eq!(
        expect_some(
            "opspawn_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/tasks"),
                ("status", "201")
            ]
        ),
        2.0
    );
    // prometheus-parse cannot read braces inside a label value (valid in
    // the format), so the route with a parameter is checked in the text.
    assert!(
        text.lines().any(|line| line.starts_with(
            "opspawn_http_requests_total{method=\"GET\",route=\"/v1/tasks/{id}\",status=\"200\"}"
        )),
        "{text}"
    );
    expect_some(
        "opspawn_http_requests_total",
        &[("route", "/metrics"), ("status", "401")],
    );
    assert!(
        scraped.docs.contains_key("opspawn_step_duration_seconds"),
        "every metric has its HELP text"
    );

    // Bounded labels: no task id, no goal, in any label.
    let mut label_values: HashMap<&str, Vec<&str>> = HashMap::new();
    for sample in &scraped.samples {
        for (name, value) in sample.labels.iter() {
            label_values
                .entry(name.as_str())
                .or_default()
                .push(value.as_str());
        }
    }
    for (name, values) in &label_values {
        for value in values {
            assert!(
                uuid::Uuid::parse_str(value).is_err() && !value.contains("What is"),
                "label {name}={value:?} carries a task's id or text"
            );
        }
    }
}

#[tokio::test]
async fn every_answer_has_a_request_id_that_the_log_carries() {
    let (harness, _config) = observed();
    let client = harness.client();
    let response = client
        .http()
        .get(client.url("/v1/tasks/%FF"))
        .bearer_auth(API_TOKEN)
        .header("x-request-id", "probe-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["x-request-id"], "probe-7f3a");
    let body: Json = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_path", "{body}");

    let fresh = client
        .http()
        .get(client.url("/healthz"))
        .send()
        .await
        .unwrap();
    let id = fresh.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");

    let deadline = tokio::time::Instant::now() + FINISH;
    loop {
        let log = harness.server.log();
        if log.contains("probe-7f3a") && log.contains(&id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log names no request id:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
