//! Back-pressure at the door: `POST /v1/tasks` is refused with `429
//! queue_full` while the store holds too many queued tasks, overall or for
//! the tenant, so a flood of submissions waits with its clients instead of
//! growing the queue without bound. A task that was accepted is never
//! dropped.
//!
//! Counting queued tasks on every submission would put a query on the hot
//! path, so each count (overall, and per tenant) is read from the store at
//! most once per [`REFRESH`] and the submissions this host admitted since
//! are added to it. On one host the cap then holds exactly; with several
//! hosts, each sees the others' submissions up to [`REFRESH`] late, which
//! can overshoot the cap by what they accept in that time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::errors::Code;
use crate::store::{Store, StoreError};

/// How stale a queue count may be.
pub const REFRESH: Duration = Duration::from_millis(100);

/// What a refused client is told to wait before trying again. A full queue
/// drains at the pace of the tasks ahead of it, so there is no exact answer;
/// a couple of seconds spreads retries without leaving capacity idle.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The caps on queued tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    /// The most tasks queued in the store.
    pub max_queued_tasks: u64,
    /// The most tasks one tenant may have queued; no cap if unset.
    pub max_queued_per_tenant: Option<u64>,
}

/// Admits or refuses submissions against [`QueueLimits`].
pub struct Admission {
    limits: QueueLimits,
    /// Held across a refresh, so one submission reads the store and those
    /// arriving meanwhile wait for its answer rather than all reading it.
    gauges: tokio::sync::Mutex<Gauges>,
}

#[derive(Default)]
struct Gauges {
    overall: Gauge,
    by_tenant: HashMap<String, Gauge>,
}

/// A queue count as last read from the store, and what this host admitted
/// since.
#[derive(Default)]
struct Gauge {
    counted: u64,
    admitted_since: u64,
    read_at: Option<Instant>,
}

impl Gauge {
    fn is_stale(&self, now: Instant) -> bool {
        self.read_at
            .is_none_or(|read_at| now.duration_since(read_at) >= REFRESH)
    }

    fn estimate(&self) -> u64 {
        self.counted + self.admitted_since
    }

    fn reset(&mut self, counted: u64, now: Instant) {
        *self = Self {
            counted,
            admitted_since: 0,
            read_at: Some(now),
        };
    }
}

/// Room held in the queue for one submission; give it back with
/// [`Admission::release`] if the task is not created after all.
#[must_use = "a reservation not used for a task must be released"]
pub struct Reservation {
    tenant: Option<String>,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{queued} tasks are queued, the most this server accepts; retry later")]
    QueueFull { queued: u64 },
    #[error("this tenant has {queued} tasks queued, the most it may; retry later")]
    TenantQueueFull { queued: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Store(error) => error.into(),
            full => ApiError::new(Code::QueueFull, full.to_string()).with_retry_after(RETRY_AFTER),
        }
    }
}

impl Admission {
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            limits,
            gauges: tokio::sync::Mutex::new(Gauges::default()),
        }
    }

    /// Holds room for one more queued task of `tenant`, or says why there is
    /// none.
    pub async fn reserve(&self, store: &dyn Store, tenant: &str) -> Result<Reservation, Refusal> {
        let mut gauges = self.gauges.lock().await;
        let now = Instant::now();
        if gauges.overall.is_stale(now) {
            let counted = store
                .count_queued(None, self.limits.max_queued_tasks)
                .await?;
            gauges.overall.reset(counted, now);
        }
        let queued = gauges.overall.estimate();
        if queued >= self.limits.max_queued_tasks {
            return Err(Refusal::QueueFull { queued });
        }
        let per_tenant = match self.limits.max_queued_per_tenant {
            None => None,
            Some(cap) => {
                if gauges.by_tenant.get(tenant).is_none_or(|g| g.is_stale(now)) {
                    let counted = store.count_queued(Some(tenant), cap).await?;
                    // Forget tenants not seen lately, so the map stays small.
                    gauges.by_tenant.retain(|_, gauge| !gauge.is_stale(now));
                    gauges
                        .by_tenant
                        .entry(tenant.to_owned())
                        .or_default()
                        .reset(counted, now);
                }
                let gauge = gauges.by_tenant.entry(tenant.to_owned()).or_default();
                let queued = gauge.estimate();
                if queued >= cap {
                    return Err(Refusal::TenantQueueFull { queued });
                }
                gauge.admitted_since += 1;
                Some(tenant.to_owned())
            }
        };
        gauges.overall.admitted_since += 1;
        Ok(Reservation { tenant: per_tenant })
    }

    /// Gives back the room of a submission that did not queue a task (it
    /// failed, or its idempotency key named an existing task).
    pub async fn release(&self, reservation: Reservation) {
        let mut gauges = self.gauges.lock().await;
        let overall = &mut gauges.overall;
        overall.admitted_since = overall.admitted_since.saturating_sub(1);
        if let Some(gauge) = reservation
            .tenant
            .and_then(|tenant| gauges.by_tenant.get_mut(&tenant))
        {
            gauge.admitted_since = gauge.admitted_since.saturating_sub(1);
        }
    }
}
