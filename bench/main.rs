//! Opspawn's benchmark: prints what this machine does, asserts nothing.
//!
//! 1. **End-to-end throughput.** A real `opspawn serve` child process (SQLite
//!    store, the example plugins, its default log level) runs N three-step
//!    tasks: the scripted LLM asks for the calculator, the calculator answers,
//!    the LLM gives the final answer. C clients submit them over REST in a
//!    closed loop: each keeps one task in flight and submits the next once it
//!    has finished, so C is the number of tasks in flight. One watcher polls
//!    the queued and running lists every 20 ms for all clients, which keeps
//!    the polling light next to the work measured. Latency is the server's
//!    own `created_at` to `finished_at`.
//! 2. **The cost of one tool call** on the same component, `calculator.wasm`:
//!    through the host's `PluginRuntime::invoke_tool`, and through bare
//!    wasmtime (fresh store, instantiate, call) with and without the pooling
//!    allocator. The host/bare ratio is what the host adds per call: the
//!    catalog lookup, its per-call store (WASI pipes, memory limiter, epoch
//!    callback), the wall-clock guard, and JSON in and out.
//!
//! With `--postgres URL` (skipped otherwise), on that database:
//!
//! 3. **End-to-end throughput on Postgres**, as in 1, with 1 and then 3
//!    `opspawn serve` processes sharing the database and one plugin folder.
//!    Each run gets a fresh schema (`opspawn_schema=`), dropped afterwards.
//!    The clients spread their submissions round-robin over the hosts' APIs;
//!    a task runs on whichever host claims it first.
//! 4. **Failover time.** Host A (at most 4 running tasks) claims 4 slow tasks (scripted
//!    LLM replies that take [`SLOW_REPLY_MS`] each); host B starts once A
//!    holds them all; A is killed with SIGKILL. The time measured is from the
//!    kill to each task's `task.started` event with attempt 2, which B
//!    journals when it claims the task after A's lease has expired: so it is
//!    the lease left at the kill plus the time B takes to notice. Each task
//!    must then succeed on B. Three runs, each on a fresh schema.
//!
//! 5. **Thousands of agents waiting on a slow LLM**: see [`slow_llm`].
//!
//! A run that is interrupted leaves its schemas (`bench_…`) behind.
//!
//! Timings are medians and upper percentiles, not means: on a shared machine
//! a few samples land on a descheduled thread or a page fault, and they would
//! drag a mean far from the typical cost.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod slow_llm;

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use opspawn::plugins::bindings::v0_2::tool::ToolPre;
use opspawn::plugins::bindings::v0_2::types;
use opspawn::plugins::policy::OperatorPolicy;
use opspawn::plugins::{EngineOptions, Limits, PluginRuntime, RuntimeOptions, build_engine};
use opspawn::protocol::CallContext;
use opspawn_testkit::{Client, PluginFolder, Server, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::watch;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

const USAGE: &str = "usage: opspawn-bench [--tasks N (300)] [--concurrency C (16)] [--calls N (2000)] \
     [--slow-llm-tasks N (10000; 0 skips the section)] [--only SECTION] \
     [--postgres URL (none: skip the Postgres sections)]\n\
     sections: end-to-end, per-call, slow-llm, postgres";
/// The database to suggest when the Postgres sections are skipped.
const POSTGRES_EXAMPLE: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Tasks run before the measured ones, to load plugins and warm caches.
const WARM_UP_TASKS: usize = 5;
/// How often the task lists are polled for finished tasks.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// The most tasks in flight: one page of a task list.
const MAX_CONCURRENCY: usize = 500;
/// A task still unfinished after this long is counted as failed.
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
/// Calls made before the timed ones; their answers are checked.
const WARM_UP_CALLS: usize = 200;
/// The input of every timed tool call, and its answer.
const EXPRESSION: &str = "(2+3)*4";
const ANSWER: f64 = 20.0;
/// The servers' log level: their default, not the testkit's debug level.
const SERVER_LOG: (&str, &str) = ("OPSPAWN_LOG", "warn,opspawn=info");
/// The numbers of hosts the Postgres throughput runs with.
const HOST_COUNTS: [usize; 2] = [1, 3];
/// How many times the failover is measured.
const FAILOVER_RUNS: usize = 3;
/// The slow tasks host A runs when it is killed: as many as it may run at once.
const FAILOVER_TASKS: usize = 4;
/// The lease of the hosts in the failover runs.
const FAILOVER_LEASE: &str = "2s";
/// How long each scripted LLM reply of a slow task takes. A slow task makes
/// two, so it runs for twice this on A: long enough for B to start.
const SLOW_REPLY_MS: u64 = 3000;

fn main() -> ExitCode {
    // As the server does (see its main): wasmtime makes an error value per
    // dropped store, and a captured backtrace each would dominate the
    // per-call figures when RUST_BACKTRACE is set.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse()?;
    opspawn::server::raise_open_file_limit();
    let mut failed = 0;
    let mut measured = 0;
    if args.runs("end-to-end") {
        failed += end_to_end(&args).await?;
        measured += args.tasks;
        println!();
    }
    if args.runs("per-call") {
        per_call(&args).await?;
        println!();
    }
    if args.runs("slow-llm") && args.slow_llm_tasks > 0 {
        failed += slow_llm::run(args.slow_llm_tasks).await?;
        measured += args.slow_llm_tasks;
        println!();
    }
    match &args.postgres {
        _ if !args.runs("postgres") => {}
        None => println!("Postgres sections skipped: pass --postgres {POSTGRES_EXAMPLE}"),
        Some(url) => {
            failed += postgres_throughput(&args, url).await?;
            measured += args.tasks * HOST_COUNTS.len();
            println!();
            failover(url).await?;
        }
    }
    if failed > 0 {
        bail!("{failed} of {measured} tasks did not succeed as expected");
    }
    Ok(())
}

struct Args {
    tasks: usize,
    concurrency: usize,
    calls: usize,
    /// Tasks of the slow-LLM section.
    slow_llm_tasks: usize,
    /// Run only this section.
    only: Option<String>,
    /// The Postgres database for the Postgres sections; none skips them.
    postgres: Option<String>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Self {
            tasks: 300,
            concurrency: 16,
            calls: 2000,
            slow_llm_tasks: 10_000,
            only: None,
            postgres: None,
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            let slot = match flag.as_str() {
                "--tasks" => &mut args.tasks,
                "--concurrency" => &mut args.concurrency,
                "--calls" => &mut args.calls,
                "--slow-llm-tasks" => {
                    let value = argv
                        .next()
                        .with_context(|| format!("{flag} needs a value"))?;
                    args.slow_llm_tasks = value
                        .parse()
                        .with_context(|| format!("{flag} {value:?} is not a number"))?;
                    continue;
                }
                "--only" => {
                    let section = argv
                        .next()
                        .with_context(|| format!("{flag} needs a section"))?;
                    if !SECTIONS.contains(&section.as_str()) {
                        bail!("unknown section {section:?}\n{USAGE}");
                    }
                    args.only = Some(section);
                    continue;
                }
                "--postgres" => {
                    let url = argv.next().with_context(|| format!("{flag} needs a URL"))?;
                    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                        bail!("{flag} {url:?} is not a postgres:// URL");
                    }
                    if url.contains("opspawn_schema=") {
                        bail!("{flag}: leave opspawn_schema out, each run picks its own");
                    }
                    args.postgres = Some(url);
                    continue;
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                _ => bail!("unknown argument {flag:?}\n{USAGE}"),
            };
            let value = argv
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            *slot = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a number"))?;
            if *slot == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if args.concurrency > MAX_CONCURRENCY {
            bail!("--concurrency may be at most {MAX_CONCURRENCY}");
        }
        Ok(args)
    }

    /// Whether `section` is to run.
    fn runs(&self, section: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == section)
    }
}

/// The sections `--only` can pick.
const SECTIONS: [&str; 4] = ["end-to-end", "per-call", "slow-llm", "postgres"];

// ---------------------------------------------------------------------------
// 1. End to end

/// A submitted task and the answer it must give.
struct Submitted {
    id: String,
    answer: i64,
}

/// Runs the end-to-end measurement and returns how many tasks failed.
async fn end_to_end(args: &Args) -> anyhow::Result<usize> {
    let binary = server_binary()?;
    let plugins = PluginFolder::with_examples();
    let data = ScratchDir::new("data")?;
    // The testkit logs at debug level; measure the server's default instead.
    let server = Server::start(&binary, data.path(), plugins.path(), &[SERVER_LOG])?;
    let Throughput {
        wall,
        latencies,
        failures,
        server_cpu,
        postgres_cpu: _,
    } = throughput(&[(server.client(), server.pid())], args).await?;

    println!("End to end: 3-step calculator tasks on SQLite, over REST");
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
    if !latencies.is_empty() {
        row("latency p50", millis(latencies.percentile(0.50)));
        row("latency p95", millis(latencies.percentile(0.95)));
    }
    row("failed", failures.len().to_string());
    report_failures(&failures);
    Ok(failures.len())
}

/// What one throughput run measured.
struct Throughput {
    wall: Duration,
    /// Of the tasks that succeeded.
    latencies: Samples,
    failures: Vec<String>,
    /// CPU time the servers used during the timed run, all hosts together.
    server_cpu: Duration,
    /// CPU time this machine's Postgres processes used meanwhile.
    postgres_cpu: Duration,
}

/// Warms up every host, then runs `args.tasks` tasks from
/// `args.concurrency` clients, submitting them round-robin to the hosts
/// (each given with its server's process id).
async fn throughput(hosts: &[(Client, u32)], args: &Args) -> anyhow::Result<Throughput> {
    for (client, _) in hosts {
        warm_up(client).await?;
    }
    let servers_cpu = || -> anyhow::Result<Duration> {
        hosts
            .iter()
            .map(|(_, pid)| slow_llm::process_cpu(*pid))
            .sum()
    };
    let clients: Vec<Client> = hosts.iter().map(|(client, _)| client.clone()).collect();

    let (server_before, postgres_before) = (servers_cpu()?, postgres_cpu());
    let started = Instant::now();
    let submitted = run_clients(&clients, args.tasks, args.concurrency).await?;
    let wall = started.elapsed();
    let server_cpu = servers_cpu()? - server_before;
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
        postgres_cpu,
    })
}

/// CPU time used by every `postgres` process on this machine (the server
/// and its backends), as far as `/proc` shows them.
fn postgres_cpu() -> Duration {
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
        .filter_map(|pid| slow_llm::process_cpu(pid).ok())
        .sum()
}

/// CPU time per task, in milliseconds with two decimals.
fn cpu_per_task(cpu: Duration, tasks: usize) -> String {
    format!("{:.2} ms", cpu.as_secs_f64() * 1000.0 / tasks.max(1) as f64)
}

/// The server binary built beside this one.
fn server_binary() -> anyhow::Result<PathBuf> {
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
fn calculator_task(n: usize) -> (Value, i64) {
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

async fn warm_up(client: &Client) -> anyhow::Result<()> {
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
/// task lists show every task.
async fn run_clients(
    hosts: &[Client],
    tasks: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Submitted>> {
    let (polls, seen) = watch::channel(Arc::new(Poll::empty()));
    let watcher = tokio::spawn(watch_in_flight(hosts[0].clone(), polls));
    let next = Arc::new(AtomicUsize::new(0));
    let hosts: Arc<[Client]> = hosts.into();
    let clients = (0..concurrency).map(|_| {
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
                let (body, answer) = calculator_task(n);
                let id = hosts[n % hosts.len()].submit(&body).await?;
                wait_finished(&mut seen, &id, Instant::now()).await?;
                done.push(Submitted { id, answer });
            }
        })
    });
    let finished = futures::future::join_all(clients).await;
    watcher.abort();
    if let Ok(Err(error)) = watcher.await {
        return Err(error.context("polling the task lists"));
    }
    let mut submitted = Vec::with_capacity(tasks);
    for done in finished {
        submitted.extend(done??);
    }
    Ok(submitted)
}

/// What one poll of the task lists saw.
struct Poll {
    started: Instant,
    /// The ids of the tasks queued or running.
    in_flight: HashSet<String>,
}

impl Poll {
    fn empty() -> Self {
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
async fn watch_in_flight(client: Client, polls: watch::Sender<Arc<Poll>>) -> anyhow::Result<()> {
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
async fn wait_finished(
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
async fn fetch_all(
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
fn check_task(task: &Value, answer: i64) -> Result<Duration, String> {
    let status = task["status"].as_str().unwrap_or("?");
    if status != "succeeded" {
        return Err(format!("{status}, error {}", task["error"]));
    }
    let result = task["result"].as_str().unwrap_or_default();
    if result != answer.to_string() {
        return Err(format!("result {result:?}, expected {answer}"));
    }
    let computed = task["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["kind"] == "tool"))
        .and_then(|step| step["output"]["result"].as_f64());
    if computed != Some(answer as f64) {
        return Err(format!(
            "the calculator computed {computed:?}, not {answer}"
        ));
    }
    let created = timestamp(&task["created_at"])?;
    let finished = timestamp(&task["finished_at"])?;
    finished
        .duration_since(created)
        .map_err(|_| "finished before it was created".to_owned())
}

fn timestamp(value: &Value) -> Result<std::time::SystemTime, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("no timestamp: {value}"))?;
    humantime::parse_rfc3339(text).map_err(|e| format!("bad timestamp {text:?}: {e}"))
}

fn report_failures(failures: &[String]) {
    for failure in failures.iter().take(10) {
        println!("  FAILED {failure}");
    }
    if failures.len() > 10 {
        println!("  ... and {} more", failures.len() - 10);
    }
}

/// A directory under the system temp dir, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(label: &str) -> anyhow::Result<Self> {
        let name = format!("opspawn-bench-{label}-{}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// 2. Per call

async fn per_call(args: &Args) -> anyhow::Result<()> {
    let host = time_host(args.calls).await?;
    let pooled = time_bare(true, args.calls).await?;
    let on_demand = time_bare(false, args.calls).await?;

    println!(
        "Per tool call: calculator.wasm, {EXPRESSION:?}, {} calls after {WARM_UP_CALLS} warm-up, one at a time",
        args.calls
    );
    println!("  {:<36}{:>12}{:>12}", "", "median", "p90");
    for (name, samples) in [
        ("host invoke_tool", &host),
        ("bare wasmtime, pooling allocator", &pooled),
        ("bare wasmtime, on-demand allocator", &on_demand),
    ] {
        println!(
            "  {name:<36}{:>12}{:>12}",
            micros(samples.percentile(0.5)),
            micros(samples.percentile(0.9))
        );
    }
    let ratio = |a: &Samples, b: &Samples| {
        a.percentile(0.5).as_secs_f64() / b.percentile(0.5).as_secs_f64()
    };
    row(
        "host / bare (pooling)",
        format!("{:.2}x", ratio(&host, &pooled)),
    );
    row(
        "on-demand / pooling (bare)",
        format!("{:.2}x", ratio(&on_demand, &pooled)),
    );
    Ok(())
}

/// Calls the calculator through the host's plugin runtime, loaded from a
/// folder holding only `calculator.wasm` (no manifest: default limits).
async fn time_host(calls: usize) -> anyhow::Result<Samples> {
    let folder = PluginFolder::new();
    folder.add("calculator", "calculator", None);
    let runtime = PluginRuntime::new(RuntimeOptions {
        plugin_dir: folder.path().to_owned(),
        cache_dir: None,
        default_limits: Limits::default(),
        policy: OperatorPolicy::default(),
        engine: EngineOptions::default(),
        concurrent_calls: opspawn::plugins::default_concurrent_calls(),
        server_env: Vec::new(),
        server_dirs: Vec::new(),
        max_load_time: std::time::Duration::from_secs(120),
    })?;
    runtime.scan().await?;
    if let Some(failure) = runtime.catalog().failures().first() {
        bail!("{} did not load: {}", failure.file.display(), failure.error);
    }
    let input = json!({ "expression": EXPRESSION });
    let call = async |n: u32| {
        let context = CallContext::new("bench", n);
        Ok(runtime.invoke_tool("calculator", &context, &input).await?)
    };
    let check = |output: &Value| check_answer(&output["result"]);
    measure(calls, call, check).await
}

/// What a bare store holds: WASI and its resource table, nothing else.
struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Calls the calculator on bare wasmtime: per call a fresh store,
/// instantiate, `invoke`.
async fn time_bare(pooling: bool, calls: usize) -> anyhow::Result<Samples> {
    let engine = bare_engine(pooling)?;
    let component = Component::from_file(&engine, opspawn_testkit::wasm("calculator"))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    let pre = ToolPre::new(linker.instantiate_pre(&component)?)?;
    let input = json!({ "expression": EXPRESSION }).to_string();
    let call = async |n: u32| {
        let state = BareState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&engine, state);
        // Epoch interruption is on, as in the host, but nothing ticks.
        store.set_epoch_deadline(u64::MAX / 2);
        let tool = pre.instantiate_async(&mut store).await?;
        let context = types::CallContext {
            task_id: "bench".into(),
            step: n,
            idempotency_key: format!("bench:{n}"),
        };
        tool.opspawn_plugin_tools()
            .call_invoke(&mut store, &context, "calculator", &input)
            .await?
            .map_err(|e| anyhow!("the calculator failed: {}: {}", e.code, e.message))
    };
    let check = |output: &String| {
        let output: Value = serde_json::from_str(output)?;
        check_answer(&output["result"])
    };
    measure(calls, call, check).await
}

/// An engine configured exactly as the host's, optionally without pooling.
fn bare_engine(pooling: bool) -> anyhow::Result<Engine> {
    let options = EngineOptions {
        pooling,
        ..EngineOptions::default()
    };
    build_engine(&options).map_err(|e| anyhow::anyhow!("{e:#}"))
}

fn check_answer(result: &Value) -> anyhow::Result<()> {
    if result.as_f64() != Some(ANSWER) {
        bail!("{EXPRESSION} gave {result}, not {ANSWER}");
    }
    Ok(())
}

/// Makes [`WARM_UP_CALLS`] calls, checking each answer, then times `calls`
/// more, one at a time.
async fn measure<T>(
    calls: usize,
    mut call: impl AsyncFnMut(u32) -> anyhow::Result<T>,
    check: impl Fn(&T) -> anyhow::Result<()>,
) -> anyhow::Result<Samples> {
    for n in 0..WARM_UP_CALLS {
        check(&call(n as u32).await?)?;
    }
    let mut times = Vec::with_capacity(calls);
    for n in 0..calls {
        let started = Instant::now();
        let output = call(n as u32).await?;
        times.push(started.elapsed());
        drop(output);
    }
    Ok(Samples::new(times))
}

// ---------------------------------------------------------------------------
// 3. Throughput on Postgres

/// Runs the end-to-end measurement on Postgres with each of [`HOST_COUNTS`]
/// hosts, and returns how many tasks failed.
async fn postgres_throughput(args: &Args, url: &str) -> anyhow::Result<usize> {
    check_connection(url).await?;
    let binary = server_binary()?;
    let plugins = PluginFolder::with_examples();

    println!(
        "End to end on Postgres: 3-step calculator tasks over REST, hosts sharing one database \
         (a fresh schema per run) and one plugin folder, tasks submitted round-robin to the hosts"
    );
    row("tasks", args.tasks.to_string());
    row(
        "concurrency",
        format!("{} tasks in flight", args.concurrency),
    );
    println!(
        "  {:<8}{:>12}{:>16}{:>18}{:>20}{:>10}{:>10}{:>8}",
        "hosts",
        "wall time",
        "throughput",
        "server CPU/task",
        "Postgres CPU/task",
        "p50",
        "p95",
        "failed"
    );
    let mut failed = 0;
    for hosts in HOST_COUNTS {
        let schema = Schema::new(url, &format!("throughput_{hosts}h"));
        let measured = async {
            let cluster = Cluster::start(&binary, plugins.path(), &schema, hosts, &[])?;
            throughput(&cluster.clients_with_pids(), args).await
        }
        .await;
        let dropped = schema.drop_schema().await;
        let Throughput {
            wall,
            latencies,
            failures,
            server_cpu,
            postgres_cpu,
        } = measured.with_context(|| format!("the run with {hosts} hosts"))?;
        dropped?;
        let (p50, p95) = if latencies.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                millis(latencies.percentile(0.50)),
                millis(latencies.percentile(0.95)),
            )
        };
        println!(
            "  {hosts:<8}{:>12}{:>16}{:>18}{:>20}{p50:>10}{p95:>10}{:>8}",
            format!("{:.2} s", wall.as_secs_f64()),
            format!("{:.1} tasks/s", args.tasks as f64 / wall.as_secs_f64()),
            cpu_per_task(server_cpu, args.tasks),
            cpu_per_task(postgres_cpu, args.tasks),
            failures.len()
        );
        report_failures(&failures);
        failed += failures.len();
    }
    Ok(failed)
}

/// Connects to the database once, to fail early and plainly if it is not
/// there.
async fn check_connection(url: &str) -> anyhow::Result<()> {
    let conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    conn.close().await?;
    Ok(())
}

/// A schema of its own for one run, which the hosts' store creates. It must
/// be dropped with [`Schema::drop_schema`] once the hosts are gone.
struct Schema {
    /// The database URL without the schema.
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str, label: &str) -> Self {
        let millis = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self {
            url: url.to_owned(),
            // [a-z0-9_]+, as the store requires, and under 63 bytes.
            name: format!("bench_{}_{millis}_{label}", std::process::id()),
        }
    }

    /// The URL the hosts use: the database, and this schema in it.
    fn database_url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}opspawn_schema={}", self.url, self.name)
    }

    async fn drop_schema(&self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {} to drop the schema", self.url))?;
        // The name is ours: bench_, digits, a label of [a-z0-9_].
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.name
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping the schema {}", self.name))?;
        conn.close().await?;
        Ok(())
    }
}

/// `opspawn serve` processes sharing one schema and one plugin folder, each
/// with a data directory of its own.
struct Cluster {
    /// Declared first, so the servers are killed before their directories
    /// are removed.
    servers: Vec<Server>,
    _data: Vec<ScratchDir>,
}

impl Cluster {
    /// Starts `hosts` servers one after the other, each with `env` added.
    fn start(
        binary: &Path,
        plugins: &Path,
        schema: &Schema,
        hosts: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cluster = Self {
            servers: Vec::new(),
            _data: Vec::new(),
        };
        for _ in 0..hosts {
            cluster.add(binary, plugins, schema, env)?;
        }
        Ok(cluster)
    }

    /// Starts one more server.
    fn add(
        &mut self,
        binary: &Path,
        plugins: &Path,
        schema: &Schema,
        env: &[(&str, &str)],
    ) -> anyhow::Result<&mut Server> {
        let url = schema.database_url();
        let mut server_env = vec![SERVER_LOG, ("OPSPAWN_DATABASE_URL", url.as_str())];
        server_env.extend_from_slice(env);
        let label = format!("{}_host{}", schema.name, self.servers.len());
        let data = ScratchDir::new(&label)?;
        let server = Server::start(binary, data.path(), plugins, &server_env)
            .with_context(|| format!("starting host {}", self.servers.len()))?;
        self._data.push(data);
        self.servers.push(server);
        Ok(self.servers.last_mut().expect("just pushed"))
    }

    /// Each host's client, with its server's process id.
    fn clients_with_pids(&self) -> Vec<(Client, u32)> {
        self.servers.iter().map(|s| (s.client(), s.pid())).collect()
    }
}

// ---------------------------------------------------------------------------
// 4. Failover

/// Measures [`FAILOVER_RUNS`] times how long the tasks of a host killed with
/// SIGKILL take to start again on another.
async fn failover(url: &str) -> anyhow::Result<()> {
    check_connection(url).await?;
    let binary = server_binary()?;
    let plugins = PluginFolder::with_examples();

    println!(
        "Failover on Postgres: host A runs {FAILOVER_TASKS} slow tasks, is killed with SIGKILL, \
         host B takes them over"
    );
    row(
        "lease",
        format!("{FAILOVER_LEASE} (OPSPAWN_LEASE, both hosts)"),
    );
    row(
        "hosts",
        format!(
            "A: OPSPAWN_MAX_RUNNING_TASKS={FAILOVER_TASKS}; B: default limit, started once A holds the tasks"
        ),
    );
    row(
        "tasks",
        format!("{FAILOVER_TASKS} x 3-step calculator, each LLM reply {SLOW_REPLY_MS} ms"),
    );
    // A renews its leases every third of the lease, so the lease left at
    // the kill depends on where in that period the kill falls. B takes about
    // as long to start every time, which would put every run's kill at the
    // same point: wait a different fraction of the period in each run.
    let renewal = humantime::parse_duration(FAILOVER_LEASE)? / 3;
    row(
        "kill",
        format!(
            "once B is up, plus (run - 1)/{FAILOVER_RUNS} of A's lease renewal period ({})",
            millis(renewal)
        ),
    );
    row(
        "measured",
        "kill -> task.started with attempt 2, per task".to_owned(),
    );
    let mut all = Vec::new();
    for run in 1..=FAILOVER_RUNS {
        let schema = Schema::new(url, &format!("failover_{run}"));
        let wait = renewal * (run - 1) as u32 / FAILOVER_RUNS as u32;
        let measured = failover_once(&binary, plugins.path(), &schema, wait).await;
        let dropped = schema.drop_schema().await;
        let Failover {
            mut restarts,
            lease_left,
        } = measured.with_context(|| format!("failover run {run}"))?;
        dropped?;
        restarts.sort_unstable();
        let list: Vec<String> = restarts.iter().map(|d| millis(*d)).collect();
        let median = Samples::new(restarts.clone()).percentile(0.5);
        row(
            &format!("run {run}"),
            format!(
                "{}; median {}; kill +{}, lease left at the kill {}",
                list.join(", "),
                millis(median),
                millis(wait),
                span(&lease_left)
            ),
        );
        all.extend(restarts);
    }
    let all = Samples::new(all);
    row(
        &format!("median of all {}", all.0.len()),
        millis(all.percentile(0.5)),
    );
    row("slowest", millis(all.percentile(1.0)));
    Ok(())
}

/// What one failover run measured.
struct Failover {
    /// Per task, from the kill to its `task.started` with attempt 2.
    restarts: Vec<Duration>,
    /// Per task, how long its lease still had to run at the kill.
    lease_left: Vec<Duration>,
}

/// One failover: A claims the slow tasks, B starts, A is killed `wait`
/// after B is up, B resumes the tasks and they succeed.
async fn failover_once(
    binary: &Path,
    plugins: &Path,
    schema: &Schema,
    wait: Duration,
) -> anyhow::Result<Failover> {
    let lease = ("OPSPAWN_LEASE", FAILOVER_LEASE);
    let max_running = FAILOVER_TASKS.to_string();
    let mut cluster = Cluster::start(
        binary,
        plugins,
        schema,
        1,
        &[lease, ("OPSPAWN_MAX_RUNNING_TASKS", max_running.as_str())],
    )?;
    let host_a = cluster.servers[0].client();
    let mut tasks = Vec::new();
    for n in 0..FAILOVER_TASKS {
        let (body, answer) = slow_task(n);
        tasks.push((host_a.submit(&body).await?, answer));
    }
    for (id, _) in &tasks {
        host_a
            .wait_for(id, TASK_TIMEOUT, |task| {
                task["status"] == "running" && task["attempt"] == 1
            })
            .await?;
    }

    let host_b = cluster.add(binary, plugins, schema, &[lease])?.client();
    tokio::time::sleep(wait).await;
    // A must still hold every task when it is killed, else there is nothing
    // to take over.
    for (id, _) in &tasks {
        let task = host_b.task(id).await?;
        if task["status"] != "running" || task["attempt"] != 1 {
            bail!(
                "task {id} is {} in attempt {} when A is to be killed, not running in attempt 1: \
                 B took too long to start, raise SLOW_REPLY_MS",
                task["status"],
                task["attempt"]
            );
        }
    }
    let killed = SystemTime::now();
    cluster.servers[0].kill9();
    let lease_left = lease_left(schema, &tasks, killed).await?;

    let mut restarts = Vec::new();
    for (id, answer) in &tasks {
        let task = host_b.wait_until_finished(id, TASK_TIMEOUT).await?;
        check_task(&task, *answer).map_err(|why| anyhow!("task {id} on B: {why}"))?;
        let events = host_b.events(id, None, TASK_TIMEOUT).await?;
        let restart = events
            .iter()
            .map(|event| &event.data)
            .find(|event| event["kind"] == "task.started" && event["data"]["attempt"] == 2)
            .with_context(|| format!("task {id} has no task.started event with attempt 2"))?;
        let at = timestamp(&restart["at"]).map_err(|why| anyhow!("task {id}: {why}"))?;
        let after = at
            .duration_since(killed)
            .with_context(|| format!("task {id} started its attempt 2 before A was killed"))?;
        restarts.push(after);
    }
    Ok(Failover {
        restarts,
        lease_left,
    })
}

/// The three-step calculator task, each of whose LLM replies takes
/// [`SLOW_REPLY_MS`].
fn slow_task(n: usize) -> (Value, i64) {
    let (mut body, answer) = calculator_task(n);
    if let Some(script) = body["options"]["llm"]["script"].as_array_mut() {
        for reply in script {
            reply["delay_ms"] = json!(SLOW_REPLY_MS);
        }
    }
    (body, answer)
}

/// How long the tasks' leases had left at `killed`, read from the store: A
/// is dead, so nothing renews them any more.
async fn lease_left(
    schema: &Schema,
    tasks: &[(String, i64)],
    killed: SystemTime,
) -> anyhow::Result<Vec<Duration>> {
    let mut conn = sqlx::PgConnection::connect(&schema.url).await?;
    // The name is ours: bench_, digits, a label of [a-z0-9_].
    let query = format!(
        "SELECT lease_expires_at FROM \"{}\".tasks WHERE id = $1",
        schema.name
    );
    let killed = killed.duration_since(std::time::UNIX_EPOCH)?;
    let mut left = Vec::new();
    for (id, _) in tasks {
        let (expires,): (Option<i64>,) = sqlx::query_as(sqlx::AssertSqlSafe(query.clone()))
            .bind(id)
            .fetch_one(&mut conn)
            .await?;
        // Running, so leased; B cannot have claimed it yet, with the lease
        // still running.
        let expires = Duration::from_millis(expires.unwrap_or_default().max(0) as u64);
        left.push(expires.saturating_sub(killed));
    }
    conn.close().await?;
    Ok(left)
}

/// `a-b ms`, the range of `times`.
fn span(times: &[Duration]) -> String {
    let ms = |d: &Duration| d.as_millis();
    match (times.iter().min(), times.iter().max()) {
        (Some(low), Some(high)) => format!("{}-{} ms", ms(low), ms(high)),
        _ => "-".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Statistics and printing

/// Durations, sorted.
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut times: Vec<Duration>) -> Self {
        times.sort_unstable();
        Self(times)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The nearest-rank percentile, `p` in (0, 1]. Panics if empty.
    fn percentile(&self, p: f64) -> Duration {
        let rank = (p * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
}

fn row(name: &str, value: String) {
    println!("  {name:<36}{value}");
}

fn millis(time: Duration) -> String {
    format!("{:.0} ms", time.as_secs_f64() * 1e3)
}

fn micros(time: Duration) -> String {
    format!("{:.1} us", time.as_secs_f64() * 1e6)
}
