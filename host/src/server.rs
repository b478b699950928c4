//! `opspawn serve`: wires the store, the plugin runtime, the scheduler and
//! the API together and runs until interrupted.

use std::fs::File;
use std::sync::Arc;

use anyhow::Context;

use crate::api::auth::Gate;
use crate::api::{self, Admission, AppParts, AppState};
use crate::config::Config;
use crate::events::EventBus;
use crate::plugins::PluginRuntime;
use crate::scheduler::Scheduler;
use crate::store;

/// Prints a line of the server's progress to stdout. Once stdout is gone
/// (its terminal closed, the process reading it exited) the line is lost,
/// and nothing else: `println!` would panic, and a panic on the way down
/// skips the wait for running steps.
macro_rules! say {
    ($($line:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($line)*);
    }};
}

/// How long open requests may take to finish once a shutdown was asked for.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(config: Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    for warning in config.deprecations() {
        tracing::warn!("{warning}");
    }
    let plugin_dir = config.plugin_dir();
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    std::fs::create_dir_all(&plugin_dir)
        .with_context(|| format!("cannot create the plugin folder {}", plugin_dir.display()))?;

    let database_url = config.database_url();
    let store = store::open(&database_url)
        .await
        .with_context(|| format!("cannot open the store at {database_url}"))?;
    let scrape = api::scrape::Scrape::new(&config.metrics).map(Arc::new);
    let store = match &scrape {
        Some(scrape) => {
            tokio::spawn(crate::metrics::keep_up(scrape.handle()));
            store::Metered::wrap(store)
        }
        None => store,
    };
    // An SQLite file belongs to one host: hold a lock for as long as we
    // serve, and since no other host can hold claims, take over at once the
    // tasks this host was running when it last stopped.
    let _lock = if store.engine() == "sqlite" {
        let lock = lock_data_dir(&config)?;
        let resumed = store.expire_all_leases().await?;
        if resumed > 0 {
            say!("resuming {resumed} task(s) interrupted when the server last stopped");
        }
        Some(lock)
    } else {
        None
    };

    let budgets = Arc::new(
        config
            .budgets()
            .map_err(|e| anyhow::anyhow!("invalid [prices] or [budgets]: {e}"))?,
    );
    config
        .approvals
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid [approvals]: {e}"))?;
    let runtime = PluginRuntime::new(config.runtime_options())
        .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e:#}"))?;
    // Listen at once; plugins load in the background meanwhile.
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another server using it?",
                config.addr
            )
        })?;
    let addr = listener.local_addr()?;
    let grpc_listener =
        match config.grpc.listen {
            Some(listen) => Some(tokio::net::TcpListener::bind(listen).await.with_context(
                || format!("cannot listen for gRPC on {listen}; is another server using it?"),
            )?),
            None => None,
        };
    let grpc_addr = grpc_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;
    // Plugins may not call the API that runs them (unless allowed).
    runtime.set_server_addresses(std::iter::once(addr).chain(grpc_addr).collect());
    let started = runtime
        .rescan()
        .await
        .with_context(|| format!("cannot read the plugin folder {}", plugin_dir.display()))?;
    if !started.loading.is_empty() {
        say!(
            "loading {} plugin(s) from {} in the background",
            started.loading.len(),
            plugin_dir.display()
        );
    }
    // MCP servers start in the background too; the host serves whatever
    // they do.
    let mcp = crate::mcp::McpClients::start(runtime.clone(), &config.mcp.servers);
    tokio::spawn(report_plugins_once_loaded(
        runtime.clone(),
        mcp.clone(),
        plugin_dir.clone(),
    ));
    let _watcher = if config.watch_plugins {
        Some(runtime.watch().context("cannot watch the plugin folder")?)
    } else {
        None
    };

    let pruner = tokio::spawn(prune_periodically(
        store.clone(),
        config.retention,
        config.prune_interval,
    ));
    let events = EventBus::default();
    let scheduler = Arc::new(Scheduler::start(
        store.clone(),
        runtime.clone(),
        events.clone(),
        config.scheduler_config(budgets.clone()),
    ));
    let schedule_wake = Arc::new(tokio::sync::Notify::new());
    let _schedules = crate::schedules::ScheduleRunner::start(
        store.clone(),
        events.clone(),
        scheduler.clone(),
        crate::schedules::QueueCaps {
            max_queued_tasks: config.max_queued_tasks,
            max_queued_per_tenant: config.max_queued_per_tenant,
        },
        config.schedules.clone(),
        schedule_wake.clone(),
    );
    let state = AppState::from(AppParts {
        store: store.clone(),
        runtime,
        scheduler: scheduler.clone(),
        events,
        defaults: Arc::new(config.defaults.clone()),
        gate: Arc::new(Gate::new(config.auth.clone())),
        admission: Arc::new(Admission::new(config.queue_limits())),
        scrape: scrape.clone(),
        schedule_wake,
        budgets,
        memory: Arc::new(config.memory.clone()),
    });
    let auth_enabled = state.gate.enabled();
    for addr in std::iter::once(addr).chain(grpc_addr) {
        if !auth_enabled && !addr.ip().is_loopback() {
            eprintln!(
                "WARNING: listening on {addr}, reachable from other machines, with authentication \
                 OFF: anyone who can connect can run tasks. Configure [auth] tokens \
                 (`opspawn token new --tenant NAME`) or listen on 127.0.0.1."
            );
            tracing::warn!(%addr, "listening on a non-loopback address without authentication");
        }
    }
    if config.metrics.enabled && config.metrics.token_sha256.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "GET /metrics is open to anyone who can connect (it names tenants and plugins); \
             set [metrics] token_sha256"
        );
    }
    let mcp_shutdown = tokio_util::sync::CancellationToken::new();
    let rest = api::app(state.clone(), config.max_body_bytes, &config.http);
    // One signal stops both listeners.
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let (shutdown, signal) = (shutdown.clone(), shutdown_signal());
        let events = state.events.clone();
        async move {
            signal.await;
            shutdown.cancel();
            // Requests waiting for a task answer now, within the drain.
            events.stop_waits();
        }
    });
    let grpc = match (grpc_listener, grpc_addr) {
        (Some(listener), Some(grpc_addr)) => {
            say!("opspawn gRPC listening on {grpc_addr}");
            let serving =
                crate::grpc::serve(listener, rest.clone(), shutdown.clone().cancelled_owned());
            Some(tokio::spawn(async move {
                if let Err(error) = serving.await {
                    tracing::error!(error = %format!("{error:#}"), "the gRPC server failed");
                }
            }))
        }
        _ => None,
    };
    let app = mount_mcp(rest, state, mcp_shutdown.clone(), config.max_body_bytes);
    let app = api::hygiene::around(app, &config.http.cors).map_err(anyhow::Error::msg)?;
    let app = match scrape {
        Some(_) => app.layer(axum::middleware::from_fn(api::scrape::count_request)),
        None => app,
    };
    let app = if crate::telemetry::traces_on() {
        app.layer(axum::middleware::from_fn(api::hygiene::trace_request))
    } else {
        app
    };
    say!(
        "data in {} (store: {database_url})",
        config.data_dir.display()
    );
    say!("opspawn listening on http://{addr}");
    api::connections::serve(
        listener,
        app,
        &config.http,
        shutdown.clone().cancelled_owned(),
        SHUTDOWN_DRAIN,
    )
    .await?;
    mcp_shutdown.cancel();
    // gRPC drained alongside HTTP; a WatchTask still open by now is cut.
    if let Some(mut grpc) = grpc
        && tokio::time::timeout(SHUTDOWN_DRAIN, &mut grpc)
            .await
            .is_err()
    {
        grpc.abort();
        tracing::warn!("gRPC calls still open after the drain period were cut off");
    }
    say!("shutting down: waiting for running steps to finish");
    scheduler.shutdown().await;
    mcp.shutdown().await;
    pruner.abort();
    Ok(())
}

/// Adds `/mcp` (MCP over streamable HTTP) to the REST API, behind the same
/// bearer tokens; it calls the REST API in-process.
fn mount_mcp(
    rest: axum::Router,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
    max_body_bytes: usize,
) -> axum::Router {
    let service = crate::mcp::server::http_service(rest.clone(), shutdown, max_body_bytes);
    let mcp = axum::Router::new()
        .route_service("/mcp", service)
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            api::auth::require_token,
        ));
    rest.merge(mcp)
}

/// Prints what loaded from the plugin folder once the loads that started
/// with the server have finished, then `plugins ready`.
async fn report_plugins_once_loaded(
    runtime: Arc<PluginRuntime>,
    mcp: Arc<crate::mcp::McpClients>,
    plugin_dir: std::path::PathBuf,
) {
    runtime.loaded().await;
    mcp.started().await;
    let catalog = runtime.catalog();
    say!("plugins from {}:", plugin_dir.display());
    for plugin in catalog.plugins() {
        let tools: Vec<&str> = plugin.tools.iter().map(|t| t.name.as_str()).collect();
        let offers = if tools.is_empty() {
            String::new()
        } else {
            format!(" (tools: {})", tools.join(", "))
        };
        say!(
            "  loaded  {:<18} {:<11} {}{offers}",
            plugin.name,
            plugin.kind,
            &plugin.sha256[..12]
        );
    }
    for failure in catalog.failures() {
        say!("  skipped {}: {}", failure.file.display(), failure.error);
    }
    if catalog.plugins().next().is_none() {
        say!("  (none: drop .wasm components into the folder; they load without a restart)");
    }
    for server in mcp.views() {
        let tools: Vec<&str> = server["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str())
            .collect();
        let name = server["name"].as_str().unwrap_or_default();
        match server["status"].as_str() {
            Some("ready") => say!(
                "  mcp     {name:<18} ready       (tools: {})",
                tools.join(", ")
            ),
            status => say!(
                "  mcp     {name:<18} {:<11} {}",
                status.unwrap_or_default(),
                server["error"].as_str().unwrap_or_default()
            ),
        }
    }
    say!("plugins ready");
}

/// Deletes finished tasks older than the retention period, now and then.
async fn prune_periodically(
    store: Arc<dyn store::Store>,
    retention: std::time::Duration,
    interval: std::time::Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let before = store::now_millis() - retention.as_millis() as i64;
        match store.prune_finished(before).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "deleted finished tasks past their retention"),
            Err(error) => tracing::warn!(%error, "pruning finished tasks failed"),
        }
    }
}

fn lock_data_dir(config: &Config) -> anyhow::Result<File> {
    let path = config.data_dir.join("opspawn.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another opspawn server is using {}; stop it or choose another --data-dir",
            config.data_dir.display()
        )
    })?;
    Ok(file)
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when it is first polled, so that a signal sent once the
/// server said it listens is never missed (the default action would end the
/// process at once, without waiting for running steps).
fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Raises this process's soft limit on open files to its hard limit: each
/// task waiting on a provider holds a connection, and thousands may wait at
/// once. Failing to raise it is logged, not fatal.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(
                    soft = limit.rlim_cur,
                    "could not raise the open-file limit; many waiting tasks may run out of sockets"
                );
            }
        }
    }
}
