//! Section 4: Failover: how long the tasks of a host killed with SIGKILL take to
//! start again on another.

use anyhow::{Context, anyhow, bail};
use opspawn_testkit::PluginFolder;
use serde_json::{Value, json};
use sqlx::Connection;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::end_to_end::{calculator_task, check_task, server_binary, timestamp};
use crate::postgres::{Cluster, Schema, check_connection};
use crate::stats::{Samples, millis, row};
use crate::{FAILOVER_LEASE, FAILOVER_RUNS, FAILOVER_TASKS, SLOW_REPLY_MS, TASK_TIMEOUT};

/// Measures [`FAILOVER_RUNS`] times how long the tasks of a host killed with
/// SIGKILL take to start again on another.
pub(crate) async fn failover(url: &str) -> anyhow::Result<()> {
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
pub(crate) struct Failover {
    /// Per task, from the kill to its `task.started` with attempt 2.
    pub(crate) restarts: Vec<Duration>,
    /// Per task, how long its lease still had to run at the kill.
    pub(crate) lease_left: Vec<Duration>,
}

/// One failover: A claims the slow tasks, B starts, A is killed `wait`
/// after B is up, B resumes the tasks and they succeed.
pub(crate) async fn failover_once(
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
pub(crate) fn slow_task(n: usize) -> (Value, i64) {
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
pub(crate) async fn lease_left(
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
pub(crate) fn span(times: &[Duration]) -> String {
    let ms = |d: &Duration| d.as_millis();
    match (times.iter().min(), times.iter().max()) {
        (Some(low), Some(high)) => format!("{}-{} ms", ms(low), ms(high)),
        _ => "-".to_owned(),
    }
}
