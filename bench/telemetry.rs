//! Section 6: what metrics and traces cost. The end-to-end run of section 1,
//! on three fresh servers at the same time, one in each setting:
//!
//! - **off**: metrics off (`OPSPAWN_METRICS__ENABLED=false`), no traces;
//! - **metrics**: the default, with a scrape of `GET /metrics` every
//!   [`SCRAPE_EVERY`], as Prometheus would;
//! - **metrics + traces**: also exporting every span over OTLP to a
//!   receiver in this process, which decodes each export as a collector
//!   would and counts its spans.
//!
//! Each round starts the three servers and runs the same tasks on each at
//! the same time, each server with its own clients. It prints each
//! setting's medians of server CPU per task and throughput, and the median
//! over rounds of each round's CPU per task against that round's server
//! with everything off. On a shared machine the load comes and goes: runs
//! one after the other saw different loads (a setting's cost moved by
//! ±10 % from run to run), where servers running side by side see the
//! same.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opspawn_testkit::{Client, Server};
use prost::Message;

use crate::end_to_end::{ScratchDir, Throughput, bench_plugins, server_binary, throughput};
use crate::stats::row;
use crate::{Args, SERVER_LOG};

/// How often the metrics run scrapes `GET /metrics`.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq)]
enum Setting {
    Off,
    Metrics,
    MetricsAndTraces,
}

impl Setting {
    const ALL: [Setting; 3] = [Setting::Off, Setting::Metrics, Setting::MetricsAndTraces];

    /// A name for file paths.
    fn label(self) -> &'static str {
        match self {
            Setting::Off => "off",
            Setting::Metrics => "metrics",
            Setting::MetricsAndTraces => "traces",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Setting::Off => "off",
            Setting::Metrics => "metrics",
            Setting::MetricsAndTraces => "metrics + traces",
        }
    }
}

/// What one run of one setting measured.
struct Run {
    cpu_per_task_ms: f64,
    tasks_per_second: f64,
    failures: usize,
}

/// Runs `rounds` rounds of the three settings and returns how many tasks
/// failed.
pub(crate) async fn run(args: &Args, rounds: usize) -> anyhow::Result<usize> {
    let binary = server_binary()?;
    let plugins = bench_plugins(args);
    let (endpoint, spans_received) = otlp_receiver().await?;
    let mut runs: Vec<(usize, Setting, Run)> = Vec::new();
    let mut spans_per_task = Vec::new();
    for round in 1..=rounds {
        // The three servers start in a different order each round, then
        // run their tasks at the same time.
        let mut order = Setting::ALL;
        order.rotate_left(round % Setting::ALL.len());
        let mut servers = Vec::new();
        for setting in order {
            let data = ScratchDir::new(&format!("telemetry-{}", setting.label()))?;
            let mut env = vec![SERVER_LOG];
            match setting {
                Setting::Off => env.push(("OPSPAWN_METRICS__ENABLED", "false")),
                Setting::Metrics => {}
                Setting::MetricsAndTraces => {
                    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
                    // Batches every 200 ms, so the last spans arrive soon
                    // after the run.
                    env.push(("OTEL_BSP_SCHEDULE_DELAY", "200"));
                }
            }
            let server = Server::start(&binary, data.path(), plugins.path(), &env)?;
            servers.push((setting, server, data));
        }
        let spans_before = spans_received.load(Ordering::Relaxed);
        let measured = servers.iter().map(|(setting, server, _)| async move {
            let scraper = (*setting != Setting::Off).then(|| tokio::spawn(scrape(server.client())));
            let measured = throughput(&[(server.client(), server.pid())], args).await;
            if let Some(scraper) = scraper {
                scraper.abort();
            }
            measured
        });
        let measured = futures::future::try_join_all(measured).await?;
        for ((setting, server, _), measured) in servers.iter().zip(measured) {
            let Throughput {
                wall,
                failures,
                server_cpu,
                ..
            } = measured;
            if *setting != Setting::Off {
                let (status, text) = get_text(&server.client(), "/metrics").await?;
                if status != StatusCode::OK || !text.contains("opspawn_step_duration_seconds") {
                    bail!("GET /metrics answered {status} without step durations");
                }
            }
            let run = Run {
                cpu_per_task_ms: server_cpu.as_secs_f64() * 1e3 / args.tasks as f64,
                tasks_per_second: args.tasks as f64 / wall.as_secs_f64(),
                failures: failures.len(),
            };
            eprintln!(
                "  round {round}, {}: {:.2} ms per task, {:.0} tasks/s",
                setting.name(),
                run.cpu_per_task_ms,
                run.tasks_per_second
            );
            runs.push((round, *setting, run));
        }
        // The warm-up tasks' spans come too; the measured ones dominate.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let spans = spans_received.load(Ordering::Relaxed) - spans_before;
        if spans == 0 {
            bail!("traces were on, but the receiver got no spans");
        }
        spans_per_task.push(spans as f64 / args.tasks as f64);
    }

    println!(
        "Metrics and traces: {} 3-step calculator tasks on SQLite, {} in flight, \
         {rounds} rounds of the three settings at once (medians)",
        args.tasks, args.concurrency
    );
    let median_of = |setting: Setting, field: fn(&Run) -> f64| {
        median(
            runs.iter()
                .filter(|(_, s, _)| *s == setting)
                .map(|(_, _, run)| field(run)),
        )
    };
    let cpu_of = |round: usize, setting: Setting| {
        runs.iter()
            .find(|(r, s, _)| *r == round && *s == setting)
            .map_or(f64::NAN, |(_, _, run)| run.cpu_per_task_ms)
    };
    for setting in Setting::ALL {
        let cpu = median_of(setting, |run| run.cpu_per_task_ms);
        let throughput = median_of(setting, |run| run.tasks_per_second);
        let against_off = if setting == Setting::Off {
            String::new()
        } else {
            let against_off = median(
                (1..=rounds).map(|round| cpu_of(round, setting) / cpu_of(round, Setting::Off)),
            );
            format!(
                ", {:+.0} % CPU against off (the median of each round's ratio)",
                (against_off - 1.0) * 100.0
            )
        };
        row(
            setting.name(),
            format!("{cpu:.2} ms of server CPU per task, {throughput:.0} tasks/s{against_off}"),
        );
    }
    row(
        "spans exported per task",
        format!("{:.1}", median(spans_per_task.into_iter())),
    );
    Ok(runs.iter().map(|(_, _, run)| run.failures).sum())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Scrapes `GET /metrics` every [`SCRAPE_EVERY`] until aborted.
async fn scrape(client: Client) {
    let mut ticks = tokio::time::interval(SCRAPE_EVERY);
    loop {
        ticks.tick().await;
        let _ = get_text(&client, "/metrics").await;
    }
}

async fn get_text(client: &Client, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let response = client.http().get(client.url(path)).send().await?;
    Ok((response.status(), response.text().await?))
}

/// An OTLP/HTTP receiver on a loopback port (`POST /v1/traces`, protobuf),
/// counting the spans it decodes. Returns its base URL.
async fn otlp_receiver() -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    async fn export(
        State(spans): State<Arc<AtomicUsize>>,
        body: Bytes,
    ) -> Result<([(header::HeaderName, &'static str); 1], Vec<u8>), StatusCode> {
        let request =
            ExportTraceServiceRequest::decode(body).map_err(|_| StatusCode::BAD_REQUEST)?;
        let count: usize = request
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        spans.fetch_add(count, Ordering::Relaxed);
        Ok((
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        ))
    }
    let spans = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the OTLP receiver")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, spans))
}
