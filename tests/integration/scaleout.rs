//! Scale-out on Postgres: several `opspawn serve` processes share one
//! database (one schema), each with its own data directory and the same
//! plugin folder. Hosts die (`kill -9`) or stall (`SIGSTOP`) mid-run; their
//! tasks are taken over by the others once their leases expire, no journaled
//! step runs twice, and a stalled host's late writes are fenced off.
//!
//! These need Postgres, so they are ignored by default; `scripts/test.sh`
//! runs them with `OPSPAWN_TEST_DATABASE=postgres` and `--include-ignored`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opspawn_testkit::{Client, Server, StatusCode};
use serde_json::{Value, json};

use crate::{FINISH, Harness, binary, signal, steps};

/// Why these tests are ignored unless asked for.
const NEEDS_POSTGRES: &str = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres";

/// Fails a test asked for without Postgres, rather than passing it unrun.
fn require_postgres() {
    assert_eq!(
        std::env::var("OPSPAWN_TEST_DATABASE").as_deref(),
        Ok("postgres"),
        "{NEEDS_POSTGRES}"
    );
}

/// Hosts sharing the harness's database and schema: host 0 is the harness's
/// server, the others are started beside it with the same plugin folder.
struct Cluster {
    /// Declared first so they are dropped (killed) before the harness drops
    /// the schema.
    others: Vec<Server>,
    _data: Vec<tempfile::TempDir>,
    harness: Harness,
}

impl Cluster {
    /// Starts `hosts` servers, each with `env` in its environment.
    fn start(hosts: usize, env: &[(&str, &str)]) -> Self {
        let harness = Harness::start_with(env);
        let mut cluster = Self {
            others: Vec::new(),
            _data: Vec::new(),
            harness,
        };
        for _ in 1..hosts {
            cluster.add(env);
        }
        cluster
    }

    /// Starts one more host on the same database.
    fn add(&mut self, env: &[(&str, &str)]) -> &mut Server {
        let url = self.database_url();
        let mut server_env = vec![("OPSPAWN_DATABASE_URL", url.as_str())];
        server_env.extend_from_slice(env);
        let data = tempfile::tempdir().unwrap();
        let server = Server::start(
            binary(),
            data.path(),
            self.harness.plugins.path(),
            &server_env,
        )
        .expect("another host starts");
        self._data.push(data);
        self.others.push(server);
        self.others.last_mut().unwrap()
    }

    /// The URL every host uses, schema included.
    fn database_url(&self) -> String {
        let (url, schema) = self.postgres();
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}opspawn_schema={schema}")
    }

    /// The database URL without the schema, and the schema.
    fn postgres(&self) -> (&str, &str) {
        let (url, schema) = self.harness.postgres.as_ref().expect("on Postgres");
        (url, schema)
    }

    fn len(&self) -> usize {
        1 + self.others.len()
    }

    fn host(&mut self, index: usize) -> &mut Server {
        match index {
            0 => &mut self.harness.server,
            n => &mut self.others[n - 1],
        }
    }

    fn client(&mut self, index: usize) -> Client {
        self.host(index).client()
    }

    /// The scheduler ids (`host-…`) each host has had, over its restarts,
    /// from the hosts' logs.
    fn scheduler_ids(&mut self) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for index in 0..self.len() {
            for line in self.host(index).log().lines() {
                if !line.contains("scheduler started") {
                    continue;
                }
                if let Some(at) = line.find("host=host-") {
                    let id: String = line[at + "host=".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    ids.insert(id, index);
                }
            }
        }
        ids
    }
}

/// Records, while it runs, which worker held each claim (task, attempt):
/// the store clears the owner when a task ends, so it must be seen live.
struct OwnerWatch {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<HashMap<(String, i64), String>>,
}

impl OwnerWatch {
    fn start(url: &str, schema: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, schema, flag) = (url.to_owned(), schema.to_owned(), stop.clone());
        let handle = tokio::spawn(async move {
            use sqlx::Connection;
            let mut owners = HashMap::new();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            // The name is the harness's: t_ and hex digits.
            let query = format!(
                "SELECT id, attempt, lease_owner FROM \"{schema}\".tasks
                  WHERE status = 'running' AND lease_owner IS NOT NULL"
            );
            while !flag.load(Ordering::Relaxed) {
                let rows: Vec<(String, i64, String)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(query.clone()))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for (id, attempt, owner) in rows {
                    owners.insert((id, attempt), owner);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            owners
        });
        Self { stop, handle }
    }

    async fn finish(self) -> HashMap<(String, i64), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

const TASKS: usize = 500;
const KILLS: usize = 6;
const HOSTS: usize = 3;
/// Tasks running at once per host: a bound on the steps in flight at a kill.
const MAX_RUNNING: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
async fn three_hosts_on_one_database_survive_repeated_kill_9() {
    require_postgres();
    let max_running = MAX_RUNNING.to_string();
    let env = [
        ("OPSPAWN_LEASE", "2s"),
        ("OPSPAWN_MAX_RUNNING_TASKS", max_running.as_str()),
    ];
    let mut cluster = Cluster::start(HOSTS, &env);
    let (url, schema) = cluster.postgres();
    let watch = OwnerWatch::start(url, schema);
    let started = Instant::now();

    let clients: Vec<Client> = (0..HOSTS).map(|i| cluster.client(i)).collect();
    let submitted = futures::future::join_all((0..TASKS).map(|n| {
        let client = clients[n % HOSTS].clone();
        async move {
            client
                .submit(&crate::crash::counting_task(n))
                .await
                .unwrap()
        }
    }))
    .await;
    let submitting = started.elapsed();

    // Kill each host in turn, and bring it straight back (as a new host: it
    // has a new scheduler id, and its old claims wait for their leases).
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let host = cluster.host(kill % HOSTS);
        host.kill9();
        host.restart().unwrap();
    }
    let killing = started.elapsed();

    // Wait through any live host: all of them are back by now.
    let client = cluster.client(0);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut tasks = HashMap::new();
    for id in &submitted {
        let left = deadline.saturating_duration_since(Instant::now());
        let task = client.wait_until_finished(id, left).await.unwrap();
        tasks.insert(id.clone(), task);
    }
    let finished = started.elapsed();
    let owners = watch.finish().await;

    let failed: Vec<&Value> = tasks
        .values()
        .filter(|t| t["status"] != "succeeded")
        .collect();
    assert!(
        failed.is_empty(),
        "{} tasks did not succeed, such as {:#}",
        failed.len(),
        failed[0]
    );

    // What the counting tool saw, across the three hosts: one line per
    // execution.
    let log = std::fs::read_to_string(cluster.harness.plugins.path().join("counts/log")).unwrap();
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

    let mut journaled = HashSet::new();
    let mut repeated = 0;
    for (id, task) in &tasks {
        for step in steps(task) {
            if step["kind"] != "tool" {
                continue;
            }
            let seq = step["seq"].as_u64().unwrap();
            journaled.insert((id.clone(), seq));
            let runs = executions.get(&(id.clone(), seq)).copied().unwrap_or(0);
            assert!(runs >= 1, "journaled step {seq} of {id} never ran");
            if runs > 1 {
                // Only a step in flight at a kill runs again, once per later
                // claim: at most twice unless it was in flight at two kills.
                let attempt = step["attempt"].as_i64().unwrap();
                assert!(
                    attempt > 1 && runs as i64 <= attempt,
                    "step {seq} of {id} ran {runs} times: {step:#}"
                );
                repeated += runs - 1;
            }
        }
    }
    let unjournaled: Vec<_> = executions
        .keys()
        .filter(|key| !journaled.contains(*key))
        .collect();
    assert!(
        unjournaled.is_empty(),
        "tool calls that no step records: {unjournaled:?}"
    );
    assert!(
        repeated <= KILLS * MAX_RUNNING,
        "{repeated} re-runs; at most {} steps can be in flight at {KILLS} kills",
        KILLS * MAX_RUNNING
    );

    let resumed: Vec<&String> = tasks
        .iter()
        .filter(|(_, t)| t["attempt"].as_i64().unwrap() > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        !resumed.is_empty(),
        "the kills interrupted some tasks (else this test proves nothing)"
    );

    // Which host held each claim: a resumed task whose next claim was seen
    // on another host than its previous one moved between hosts.
    let hosts = cluster.scheduler_ids();
    let host_of = |id: &str, attempt: i64| {
        let owner = owners.get(&(id.to_owned(), attempt))?;
        let scheduler = owner.split('/').next()?;
        hosts.get(scheduler).copied()
    };
    let mut moved = 0;
    let mut seen = 0;
    for id in &resumed {
        let last = tasks[*id]["attempt"].as_i64().unwrap();
        for attempt in 2..=last {
            if let (Some(before), Some(after)) = (host_of(id, attempt - 1), host_of(id, attempt)) {
                seen += 1;
                if before != after {
                    moved += 1;
                }
            }
        }
    }
    assert!(
        moved > 0,
        "no task moved to another host ({seen} take-overs seen, {} claims watched, {} scheduler ids)",
        owners.len(),
        hosts.len()
    );
    let claims_by_host = owners.values().fold(vec![0; HOSTS], |mut count, owner| {
        if let Some(host) = owner.split('/').next().and_then(|s| hosts.get(s)) {
            count[*host] += 1;
        }
        count
    });
    println!(
        "{TASKS} tasks on {HOSTS} hosts, {KILLS} kills: submitted in {submitting:.1?}, kills done at \
         {killing:.1?}, all finished at {finished:.1?}; {} tasks resumed, {moved} of {seen} \
         take-overs seen moved to another host; {repeated} in-flight steps re-ran; claims \
         seen per host {claims_by_host:?}",
        resumed.len()
    );
}

/// A task of slow steps: six 300 ms sleeps, each its own LLM turn.
fn slow_task() -> Value {
    sleep_task([0; 7])
}

/// [`slow_task`], with LLM turn `i` (step `2 * i + 1`) answering after
/// `reply_delays_ms[i]`.
fn sleep_task(reply_delays_ms: [u64; 7]) -> Value {
    let sleep = json!({"name": "sleep", "arguments": {"ms": 300}});
    let script: Vec<Value> = reply_delays_ms
        .iter()
        .enumerate()
        .map(|(turn, delay_ms)| match turn {
            6 => json!({"delay_ms": delay_ms, "content": "Final Answer: slept"}),
            _ => json!({"delay_ms": delay_ms, "tool_calls": [sleep]}),
        })
        .collect();
    json!({
        "goal": "Sleep six times",
        "tools": ["sleep"],
        "options": {"llm": {"script": script}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
async fn a_stalled_host_cannot_write_over_the_host_that_took_its_task() {
    require_postgres();
    let env = [("OPSPAWN_LEASE", "2s"), ("OPSPAWN_MAX_RUNNING_TASKS", "1")];
    let mut cluster = Cluster::start(1, &env);
    let a = cluster.client(0);
    // Step 5, the third LLM turn, takes long enough for the polls below
    // to see it running on a busy machine.
    let id = a
        .submit(&sleep_task([0, 0, 4_000, 0, 0, 0, 0]))
        .await
        .unwrap();
    a.wait_for(&id, FINISH, |t| t["status"] == "running")
        .await
        .unwrap();
    // B starts only now, so A has the task.
    let b = cluster.add(&env).client();

    // Stop A while step 5 is in flight.
    a.wait_for(&id, FINISH, |t| {
        steps(t).len() == 5 && steps(t)[4]["status"] == "running"
    })
    .await
    .unwrap();
    signal(&cluster.harness.server, "-STOP");
    let stopped = Instant::now();
    // Whatever A had sent before it stopped has landed by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b.task(&id).await.unwrap();
    assert_eq!(before["attempt"], 1, "{before:#}");
    let finished_by_a: HashMap<u64, Value> = steps(&before)
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .map(|s| (s["seq"].as_u64().unwrap(), s.clone()))
        .collect();
    assert_eq!(finished_by_a.len(), 4, "steps 1 to 4: {before:#}");

    // B takes the task over once A's lease expires, and finishes it, all
    // while A is stopped.
    let done = b.wait_until_finished(&id, FINISH).await.unwrap();
    let stalled = stopped.elapsed();
    assert!(
        stalled > Duration::from_secs(2),
        "B waited for the lease: {stalled:?}"
    );
    signal(&cluster.harness.server, "-CONT");

    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["result"], "slept");
    assert_eq!(done["attempt"], 2, "B's claim, the second");
    let done_steps = steps(&done);
    assert_eq!(done_steps.len(), 13, "{done:#}");
    for step in done_steps {
        let seq = step["seq"].as_u64().unwrap();
        assert_eq!(step["status"], "succeeded", "{step:#}");
        match finished_by_a.get(&seq) {
            Some(by_a) => assert_eq!(step, by_a, "a step A finished stays as A wrote it"),
            None => assert_eq!(step["attempt"], 2, "a step B ran: {step:#}"),
        }
    }

    // A wakes up and finds its claim gone (or, had it stopped in the middle
    // of a write, its connection ended). Nothing it does now lands.
    let a = cluster.client(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let noticed = |log: String| log.contains("another worker") || log.contains("the store failed");
    while !noticed(cluster.harness.server.log()) {
        assert!(
            Instant::now() < deadline,
            "A never noticed it lost the claim; its log:\n{}",
            cluster.harness.server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.task(&id).await.unwrap(), done, "unchanged, seen from B");
    assert_eq!(a.task(&id).await.unwrap(), done, "unchanged, seen from A");

    let events = b.events(&id, None, FINISH).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "numbered without gaps or repeats"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "task.finished").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"task.finished"));
    let claims: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "task.started")
        .map(|e| &e.data["data"]["attempt"])
        .collect();
    assert_eq!(claims, [&json!(1), &json!(2)]);
    // After B's claim, every step event is B's.
    let (takeover, _) = kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| **k == "task.started")
        .nth(1)
        .unwrap();
    for event in &events[takeover..] {
        if event.event.starts_with("step.") {
            assert_eq!(event.data["data"]["attempt"], 2, "{event:?}");
        }
    }
    println!(
        "A stopped for {stalled:.1?}; B finished the task with {} events",
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
async fn a_cancel_on_one_host_stops_the_task_running_on_another_at_once() {
    require_postgres();
    // A long lease: renewal alone would notice the cancel only after 10 s.
    let env = [("OPSPAWN_LEASE", "30s")];
    let mut cluster = Cluster::start(1, &env);
    let a = cluster.client(0);
    let id = a.submit(&slow_task()).await.unwrap();
    a.wait_for(&id, FINISH, |t| steps(t).len() >= 2)
        .await
        .unwrap();
    let b = cluster.add(&env).client();

    let asked = Instant::now();
    let (status, body) = b
        .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = b.wait_until_finished(&id, FINISH).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(done["status"], "cancelled", "{done:#}");
    assert_eq!(done["attempt"], 1, "host A stopped it itself");
    assert!(
        took < Duration::from_secs(5),
        "stopped after {took:?}, not at a lease renewal"
    );
}

/// A task of one LLM reply that takes `delay_ms`.
fn reply_task(goal: &str, delay_ms: u64, priority: i32) -> Value {
    json!({
        "goal": goal,
        "tools": [],
        "priority": priority,
        "options": {"llm": {"script": [
            {"delay_ms": delay_ms, "content": "Final Answer: replied"}
        ]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
async fn a_dead_hosts_tasks_move_ahead_of_fresh_work_on_a_saturated_host() {
    require_postgres();
    const LEASE: Duration = Duration::from_secs(3);
    const ORPHANS: usize = 4;
    const FRESH: usize = 150;
    const SLOTS: &str = "4";
    let env = [
        ("OPSPAWN_LEASE", "3s"),
        ("OPSPAWN_MAX_RUNNING_TASKS", SLOTS),
    ];
    let mut cluster = Cluster::start(1, &env);
    let a = cluster.client(0);
    // A runs tasks that outlast the test: six LLM replies of 5 s each.
    let calculate = json!({"name": "calculator", "arguments": {"expression": "1+1"}});
    let script: Vec<Value> = (0..6)
        .map(|_| json!({"delay_ms": 5000, "tool_calls": [calculate]}))
        .collect();
    let mut orphans = Vec::new();
    for n in 0..ORPHANS {
        let task = json!({
            "goal": format!("orphan {n}"),
            "tools": ["calculator"],
            "options": {"llm": {"script": script}}
        });
        orphans.push(a.submit(&task).await.unwrap());
    }
    for id in &orphans {
        a.wait_for(id, FINISH, |t| t["status"] == "running")
            .await
            .unwrap();
    }

    // B starts only now, and is kept saturated: its slots busy with short
    // tasks and its queue full of more, all more urgent than A's tasks, so
    // only the expired-leases-first rule puts A's tasks ahead of them.
    let b = cluster.add(&env).client();
    futures::future::join_all((0..FRESH).map(|n| {
        let b = b.clone();
        async move {
            b.submit(&reply_task(&format!("fresh {n}"), 250, 10))
                .await
                .unwrap()
        }
    }))
    .await;
    // B claims its first batch within a moment of starting; wait for it.
    let busy_by = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, running) = b.get("/v1/tasks?status=running&limit=500").await.unwrap();
        let running = running["tasks"].as_array().unwrap().len();
        if running >= ORPHANS + 2 {
            break;
        }
        assert!(Instant::now() < busy_by, "B is busy: {running} running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    cluster.host(0).kill9();
    let killed = Instant::now();
    let mut taken_over = Vec::new();
    for id in &orphans {
        b.wait_for(id, FINISH, |t| t["attempt"] == 2).await.unwrap();
        taken_over.push(killed.elapsed());
    }
    let (_, queued) = b.get("/v1/tasks?status=queued&limit=500").await.unwrap();
    let still_queued = queued["tasks"].as_array().unwrap().len();

    let slowest = taken_over.iter().max().copied().unwrap_or_default();
    assert!(
        slowest <= LEASE + Duration::from_secs(1),
        "A's tasks moved to B {taken_over:?} after the kill; the lease is {LEASE:?}"
    );
    assert!(
        still_queued > 0,
        "fresh work was still waiting when A's tasks moved, so they went ahead of it"
    );
    println!(
        "A's {ORPHANS} tasks moved to saturated B {taken_over:.1?} after kill -9 \
         (lease {LEASE:?}); {still_queued} fresh tasks still queued"
    );
}

/// Three hosts, each running its schedule loop, on one database: a schedule
/// ticking every second gets exactly one run per tick over several seconds,
/// with no tick twice and none left out, whichever host fires it; each run
/// runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres: run with OPSPAWN_TEST_DATABASE=postgres"]
async fn a_schedule_runs_once_per_tick_on_three_hosts() {
    use crate::schedules::{assert_consecutive, create_schedule, runs};
    require_postgres();
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.client(0);
    let id = create_schedule(
        &client,
        &json!({"cron": "* * * * * *", "task": crate::calculator_task("1+1", "2")}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Paused through another host: the pause is the same row everywhere.
    let third = cluster.client(2);
    let paused = third
        .http()
        .post(third.url(&format!("/v1/schedules/{id}/pause")))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), StatusCode::OK);
    let runs = runs(&cluster.client(1), &id).await;
    let ticks: Vec<i64> = runs.iter().map(|(tick, _)| *tick).collect();
    assert!(ticks.len() >= 6, "a run for each of 8 seconds: {ticks:?}");
    assert_consecutive(&ticks, "three hosts");
    for (_, task) in &runs {
        let done = client
            .wait_until_finished(task["id"].as_str().unwrap(), FINISH)
            .await
            .unwrap();
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}
