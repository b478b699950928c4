//! Opspawn's benchmark: prints what this machine does, asserts nothing.
//!
//! 1. **End-to-end throughput.** A real `opspawn serve` child process (SQLite
//!    store, the example plugins, its default log level) runs N three-step
//!    tasks: the scripted LLM asks for the calculator, the calculator answers,
//!    the LLM gives the final answer. C clients submit them over REST in a
//!    closed loop: each keeps one task in flight and submits the next once it
//!    has finished, so C is the number of tasks in flight. One watcher polls
//!    the queued and running lists every 20 ms for all clients, which keeps
//!    the polling light next to the work measured (with `--wait-in-request`,
//!    each client's submission waits for its task instead: `Prefer: wait=N`).
//!    Latency is the server's own `created_at` to `finished_at`. The bench's
//!    own CPU per task (its clients) is printed too: both share the machine.
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
//! 6. **What metrics and traces cost**: see [`telemetry`].
//!
//! A run that is interrupted leaves its schemas (`bench_…`) behind.
//!
//! Timings are medians and upper percentiles, not means: on a shared machine
//! a few samples land on a descheduled thread or a page fault, and they would
//! drag a mean far from the typical cost.

use std::process::ExitCode;
use std::time::Duration;

mod end_to_end;
mod failover;
mod per_call;
mod postgres;
mod slow_llm;
mod stats;
mod telemetry;

// The benchmark shares the machine with the server it measures: its clients
// and its mock provider (thousands of TLS streams in the slow-LLM section)
// allocate as much as the server does, and glibc's allocator took about a
// sixth of the benchmark's own CPU there. The server uses the same one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, bail};
use end_to_end::end_to_end;
use failover::failover;
use per_call::per_call;
use postgres::postgres_throughput;

const USAGE: &str = "usage: opspawn-bench [--tasks N (300)] [--concurrency C (16)] [--calls N (2000)] \
     [--slow-llm-tasks N (10000; 0 skips the section)] \
     [--slow-llm-provider tls|tls-http1|cleartext (tls: HTTPS offering HTTP/2, as hosted \
     providers are)] \
     [--telemetry-rounds N (3; 0 skips the section)] [--only SECTION] \
     [--postgres URL (none: skip the Postgres sections)] \
     [--threads (each client's tasks continue a conversation thread of its own)] \
     [--memory (each task's tool call saves a memory instead of calculating)] \
     [--wait-in-request (one host: each client waits on its submission, Prefer: wait=N, \
     instead of a shared watcher polling the task lists)]\n\
     sections: end-to-end, per-call, slow-llm, telemetry, postgres";
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
        failed += slow_llm::run(args.slow_llm_tasks, args.slow_llm_provider).await?;
        measured += args.slow_llm_tasks;
        println!();
    }
    if args.runs("telemetry") && args.telemetry_rounds > 0 {
        failed += telemetry::run(&args, args.telemetry_rounds).await?;
        measured += args.tasks * 3 * args.telemetry_rounds;
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
    /// How the slow-LLM section's mock provider serves.
    slow_llm_provider: slow_llm::ProviderKind,
    /// Rounds of the metrics-and-traces section (each runs all three settings).
    telemetry_rounds: usize,
    /// Run only this section.
    only: Option<String>,
    /// The Postgres database for the Postgres sections; none skips them.
    postgres: Option<String>,
    /// Each client submits its tasks in a thread of its own, so every task
    /// but a client's first is given the earlier ones as history.
    threads: bool,
    /// Each task's tool call saves a memory (the example memory tool, in
    /// its client's namespace) instead of calling the calculator.
    memory: bool,
    /// With one host, each client waits on its own submission (`Prefer:
    /// wait=N`) instead of on the shared watcher of the task lists.
    wait_in_request: bool,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Self {
            tasks: 300,
            concurrency: 16,
            calls: 2000,
            slow_llm_tasks: 10_000,
            slow_llm_provider: slow_llm::ProviderKind::Tls,
            telemetry_rounds: 3,
            only: None,
            postgres: None,
            threads: false,
            memory: false,
            wait_in_request: false,
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            let slot = match flag.as_str() {
                "--tasks" => &mut args.tasks,
                "--concurrency" => &mut args.concurrency,
                "--calls" => &mut args.calls,
                "--slow-llm-tasks" | "--telemetry-rounds" => {
                    let value = argv
                        .next()
                        .with_context(|| format!("{flag} needs a value"))?;
                    let count = value
                        .parse()
                        .with_context(|| format!("{flag} {value:?} is not a number"))?;
                    if flag == "--slow-llm-tasks" {
                        args.slow_llm_tasks = count;
                    } else {
                        args.telemetry_rounds = count;
                    }
                    continue;
                }
                "--slow-llm-provider" => {
                    let kind = argv
                        .next()
                        .with_context(|| format!("{flag} needs a kind"))?;
                    args.slow_llm_provider = kind.parse()?;
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
                "--threads" => {
                    args.threads = true;
                    continue;
                }
                "--memory" => {
                    args.memory = true;
                    continue;
                }
                "--wait-in-request" => {
                    args.wait_in_request = true;
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
const SECTIONS: [&str; 5] = [
    "end-to-end",
    "per-call",
    "slow-llm",
    "telemetry",
    "postgres",
];
