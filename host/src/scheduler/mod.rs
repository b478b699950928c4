//! The scheduler: a bounded pool of workers that claim tasks from the store
//! with leases, run each through the agent loop, and keep the lease alive
//! while they do.

mod agent;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::EventBus;
use crate::plugins::PluginRuntime;
use crate::store::{Claim, Store, StoreError};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How many tasks run at once on this host.
    pub workers: usize,
    /// How long a claim lasts without renewal; a dead host's tasks are
    /// reclaimed this long after its last renewal.
    pub lease: Duration,
    /// How often idle workers look for work they were not woken for:
    /// expired leases, start times come, and tasks submitted to another host
    /// when the store's wake-up for them was lost.
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
}

/// How long to wait before retrying a step that failed with a transient
/// error (a rate limit, a provider outage, a plugin timeout): exponential
/// backoff with jitter, or the provider's own `Retry-After`, capped. How many
/// retries a task gets is its own `max_retries`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry + 1`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let delay = retry_after.unwrap_or_else(|| {
            let exponential = self.base_delay.saturating_mul(1 << retry.min(16));
            // Full jitter in the upper half keeps retries from moving in step.
            let jitter = rand_fraction();
            exponential.mul_f64(0.5 + jitter / 2.0)
        });
        delay.min(self.max_delay)
    }
}

/// A fraction in [0, 1) from the clock; good enough to spread retries.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            workers: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            retry: RetryPolicy::default(),
        }
    }
}

pub struct Scheduler {
    shared: Arc<Shared>,
    workers: tokio::sync::Mutex<JoinSet<()>>,
}

struct Shared {
    store: Arc<dyn Store>,
    runtime: Arc<PluginRuntime>,
    events: EventBus,
    config: SchedulerConfig,
    host_id: String,
    wake: Notify,
    shutdown: CancellationToken,
    /// Cancel tokens of the tasks running on this host.
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Scheduler {
    /// Starts the worker pool.
    pub fn start(
        store: Arc<dyn Store>,
        runtime: Arc<PluginRuntime>,
        events: EventBus,
        config: SchedulerConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            store,
            runtime,
            events,
            host_id: format!("host-{}", uuid::Uuid::now_v7().simple()),
            config,
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            running: Mutex::new(HashMap::new()),
        });
        let mut workers = JoinSet::new();
        for index in 0..shared.config.workers.max(1) {
            workers.spawn(work(shared.clone(), index));
        }
        if let Some(cancellations) = shared.store.cancellations() {
            workers.spawn(cancel_when_told(shared.clone(), cancellations));
        }
        tracing::info!(host = %shared.host_id, workers = shared.config.workers, "scheduler started");
        Self {
            shared,
            workers: tokio::sync::Mutex::new(workers),
        }
    }

    /// Tells an idle worker that a task is waiting.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Stops a task running on this host at its next step boundary. (Tasks
    /// running elsewhere see the request when they renew their lease.)
    pub fn cancel_local(&self, task_id: &str) {
        if let Some(token) = self
            .shared
            .running
            .lock()
            .expect("running lock")
            .get(task_id)
        {
            token.cancel();
        }
    }

    /// Stops claiming new tasks and waits for running ones to reach a step
    /// boundary. Interrupted tasks keep their journal and resume elsewhere.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let mut workers = self.workers.lock().await;
        while workers.join_next().await.is_some() {}
    }
}

/// Stops tasks running here whose cancellation another host accepted.
async fn cancel_when_told(
    shared: Arc<Shared>,
    mut cancellations: tokio::sync::broadcast::Receiver<String>,
) {
    loop {
        tokio::select! {
            received = cancellations.recv() => match received {
                Ok(task_id) => {
                    if let Some(token) = shared.running.lock().expect("running lock").get(&task_id) {
                        token.cancel();
                    }
                }
                // Missed notices are caught at lease renewal.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

async fn work(shared: Arc<Shared>, index: usize) {
    let worker = format!("{}/{index}", shared.host_id);
    // Tasks submitted to other hosts sharing the store (Postgres).
    let elsewhere = shared.store.wakeups();
    while !shared.shutdown.is_cancelled() {
        match shared.store.claim_next(&worker, shared.config.lease).await {
            Ok(Some(claim)) => run_claimed(&shared, claim).await,
            Ok(None) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = notified(elsewhere.as_deref()) => {}
                    _ = tokio::time::sleep(shared.config.poll_interval) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "claiming a task failed; retrying");
                tokio::time::sleep(shared.config.poll_interval).await;
            }
        }
    }
}

/// Waits for `notify`, or forever when there is none.
async fn notified(notify: Option<&Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

async fn run_claimed(shared: &Arc<Shared>, claim: Claim) {
    let task_id = claim.task.id.clone();
    let cancel = CancellationToken::new();
    if claim.task.cancel_requested {
        cancel.cancel();
    }
    shared
        .running
        .lock()
        .expect("running lock")
        .insert(task_id.clone(), cancel.clone());
    shared.events.journaled(claim.event.clone());

    let lost = CancellationToken::new();
    let renewal = tokio::spawn(keep_lease(
        shared.clone(),
        claim.fence.clone(),
        cancel.clone(),
        lost.clone(),
    ));
    agent::Run::new(shared.clone(), claim, cancel, lost)
        .run()
        .await;
    renewal.abort();
    shared
        .running
        .lock()
        .expect("running lock")
        .remove(&task_id);
}

/// Renews the claim's lease until aborted; notices cancellation requested
/// through the store and a claim taken over by another worker.
async fn keep_lease(
    shared: Arc<Shared>,
    fence: crate::store::Fence,
    cancel: CancellationToken,
    lost: CancellationToken,
) {
    let period = shared.config.lease / 3;
    loop {
        tokio::time::sleep(period).await;
        match shared.store.renew_lease(&fence, shared.config.lease).await {
            Ok(state) if state.cancel_requested => cancel.cancel(),
            Ok(_) => {}
            Err(StoreError::Fenced { .. }) => {
                tracing::warn!(task = %fence.task_id, attempt = fence.attempt, "lease lost to another worker");
                lost.cancel();
                return;
            }
            Err(error) => tracing::warn!(task = %fence.task_id, %error, "renewing a lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_and_honour_retry_after() {
        let policy = RetryPolicy::default();
        for retry in 0..4 {
            let delay = policy.delay(retry, None);
            let full = policy.base_delay * (1 << retry);
            assert!(
                delay >= full / 2 && delay <= full,
                "retry {retry}: {delay:?}"
            );
        }
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(600))),
            policy.max_delay
        );
        assert_eq!(policy.delay(30, None), policy.max_delay);
    }
}
