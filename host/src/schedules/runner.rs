//! The schedule loop: one per host. It sleeps until the earliest schedule
//! is due (at most [`ScheduleConfig::poll`], so schedules created on other
//! hosts are seen), then fires what is due in one store transaction, and
//! hands the runs it created to the scheduler like any submitted task.
//!
//! With nothing due it costs one indexed read per poll; with no schedules at
//! all the same read finds nothing. Creating or resuming a schedule on this
//! host wakes it at once ([`ScheduleRunner::wake`]).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::events::EventBus;
use crate::scheduler::Scheduler;
use crate::store::{FireRules, Store, now_millis};

/// The most schedules one transaction fires; more due wait for the next,
/// which follows at once.
const FIRE_BATCH: usize = 64;

/// `[schedules]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// How late a tick may be reached and still run as on time. A tick
    /// reached later (every host was down) is missed, and the schedule's
    /// `missed_ticks` policy applies to it and every tick since.
    #[serde(with = "humantime_serde")]
    pub misfire_grace: Duration,
    /// The longest the loop sleeps before looking again.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
}

/// The queue caps a due run waits under: the ones `POST /v1/tasks` is
/// refused under (`max_queued_tasks`, `max_queued_per_tenant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCaps {
    pub max_queued_tasks: u64,
    pub max_queued_per_tenant: Option<u64>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            misfire_grace: Duration::from_secs(5),
            poll: Duration::from_secs(1),
        }
    }
}

/// The running loop; it stops when this is dropped.
pub struct ScheduleRunner {
    wake: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for ScheduleRunner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScheduleRunner {
    /// Starts the loop. `wake` is what the API signals when a schedule is
    /// created or resumed.
    pub fn start(
        store: Arc<dyn Store>,
        events: EventBus,
        scheduler: Arc<Scheduler>,
        limits: QueueCaps,
        config: ScheduleConfig,
        wake: Arc<Notify>,
    ) -> Self {
        let task = tokio::spawn(run(store, events, scheduler, limits, config, wake.clone()))
            .abort_handle();
        Self { wake, task }
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run(
    store: Arc<dyn Store>,
    events: EventBus,
    scheduler: Arc<Scheduler>,
    limits: QueueCaps,
    config: ScheduleConfig,
    wake: Arc<Notify>,
) {
    let poll = config.poll.max(Duration::from_millis(10));
    loop {
        let now = now_millis();
        let due = match store.earliest_schedule_due().await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "cannot read when schedules are due; trying again");
                None
            }
        };
        if due.is_some_and(|due| due <= now) {
            let rules = FireRules {
                now,
                max: FIRE_BATCH,
                grace: config.misfire_grace,
                max_queued_tasks: limits.max_queued_tasks,
                max_queued_per_tenant: limits.max_queued_per_tenant,
            };
            match store.fire_due_schedules(&rules).await {
                Ok(fired) => {
                    // Every schedule fired or skipped has moved on, maybe to
                    // a tick already due (a loop catching up), so look again
                    // at once; runs waiting for room wait a poll.
                    let moved_on = fired.taken > fired.waiting;
                    for (task, event) in fired.runs {
                        tracing::debug!(task = %task.id, schedule = ?task.schedule_id, "scheduled run created");
                        metrics::counter!(crate::metrics::TASKS_SUBMITTED, "tenant" => task.tenant)
                            .increment(1);
                        events.journaled(event);
                        scheduler.wake();
                    }
                    if fired.waiting > 0 {
                        tracing::debug!(
                            waiting = fired.waiting,
                            "scheduled runs wait for room in the queue"
                        );
                    }
                    if moved_on {
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "firing due schedules failed; trying again");
                }
            }
        }
        let wait = match due {
            Some(due) if due > now => Duration::from_millis((due - now) as u64).min(poll),
            _ => poll,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}
