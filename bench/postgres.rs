//! Section 3: End-to-end throughput on Postgres with one and several hosts, each
//! run on a fresh schema.

use anyhow::Context;
use opspawn_testkit::{Client, Server};
use sqlx::Connection;
use std::path::Path;
use std::time::SystemTime;

use crate::end_to_end::{
    ScratchDir, Throughput, cpu_per_task, report_failures, server_binary, throughput,
};
use crate::stats::{millis, row};
use crate::{Args, HOST_COUNTS, SERVER_LOG};

/// Runs the end-to-end measurement on Postgres with each of [`HOST_COUNTS`]
/// hosts, and returns how many tasks failed.
pub(crate) async fn postgres_throughput(args: &Args, url: &str) -> anyhow::Result<usize> {
    check_connection(url).await?;
    let binary = server_binary()?;
    let plugins = crate::end_to_end::bench_plugins(args);

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
            client_cpu: _,
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
pub(crate) async fn check_connection(url: &str) -> anyhow::Result<()> {
    let conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    conn.close().await?;
    Ok(())
}

/// A schema of its own for one run, which the hosts' store creates. It must
/// be dropped with [`Schema::drop_schema`] once the hosts are gone.
pub(crate) struct Schema {
    /// The database URL without the schema.
    pub(crate) url: String,
    pub(crate) name: String,
}

impl Schema {
    pub(crate) fn new(url: &str, label: &str) -> Self {
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
    pub(crate) fn database_url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}opspawn_schema={}", self.url, self.name)
    }

    pub(crate) async fn drop_schema(&self) -> anyhow::Result<()> {
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
pub(crate) struct Cluster {
    /// Declared first, so the servers are killed before their directories
    /// are removed.
    pub(crate) servers: Vec<Server>,
    pub(crate) _data: Vec<ScratchDir>,
}

impl Cluster {
    /// Starts `hosts` servers one after the other, each with `env` added.
    pub(crate) fn start(
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
    pub(crate) fn add(
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
    pub(crate) fn clients_with_pids(&self) -> Vec<(Client, u32)> {
        self.servers.iter().map(|s| (s.client(), s.pid())).collect()
    }
}
