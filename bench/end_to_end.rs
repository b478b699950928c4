//! Section 1: End-to-end throughput on SQLite, and what the Postgres sections
//! share with it: the closed loop of clients, the watcher of tasks in
//! flight, checking each task and the server's CPU.

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use opspawn_testkit::{Client, PluginFolder, Server, StatusCode};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::stats::{Samples, millis, row};
use crate::{Args, MAX_CONCURRENCY, POLL_EVERY, SERVER_LOG, TASK_TIMEOUT, WARM_UP_TASKS};

/// A submitted task and the answer it must give.
pub(crate) struct Submitted {
    pub(crate) id: String,
    pub(crate) answer: i64,
}

/// Runs the end-to-end measurement and returns how many tasks failed.
pub(crate) async fn end_to_end(args: &Args) -> anyhow::Result<usize> {
    let binary = server_binary()?;
    let plugins = bench_plugins(args);
    let data = ScratchDir::new("data")?;
    // The testkit logs at debug level; measure the server's default instead.
    let server = Server::start(&binary, data.path(), plugins.path(), &[SERVER_LOG])?;
    let Throughput {
        wall,
        latencies,
        failures,
        server_cpu,
        client_cpu,
        postgres_cpu: _,
    } = throughput(&[(server.client(), server.pid())], args).await?;

    println!(
        "End to end: 3-step {} tasks on SQLite, over REST{}",
        if args.memory {
            "memory-saving"
        } else {
            "calculator"
        },
        if args.threads {
            ", each client's in a thread of its own"
        } else {
            ""
        }
    );
    row("tasks", args.tasks.to_string());
    row(
        "concurrency",
        format!("{} tasks in flight", args.concurrency),
    );
    row("wall time", format!("{:.2} s", wall.as_secs_f64()));
    row(
        "throughput",
        format!("{:.1} tasks/s", args.tasks as f64 / wall.as_secs_f64()),
    );
    row("server CPU per task", cpu_per_task(server_cpu, args.tasks));
    row(
        "bench client CPU per task",
        cpu_per_task(client_cpu, args.tasks),
    );
    if !latencies.is_empty() {
        row("latency p50", millis(latencies.percentile(0.50)));
        row("latency p95", millis(latencies.percentile(0.95)));
    }
    row("failed", failures.len().to_string());
    report_failures(&failures);
    Ok(failures.len())
}

/// What one throughput run measured.
pub(crate) struct Throughput {
    pub(crate) wall: Duration,
    /// Of the tasks that succeeded.
    pub(crate) latencies: Samples,
    pub(crate) failures: Vec<String>,
    /// CPU time the servers used during the timed run, all hosts together.
    pub(crate) server_cpu: Duration,
    /// CPU time this benchmark's process (its clients) used meanwhile.
    pub(crate) client_cpu: Duration,
    /// CPU time this machine's Postgres processes used meanwhile.
    pub(crate) postgres_cpu: Duration,
}

/// Warms up every host, then runs `args.tasks` tasks from
/// `args.concurrency` clients, submitting them round-robin to the hosts
/// (each given with its server's process id).
pub(crate) async fn throughput(hosts: &[(Client, u32)], args: &Args) -> anyhow::Result<Throughput> {
    for (client, _) in hosts {
        warm_up(client).await?;
    }
    let servers_cpu = || -> anyhow::Result<Duration> {
        hosts
            .iter()
            .map(|(_, pid)| crate::slow_llm::process_cpu(*pid))
            .sum()
    };
    let clients: Vec<Client> = hosts.iter().map(|(client, _)| client.clone()).collect();

    let client_cpu = || crate::slow_llm::process_cpu(std::process::id());
    let (server_before, postgres_before) = (servers_cpu()?, postgres_cpu());
    let client_before = client_cpu()?;
    let started = Instant::now();
    let shape = TaskShape {
        threads: args.threads,
        memory: args.memory,
        wait_in_request: args.wait_in_request && hosts.len() == 1,
    };
    let submitted = run_clients(&clients, args.tasks, args.concurrency, shape).await?;
    let wall = started.elapsed();
    let server_cpu = servers_cpu()? - server_before;
    let client_cpu = client_cpu()? - client_before;
    let postgres_cpu = postgres_cpu().saturating_sub(postgres_before);
    let hosts = clients;

    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for (task, expected) in fetch_all(&hosts[0], submitted).await? {
        match check_task(&task, expected.answer) {
            Ok(latency) => latencies.push(latency),
            Err(why) => failures.push(format!("{}: {why}", expected.id)),
        }
    }
    Ok(Throughput {
        wall,
        latencies: Samples::new(latencies),
        failures,
        server_cpu,
        client_cpu,
        postgres_cpu,
    })
}

/// CPU time used by every `postgres` process on this machine (the server
/// and its backends), as far as `/proc` shows them.
pub(crate) fn postgres_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == "postgres")
        })
        .filter_map(|pid| crate::slow_llm::process_cpu(pid).ok())
        .sum()
}

/// CPU time per task, in milliseconds with two decimals.
pub(crate) fn cpu_per_task(cpu: Duration, tasks: usize) -> String {
    format!("{:.2} ms", cpu.as_secs_f64() * 1000.0 / tasks.max(1) as f64)
}

/// The server binary built beside this one.
pub(crate) fn server_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let binary = exe.with_file_name(format!("opspawn{}", std::env::consts::EXE_SUFFIX));
    if !binary.is_file() {
        bail!(
            "the server binary {} is missing: run `cargo build --release -p opspawn` first \
             (or build both with `cargo build --release -p opspawn -p opspawn-bench`)",
            binary.display()
        );
    }
    Ok(binary)
}

/// The three-step task of the README (as `calculator_task` in the
/// integration tests), for the `n`th expression.
pub(crate) fn calculator_task(n: usize) -> (Value, i64) {
    let answer = (n as i64 + 3) * 4;
    let expression = format!("({n} + 3) * 4");
    let body = json!({
        "goal": format!("What is {expression}?"),
        "tools": ["calculator"],
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]},
            {"content": format!("Thought: the calculator answered.\nFinal Answer: {answer}")}
        ]}}
    });
    (body, answer)
}

/// The example plugins the benchmark's servers load: the testkit's, and
/// with `--memory` the memory tool.
pub(crate) fn bench_plugins(args: &Args) -> PluginFolder {
    let plugins = PluginFolder::with_examples();
    if args.memory {
        let manifest = opspawn_testkit::plugin_sources().join("memory/memory.toml");
        let manifest = std::fs::read_to_string(&manifest).ok();
        plugins.add("memory", "memory", manifest.as_deref());
    }
    plugins
}

/// The same three steps, with the tool call saving a memory (in the
/// client's namespace) instead of calling the calculator.
fn memory_task(n: usize, client: usize) -> (Value, i64) {
    let answer = (n as i64 + 3) * 4;
    let body = json!({
        "goal": format!("Remember what ({n} + 3) * 4 is"),
        "tools": ["memory_save"],
        "memory_namespace": format!("bench-{client}"),
        "options": {"llm": {"script": [
            {"tool_calls": [{"name": "memory_save", "arguments": {
                "text": format!("({n} + 3) * 4 is {answer}"),
                "metadata": {"n": n}
            }}]},
            {"content": format!("Thought: saved.\nFinal Answer: {answer}")}
        ]}}
    });
    (body, answer)
}

/// What the measured tasks are like.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskShape {
    /// Each client's tasks continue a thread of its own.
    pub(crate) threads: bool,
    /// The tool call saves a memory instead of calculating.
    pub(crate) memory: bool,
    /// Each client waits on its own submission (`Prefer: wait=N`, one
    /// host only) instead of on the watcher of the task lists.
    pub(crate) wait_in_request: bool,
}

pub(crate) async fn warm_up(client: &Client) -> anyhow::Result<()> {
    for n in 0..WARM_UP_TASKS {
        let (body, answer) = calculator_task(n);
        let id = client.submit(&body).await?;
        let task = client.wait_until_finished(&id, TASK_TIMEOUT).await?;
        check_task(&task, answer).map_err(|why| anyhow!("warm-up task {id}: {why}"))?;
    }
    Ok(())
}

/// Runs `tasks` tasks from `concurrency` clients, each submitting a task and
/// waiting for it to finish before taking the next. Task `n` is submitted to
/// host `n % hosts.len()`; the hosts share one store, so the first one's
/// task lists show every task. With `shape.threads`, client `c`'s tasks
/// name the thread `bench-c`.
pub(crate) async fn run_clients(
    hosts: &[Client],
    tasks: usize,
    concurrency: usize,
    shape: TaskShape,
) -> anyhow::Result<Vec<Submitted>> {
    let (polls, seen) = watch::channel(Arc::new(Poll::empty()));
    let watcher =
        (!shape.wait_in_request).then(|| tokio::spawn(watch_in_flight(hosts[0].clone(), polls)));
    let next = Arc::new(AtomicUsize::new(0));
    let hosts: Arc<[Client]> = hosts.into();
    let clients = (0..concurrency).map(|c| {
        let hosts = hosts.clone();
        let next = next.clone();
        let mut seen = seen.clone();
        tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= tasks {
                    return anyhow::Ok(done);
                }
                let (mut body, answer) = if shape.memory {
                    memory_task(n, c)
                } else {
                    calculator_task(n)
                };
                if shape.threads {
                    body["thread"] = json!(format!("bench-{c}"));
                }
                let host = &hosts[n % hosts.len()];
                let id = if shape.wait_in_request {
                    submit_and_wait(host, &body).await?
                } else {
                    let id = host.submit(&body).await?;
                    wait_finished(&mut seen, &id, Instant::now()).await?;
                    id
                };
                done.push(Submitted { id, answer });
            }
        })
    });
    let finished = futures::future::join_all(clients).await;
    if let Some(watcher) = watcher {
        watcher.abort();
        if let Ok(Err(error)) = watcher.await {
            return Err(error.context("polling the task lists"));
        }
    }
    let mut submitted = Vec::with_capacity(tasks);
    for done in finished {
        submitted.extend(done??);
    }
    Ok(submitted)
}

/// How long one request waiting on a task may wait, in seconds.
const WAIT_SECS: u32 = 30;

/// Submits a task preferring to wait for it to finish (`Prefer: wait=N`),
/// and waits on `GET /v1/tasks/{id}?wait_secs=N` while the answer shows it
/// unfinished, until [`TASK_TIMEOUT`] passes: a task still unfinished then is
/// reported by the final check. Returns the task's id.
async fn submit_and_wait(client: &Client, body: &Value) -> anyhow::Result<String> {
    let submitted = Instant::now();
    let response = client
        .http()
        .post(client.url("/v1/tasks"))
        .header("prefer", format!("wait={WAIT_SECS}"))
        .json(body)
        .send()
        .await?;
    let (code, mut task): (StatusCode, Value) = (response.status(), response.json().await?);
    if code != StatusCode::CREATED {
        bail!("submitting {body} answered {code}: {task}");
    }
    let id = task["id"].as_str().context("no id")?.to_owned();
    let path = format!("/v1/tasks/{id}?wait_secs={WAIT_SECS}");
    while !is_finished(&task) && submitted.elapsed() < TASK_TIMEOUT {
        let (code, again) = client.get(&path).await?;
        if code != StatusCode::OK {
            bail!("GET {path} answered {code}: {again}");
        }
        task = again;
    }
    Ok(id)
}

fn is_finished(task: &Value) -> bool {
    matches!(
        task["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// What one poll of the task lists saw.
pub(crate) struct Poll {
    pub(crate) started: Instant,
    /// The ids of the tasks queued or running.
    pub(crate) in_flight: HashSet<String>,
}

impl Poll {
    pub(crate) fn empty() -> Self {
        Self {
            started: Instant::now(),
            in_flight: HashSet::new(),
        }
    }
}

/// Every [`POLL_EVERY`], lists the queued and then the running tasks and
/// publishes their ids: two light requests for all clients, rather than one
/// per client. A task only moves from queued to running to finished, so one
/// missing from both lists, read in this order, has finished.
pub(crate) async fn watch_in_flight(
    client: Client,
    polls: watch::Sender<Arc<Poll>>,
) -> anyhow::Result<()> {
    loop {
        let started = Instant::now();
        let mut in_flight = HashSet::new();
        for status in ["queued", "running"] {
            let path = format!("/v1/tasks?status={status}&limit={MAX_CONCURRENCY}");
            let (code, page) = client.get(&path).await?;
            if code != StatusCode::OK {
                bail!("GET {path} answered {code}: {page}");
            }
            let tasks = page["tasks"].as_array().context("no task list")?;
            in_flight.extend(
                tasks
                    .iter()
                    .filter_map(|t| t["id"].as_str().map(str::to_owned)),
            );
        }
        polls.send_replace(Arc::new(Poll { started, in_flight }));
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits until a poll that started after the task was submitted no longer
/// sees it in flight, or until [`TASK_TIMEOUT`] passes: a task still
/// unfinished then is reported by the final check.
pub(crate) async fn wait_finished(
    polls: &mut watch::Receiver<Arc<Poll>>,
    id: &str,
    submitted: Instant,
) -> anyhow::Result<()> {
    let deadline = submitted + TASK_TIMEOUT;
    loop {
        let poll = polls.borrow_and_update().clone();
        if poll.started > submitted && !poll.in_flight.contains(id) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline.into(), polls.changed()).await {
            Err(_elapsed) => return Ok(()),
            Ok(changed) => changed.context("the task watcher stopped")?,
        }
    }
}

/// Fetches every task with its steps, a few at a time.
pub(crate) async fn fetch_all(
    client: &Client,
    submitted: Vec<Submitted>,
) -> anyhow::Result<Vec<(Value, Submitted)>> {
    futures::stream::iter(submitted)
        .map(|expected| async move { Ok((client.task(&expected.id).await?, expected)) })
        .buffered(8)
        .try_collect()
        .await
}

/// Checks that a task succeeded with the expected answer, computed by the
/// calculator, and returns its submit-to-finished latency.
pub(crate) fn check_task(task: &Value, answer: i64) -> Result<Duration, String> {
    let status = task["status"].as_str().unwrap_or("?");
    if status != "succeeded" {
        return Err(format!("{status}, error {}", task["error"]));
    }
    let result = task["result"].as_str().unwrap_or_default();
    if result != answer.to_string() {
        return Err(format!("result {result:?}, expected {answer}"));
    }
    let tool = task["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["kind"] == "tool"));
    // A memory-saving task's tool answers the id of what it saved.
    if tool.is_some_and(|step| step["output"]["id"].is_string()) {
        return task_duration(task);
    }
    let computed = tool.and_then(|step| step["output"]["result"].as_f64());
    if computed != Some(answer as f64) {
        return Err(format!(
            "the calculator computed {computed:?}, not {answer}"
        ));
    }
    task_duration(task)
}

/// How long a task took, from its creation to its end.
fn task_duration(task: &Value) -> Result<Duration, String> {
    let created = timestamp(&task["created_at"])?;
    let finished = timestamp(&task["finished_at"])?;
    finished
        .duration_since(created)
        .map_err(|_| "finished before it was created".to_owned())
}

pub(crate) fn timestamp(value: &Value) -> Result<std::time::SystemTime, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("no timestamp: {value}"))?;
    humantime::parse_rfc3339(text).map_err(|e| format!("bad timestamp {text:?}: {e}"))
}

pub(crate) fn report_failures(failures: &[String]) {
    for failure in failures.iter().take(10) {
        println!("  FAILED {failure}");
    }
    if failures.len() > 10 {
        println!("  ... and {} more", failures.len() - 10);
    }
}

/// A directory under the system temp dir, removed when dropped.
pub(crate) struct ScratchDir(pub(crate) PathBuf);

impl ScratchDir {
    pub(crate) fn new(label: &str) -> anyhow::Result<Self> {
        let name = format!("opspawn-bench-{label}-{}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // For a look at what a run journaled (its events' times, say).
        if std::env::var_os("OPSPAWN_BENCH_KEEP_DATA").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
