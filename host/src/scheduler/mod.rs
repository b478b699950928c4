//! The scheduler: one dispatcher per host that claims tasks from the store
//! in batches while this host runs fewer than its limit, one tokio task per
//! claimed task running the agent loop, and one lease renewer for all of
//! them.
//!
//! A running task is a future, not a thread: while it waits on a provider,
//! a retry's back-off or a timer it is parked and costs only its memory. The
//! limit on running tasks is a semaphore whose permits the runs hold; when
//! it is reached the dispatcher waits for a permit, so work queues in the
//! store and never fails for want of room.

mod agent;
#[cfg(test)]
mod agent_tests;
mod spans;
mod step_memory;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::EventBus;
use crate::plugins::PluginRuntime;
use crate::store::{Claim, Fence, Renewal, Store};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How many tasks run at once on this host, waiting ones included.
    pub max_running_tasks: usize,
    /// The most tasks one claim takes from the store.
    pub claim_batch: usize,
    /// How long a claim lasts without renewal; a dead host's tasks are
    /// reclaimed this long after its last renewal.
    pub lease: Duration,
    /// How often an idle dispatcher looks for work it was not woken for:
    /// expired leases, start times come, and tasks submitted to another host
    /// when the store's wake-up for them was lost.
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    /// Whether the spans of a task record prompts, replies, tool arguments
    /// and results (`[traces] record_content`).
    pub trace_content: bool,
    /// Prices, tenants' caps, and this host's reservations against them.
    pub budgets: Arc<crate::budgets::Budgets>,
    /// Which tool calls wait for approval, and for how long.
    pub approvals: Arc<crate::approvals::ApprovalsConfig>,
    /// How much of a thread's past a planner is given (`[threads]`).
    pub threads: crate::threads::ThreadsConfig,
    /// How streamed LLM text is journaled (`[events]`).
    pub events: crate::events::EventsConfig,
    /// What each tenant may keep in long-term memory (`[memory]`).
    pub memory: crate::memory::MemoryConfig,
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
            max_running_tasks: 10_000,
            claim_batch: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            trace_content: false,
            budgets: Arc::default(),
            approvals: Arc::default(),
            threads: crate::threads::ThreadsConfig::default(),
            events: crate::events::EventsConfig::default(),
            memory: crate::memory::MemoryConfig::default(),
        }
    }
}

pub struct Scheduler {
    shared: Arc<Shared>,
    /// The dispatcher, the lease renewer and the cancellation listener.
    loops: tokio::sync::Mutex<JoinSet<()>>,
    /// Stops the lease renewer, once no task runs here any more.
    stop_renewing: CancellationToken,
}

struct Shared {
    store: Arc<dyn Store>,
    runtime: Arc<PluginRuntime>,
    events: EventBus,
    config: SchedulerConfig,
    /// This host's claims carry it as their worker.
    host_id: String,
    wake: Notify,
    shutdown: CancellationToken,
    /// One permit per task running here; `max_running_tasks` in all.
    slots: Arc<Semaphore>,
    /// The tasks running on this host, by task id.
    running: Mutex<HashMap<String, RunningTask>>,
}

/// What the host keeps of one of its runs: its claim, and how to stop it.
struct RunningTask {
    fence: Fence,
    /// Cancelled when the task's cancellation is requested.
    cancel: CancellationToken,
    /// Cancelled when the claim is found lost (another host took it over).
    lost: CancellationToken,
}

impl Shared {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningTask>> {
        // The map is only ever inserted into and removed from; a panic while
        // holding the lock cannot leave it half-changed.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the task's run here, if it runs here, at its next step boundary.
    fn cancel(&self, task_id: &str) {
        if let Some(run) = self.runs().get(task_id) {
            run.cancel.cancel();
        }
    }
}

/// Takes a run out of the running set when it ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    fence: Fence,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.shared.runs();
        // A newer claim of the same task on this host replaces the entry;
        // leave that one be.
        if running
            .get(&self.fence.task_id)
            .is_some_and(|run| run.fence == self.fence)
        {
            running.remove(&self.fence.task_id);
        }
    }
}

/// The most permits a tokio semaphore can hold, and that `acquire_many`
/// can wait for.
const MAX_SLOTS: usize = u32::MAX as usize >> 3;

impl Scheduler {
    /// Starts the dispatcher, the lease renewer and, where the store has
    /// them, the cancellation notices from other hosts.
    pub fn start(
        store: Arc<dyn Store>,
        runtime: Arc<PluginRuntime>,
        events: EventBus,
        mut config: SchedulerConfig,
    ) -> Self {
        config.max_running_tasks = config.max_running_tasks.clamp(1, MAX_SLOTS);
        config.claim_batch = config.claim_batch.max(1);
        let shared = Arc::new(Shared {
            store,
            runtime,
            events,
            host_id: format!("host-{}", uuid::Uuid::now_v7().simple()),
            slots: Arc::new(Semaphore::new(config.max_running_tasks)),
            config,
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            running: Mutex::new(HashMap::new()),
        });
        let stop_renewing = CancellationToken::new();
        let mut loops = JoinSet::new();
        loops.spawn(dispatch(shared.clone()));
        loops.spawn(renew_leases(shared.clone(), stop_renewing.clone()));
        loops.spawn(expire_approvals(shared.clone()));
        if let Some(cancellations) = shared.store.cancellations() {
            loops.spawn(cancel_when_told(shared.clone(), cancellations));
        }
        tracing::info!(
            host = %shared.host_id,
            max_running_tasks = shared.config.max_running_tasks,
            "scheduler started"
        );
        Self {
            shared,
            loops: tokio::sync::Mutex::new(loops),
            stop_renewing,
        }
    }

    /// Tells the dispatcher that a task is waiting.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// How many tasks run on this host now.
    pub fn running_here(&self) -> usize {
        self.shared.runs().len()
    }

    /// Stops a task running on this host at its next step boundary. (Tasks
    /// running elsewhere hear of it through the store.)
    pub fn cancel_local(&self, task_id: &str) {
        self.shared.cancel(task_id);
    }

    /// Stops claiming new tasks and waits for running ones to reach a step
    /// boundary, renewing their leases meanwhile. Interrupted tasks keep
    /// their journal and resume elsewhere, or here after a restart.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        // Every run holds a slot until it ends: all slots back means all
        // runs have stopped.
        let all = self.shared.config.max_running_tasks as u32;
        let _all_slots = self.shared.slots.acquire_many(all).await;
        self.stop_renewing.cancel();
        let mut loops = self.loops.lock().await;
        while loops.join_next().await.is_some() {}
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
                Ok(task_id) => shared.cancel(&task_id),
                // Missed notices are caught at lease renewal.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Claims tasks while this host has room, and starts a run for each.
///
/// It waits for one free slot, takes as many more as are free (up to a
/// batch), and claims that many tasks in one store call. A full batch means
/// more may be waiting, so it claims again at once; a short one means the
/// store had no more, so it sleeps until woken: by a task submitted here, by
/// the store (another host's submission), or by the poll interval, which
/// also finds expired leases and start times that have come.
async fn dispatch(shared: Arc<Shared>) {
    // Tasks submitted to other hosts sharing the store (Postgres).
    let elsewhere = shared.store.wakeups();
    loop {
        let first = tokio::select! {
            slot = shared.slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return, // closed: never, but nothing to run with
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let mut slots = vec![first];
        while slots.len() < shared.config.claim_batch {
            match shared.slots.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        let wanted = slots.len();
        let claimed = shared
            .store
            .claim_batch(&shared.host_id, shared.config.lease, wanted)
            .await;
        let idle = match claimed {
            Ok(claims) => {
                let short = claims.len() < wanted;
                for (claim, slot) in claims.into_iter().zip(slots.drain(..)) {
                    start_run(&shared, claim, slot);
                }
                short
            }
            Err(error) => {
                tracing::error!(%error, "claiming tasks failed; retrying");
                true
            }
        };
        // Unused slots go back before waiting, for the runs to come.
        drop(slots);
        if idle {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = notified(elsewhere.as_deref()) => {}
                _ = tokio::time::sleep(shared.config.poll_interval) => {}
                _ = shared.shutdown.cancelled() => return,
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

/// Runs a claimed task on a tokio task of its own, holding `slot` until it
/// ends.
fn start_run(shared: &Arc<Shared>, claim: Claim, slot: OwnedSemaphorePermit) {
    let cancel = CancellationToken::new();
    if claim.task.cancel_requested {
        cancel.cancel();
    }
    let lost = CancellationToken::new();
    let run = RunningTask {
        fence: claim.fence.clone(),
        cancel: cancel.clone(),
        lost: lost.clone(),
    };
    if let Some(earlier) = shared.runs().insert(claim.task.id.clone(), run) {
        // This host claimed the task again after its own lease expired (it
        // was stalled): the earlier run's claim is superseded.
        earlier.lost.cancel();
    }
    let registration = Registration {
        shared: shared.clone(),
        fence: claim.fence.clone(),
    };
    shared.events.journaled(claim.event.clone());
    // The run is made outside the spawned block, which then holds only
    // its boxed future (a block that makes it keeps the run twice).
    let run = agent::Run::new(shared.clone(), claim, cancel, lost).run();
    tokio::spawn(async move {
        run.await;
        drop(registration);
        drop(slot);
    });
}

/// Renews the leases of every task running here, a third of a lease apart,
/// in one store call, and passes on what the renewal found: cancellations
/// requested on other hosts (should their notice have been missed), and
/// claims lost to another host, whose runs then stop at once.
async fn renew_leases(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(shared.config.lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; nothing runs yet
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let fences: Vec<Fence> = shared
            .runs()
            .values()
            .map(|run| run.fence.clone())
            .collect();
        if fences.is_empty() {
            continue;
        }
        let renewals = match shared
            .store
            .renew_leases(&fences, shared.config.lease)
            .await
        {
            Ok(renewals) => renewals,
            Err(error) => {
                tracing::warn!(%error, tasks = fences.len(), "renewing leases failed");
                continue;
            }
        };
        let running = shared.runs();
        for (fence, renewal) in fences.iter().zip(renewals) {
            // A run that ended since the renewal began has left the map.
            let Some(run) = running
                .get(&fence.task_id)
                .filter(|run| run.fence == *fence)
            else {
                continue;
            };
            match renewal {
                Renewal::Renewed {
                    cancel_requested: true,
                } => run.cancel.cancel(),
                Renewal::Renewed { .. } => {}
                Renewal::Lost => {
                    tracing::warn!(task = %fence.task_id, attempt = fence.attempt, "lease lost to another worker");
                    run.lost.cancel();
                }
            }
        }
    }
}
/// Rejects calls whose wait for approval timed out, every
/// `approvals.check_interval`, and wakes the dispatcher for the tasks that
/// went back to the queue. Idle, it costs one read of the index of pending
/// calls per interval.
async fn expire_approvals(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.approvals.check_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        match shared
            .store
            .expire_approvals(crate::store::now_millis())
            .await
        {
            Ok(events) => {
                let requeued = events
                    .iter()
                    .any(|e| e.kind == crate::store::event_kind::TASK_QUEUED);
                for event in events {
                    shared.events.journaled(event);
                }
                if requeued {
                    shared.wake.notify_one();
                }
            }
            Err(error) => tracing::warn!(%error, "rejecting timed-out approvals failed"),
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
