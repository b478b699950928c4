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
//! Timings are medians and upper percentiles, not means: on a shared machine
//! a few samples land on a descheduled thread or a page fault, and they would
//! drag a mean far from the typical cost.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use opspawn::plugins::bindings::tool::ToolPre;
use opspawn::plugins::bindings::types;
use opspawn::plugins::policy::OperatorPolicy;
use opspawn::plugins::{EngineOptions, Limits, PluginRuntime, RuntimeOptions};
use opspawn::protocol::CallContext;
use opspawn_testkit::{Client, PluginFolder, Server, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

const USAGE: &str =
    "usage: opspawn-bench [--tasks N (300)] [--concurrency C (16)] [--calls N (2000)]";

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

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let failed = end_to_end(&args).await?;
    println!();
    per_call(&args).await?;
    if failed > 0 {
        bail!(
            "{failed} of {} tasks did not succeed as expected",
            args.tasks
        );
    }
    Ok(())
}

struct Args {
    tasks: usize,
    concurrency: usize,
    calls: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Self {
            tasks: 300,
            concurrency: 16,
            calls: 2000,
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            let slot = match flag.as_str() {
                "--tasks" => &mut args.tasks,
                "--concurrency" => &mut args.concurrency,
                "--calls" => &mut args.calls,
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
}

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
    let server = Server::start(
        &binary,
        data.path(),
        plugins.path(),
        &[("OPSPAWN_LOG", "warn,opspawn=info")],
    )?;
    let client = server.client();
    warm_up(&client).await?;

    let started = Instant::now();
    let submitted = run_clients(&client, args.tasks, args.concurrency).await?;
    let wall = started.elapsed();

    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for (task, expected) in fetch_all(&client, submitted).await? {
        match check_task(&task, expected.answer) {
            Ok(latency) => latencies.push(latency),
            Err(why) => failures.push(format!("{}: {why}", expected.id)),
        }
    }
    let latencies = Samples::new(latencies);

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
    if !latencies.is_empty() {
        row("latency p50", millis(latencies.percentile(0.50)));
        row("latency p95", millis(latencies.percentile(0.95)));
    }
    row("failed", failures.len().to_string());
    report_failures(&failures);
    Ok(failures.len())
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
/// waiting for it to finish before taking the next.
async fn run_clients(
    client: &Client,
    tasks: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Submitted>> {
    let (polls, seen) = watch::channel(Arc::new(Poll::empty()));
    let watcher = tokio::spawn(watch_in_flight(client.clone(), polls));
    let next = Arc::new(AtomicUsize::new(0));
    let clients = (0..concurrency).map(|_| {
        let client = client.clone();
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
                let id = client.submit(&body).await?;
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

/// An engine configured as the host's (`build_engine` in
/// host/src/plugins/engine.rs, which is private: keep the two in step), with
/// the host's default [`EngineOptions`], optionally without pooling.
fn bare_engine(pooling: bool) -> anyhow::Result<Engine> {
    let options = EngineOptions::default();
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .max_wasm_stack(1 << 20)
        .async_stack_size(2 << 20);
    if pooling {
        let instances = options.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 8)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            .max_memory_size(usize::try_from(options.max_memory_bytes).unwrap_or(usize::MAX))
            .max_core_instance_size(4 << 20)
            .table_elements(1 << 16);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Ok(Engine::new(&config)?)
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
