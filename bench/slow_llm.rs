//! 5. **Thousands of agents waiting on a slow LLM.** A real `opspawn serve`
//!    (SQLite, default settings) with the `openai` adapter pointed at a
//!    loopback server speaking the OpenAI wire format, whose every answer
//!    takes [`LLM_LATENCY`]. By default it serves HTTPS and offers HTTP/2, as
//!    hosted providers do ([`ProviderKind`]). N ReAct tasks (10,000 by default) are submitted
//!    at once; each makes two LLM calls around one calculator call, so the
//!    ideal wall time is two latencies. Printed: successes, wall time against
//!    that ideal, the server's peak RSS and CPU per task, the benchmark's own
//!    CPU per task (its mock provider and clients share the machine), and
//!    the most LLM requests the provider was answering at once (tasks
//!    waiting on it).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use opspawn_testkit::providers::models;
use opspawn_testkit::{Client, MockProviders, PluginFolder, Provider, Server};
use serde_json::{Value, json};

use crate::SERVER_LOG;
use crate::end_to_end::{ScratchDir, server_binary};
use crate::stats::row;

/// How long every answer of the mock provider takes.
pub const LLM_LATENCY: Duration = Duration::from_secs(2);
/// Submissions in flight at once while the batch is submitted.
const SUBMITTERS: usize = 64;
/// How long the batch may take before the run is called a failure.
const BATCH_TIMEOUT: Duration = Duration::from_secs(600);

/// How the mock provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// HTTPS, offering HTTP/2 and HTTP/1.1 by ALPN, as hosted providers do.
    Tls,
    /// HTTPS with HTTP/1.1 only.
    TlsHttp1,
    /// Plain HTTP/1.1, as local inference servers do.
    Cleartext,
}

impl std::str::FromStr for ProviderKind {
    type Err = anyhow::Error;

    fn from_str(kind: &str) -> anyhow::Result<Self> {
        match kind {
            "tls" => Ok(Self::Tls),
            "tls-http1" => Ok(Self::TlsHttp1),
            "cleartext" => Ok(Self::Cleartext),
            _ => bail!("unknown provider kind {kind:?}: tls, tls-http1 or cleartext"),
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tls => "HTTPS offering HTTP/2 and HTTP/1.1",
            Self::TlsHttp1 => "HTTPS with HTTP/1.1 only",
            Self::Cleartext => "cleartext HTTP/1.1",
        })
    }
}

/// Runs the section; returns how many tasks did not succeed.
pub async fn run(tasks: usize, kind: ProviderKind) -> anyhow::Result<usize> {
    let binary = server_binary()?;
    let provider = Provider::OpenAi;
    let mock = match kind {
        ProviderKind::Tls => MockProviders::start_tls(true).await,
        ProviderKind::TlsHttp1 => MockProviders::start_tls(false).await,
        ProviderKind::Cleartext => MockProviders::start().await,
    };
    mock.stop_recording();
    let plugins = PluginFolder::with_examples();
    plugins.add(
        provider.plugin(),
        provider.wasm(),
        Some(&provider.manifest_for(&mock)),
    );
    let data = ScratchDir::new("slow-llm")?;
    let base_url = mock.base_url_for(provider);
    let key = provider.test_key();
    let server = Server::start(
        &binary,
        data.path(),
        plugins.path(),
        &[
            SERVER_LOG,
            (provider.base_url_var(), &base_url),
            (provider.key_var(), &key),
        ],
    )?;
    let client = server.client();

    // One task first, at full latency, to load and warm everything.
    let id = client.submit(&react_task()).await?;
    let task = client
        .wait_until_finished(&id, LLM_LATENCY * 4 + Duration::from_secs(30))
        .await?;
    if task["status"] != "succeeded" {
        bail!("the warm-up task did not succeed: {task:#}");
    }
    mock.set_latency(LLM_LATENCY);
    let succeeded_before = count(&client, "succeeded").await?;
    let cpu_before = process_cpu(server.pid())?;
    let own_cpu_before = process_cpu(std::process::id())?;

    let started = Instant::now();
    let body = react_task();
    let submitted: Vec<anyhow::Result<String>> = futures::stream::iter(0..tasks)
        .map(|_| client.submit(&body))
        .buffer_unordered(SUBMITTERS)
        .collect()
        .await;
    let submit_time = started.elapsed();
    let rejected = submitted.iter().filter(|r| r.is_err()).count();
    if let Some(Err(error)) = submitted.iter().find(|r| r.is_err()) {
        eprintln!("a submission failed: {error:#}");
    }
    wait_until_idle(&client, started + BATCH_TIMEOUT).await?;
    let wall = started.elapsed();
    let cpu = process_cpu(server.pid())? - cpu_before;
    let own_cpu = process_cpu(std::process::id())? - own_cpu_before;
    let succeeded = count(&client, "succeeded").await? - succeeded_before;
    let peak_rss = peak_rss_bytes(server.pid())?;

    let ideal = LLM_LATENCY * 2;
    println!(
        "Slow LLM: ReAct tasks through the openai adapter, answers taking {} s each",
        LLM_LATENCY.as_secs()
    );
    row("provider", kind.to_string());
    row("tasks", format!("{tasks}, submitted at once"));
    row(
        "submitting took",
        format!("{:.2} s", submit_time.as_secs_f64()),
    );
    row("succeeded", format!("{succeeded} of {tasks}"));
    row(
        "wall time",
        format!(
            "{:.2} s: {:.2} x the ideal of two LLM calls ({} s)",
            wall.as_secs_f64(),
            wall.as_secs_f64() / ideal.as_secs_f64(),
            ideal.as_secs()
        ),
    );
    row(
        "throughput",
        format!("{:.0} tasks/s", tasks as f64 / wall.as_secs_f64()),
    );
    row(
        "server CPU per task",
        format!("{:.2} ms", cpu.as_secs_f64() * 1e3 / tasks.max(1) as f64),
    );
    // The mock provider and the clients run here, on the same cores: the
    // wall time is bound by both processes' CPU.
    row(
        "bench CPU per task",
        format!(
            "{:.2} ms (the mock provider and the clients)",
            own_cpu.as_secs_f64() * 1e3 / tasks.max(1) as f64
        ),
    );
    row("server peak RSS", format!("{} MB", peak_rss >> 20));
    row(
        "waiting on the LLM at once",
        format!("at most {} requests", mock.max_in_flight()),
    );
    row(
        "connections to the provider",
        format!("{} made", mock.connections()),
    );
    Ok(tasks - succeeded.min(tasks) + rejected.min(tasks))
}

fn react_task() -> Value {
    json!({
        "goal": "What is 6*7?",
        "tools": ["calculator"],
        "llm": "openai",
        "model": models::REACT,
    })
}

/// Waits until no task is queued or running.
async fn wait_until_idle(client: &Client, give_up: Instant) -> anyhow::Result<()> {
    loop {
        let queued = client.get("/v1/tasks?status=queued&limit=1").await?.1;
        let running = client.get("/v1/tasks?status=running&limit=1").await?.1;
        let empty = |page: &Value| page["tasks"].as_array().is_some_and(Vec::is_empty);
        if empty(&queued) && empty(&running) {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("tasks were still unfinished after {BATCH_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many tasks have `status`, counted page by page.
async fn count(client: &Client, status: &str) -> anyhow::Result<usize> {
    let mut total = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/tasks?status={status}&limit=500&cursor={cursor}"),
            None => format!("/v1/tasks?status={status}&limit=500"),
        };
        let (_, page) = client.get(&path).await?;
        total += page["tasks"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(total),
        }
    }
}

/// User plus system CPU time a process has used.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("an unexpected /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// The most resident memory a process has had (VmHWM).
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM in /proc status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("an unexpected VmHWM line")?
        .parse()?;
    Ok(kib << 10)
}
