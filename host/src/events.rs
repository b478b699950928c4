//! Live task events inside one host: what the scheduler journaled,
//! streamed LLM text included (`llm.delta`, coalesced and capped per step,
//! see [`EventsConfig`]). Subscribers that fall behind, reconnect or come
//! after a restart catch up from the store, which holds every one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use crate::store::EventRecord;

/// How many live events are buffered for slow subscribers.
const CAPACITY: usize = 8192;

/// `[events]`: how streamed LLM text is journaled. Text a provider streams
/// is gathered for `delta_interval` (or until 4 KiB) and journaled as one
/// `llm.delta` event, so a subscriber that reconnects (`Last-Event-ID`), or
/// comes after a restart, gets it again with the same ids; past
/// `delta_bytes_per_step` of a step's text, the rest is in the step's reply
/// only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// The most streamed text journaled per LLM step (each try of it).
    pub delta_bytes_per_step: usize,
    /// How long streamed text is gathered before it is journaled.
    #[serde(with = "humantime_serde")]
    pub delta_interval: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            delta_bytes_per_step: 64 * 1024,
            delta_interval: Duration::from_millis(50),
        }
    }
}

/// An event as this host's subscribers get it: journaled first.
pub type LiveEvent = Arc<EventRecord>;

#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<LiveEvent>,
    finish_waiters: Arc<FinishWaiters>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            finish_waiters: Arc::default(),
        }
    }
}

impl EventBus {
    /// Tells this host's subscribers of an event the store now holds.
    pub fn journaled(&self, event: EventRecord) {
        if event.is_final() {
            self.finish_waiters.wake(&event.task_id);
        }
        // No subscribers is the common case, not an error.
        let _ = self.sender.send(Arc::new(event));
    }

    /// Resolves once this host journals `task_id`'s `task.finished`, for a
    /// request that waits for a task to finish (`GET /v1/tasks/{id}?wait_secs=`).
    /// Take it before reading the task, so that an end between the read
    /// and the wait is not missed. A task that ends on another host is not
    /// heard of here: the waiter reads the store now and then as well.
    pub fn task_finished(&self, task_id: &str) -> TaskFinished {
        TaskFinished::new(self.finish_waiters.clone(), task_id)
    }

    /// Ends every wait for a task's end, now and from now on, with
    /// [`WaitEnded::HostStopping`]: the host is shutting down, and a request
    /// that waits answers with the task as it is rather than holding the
    /// shutdown's drain until it is cut off.
    pub fn stop_waits(&self) {
        let waiters = &self.finish_waiters;
        let mut by_task = waiters.by_task.lock().unwrap_or_else(|e| e.into_inner());
        waiters.stopping.store(true, Ordering::Release);
        waiters.tasks.store(0, Ordering::Release);
        // Dropped unsent: each waiter's receiver sees its sender gone.
        by_task.clear();
    }

    /// Whether anyone is subscribed: what is built only for subscribers
    /// (a step's input in its `step.started` event) can be skipped when not.
    /// One who subscribes later reads the store first, which has the event.
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }
}

/// Who waits for which task to finish, on this host. Unlike the broadcast
/// of every event, a waiter is woken by its own task's end only, and the
/// scheduler pays one atomic load per finished task when no one waits.
#[derive(Default)]
struct FinishWaiters {
    /// How many tasks have waiters: the map is locked only when some do.
    tasks: AtomicUsize,
    by_task: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    /// The host is shutting down: no wait is kept (see [`EventBus::stop_waits`]).
    stopping: AtomicBool,
}

impl FinishWaiters {
    fn wake(&self, task_id: &str) {
        if self.tasks.load(Ordering::Acquire) == 0 {
            return;
        }
        let waiters = {
            let mut by_task = self.by_task.lock().unwrap_or_else(|e| e.into_inner());
            let waiters = by_task.remove(task_id);
            self.tasks.store(by_task.len(), Ordering::Release);
            waiters
        };
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(());
        }
    }
}

/// Why [`TaskFinished::wait`] resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnded {
    TaskFinished,
    HostStopping,
}

/// A wait for one task's end on this host (see [`EventBus::task_finished`]).
/// Dropped unresolved, it takes itself off the task's waiters.
pub struct TaskFinished {
    waiters: Arc<FinishWaiters>,
    task_id: String,
    receiver: oneshot::Receiver<()>,
    woken: bool,
}

impl TaskFinished {
    fn new(waiters: Arc<FinishWaiters>, task_id: &str) -> Self {
        let (sender, receiver) = oneshot::channel();
        {
            let mut by_task = waiters.by_task.lock().unwrap_or_else(|e| e.into_inner());
            // Once stopping, the sender is dropped here: the wait ends at once.
            if !waiters.stopping.load(Ordering::Acquire) {
                by_task.entry(task_id.to_owned()).or_default().push(sender);
                waiters.tasks.store(by_task.len(), Ordering::Release);
            }
        }
        Self {
            waiters,
            task_id: task_id.to_owned(),
            receiver,
            woken: false,
        }
    }

    /// Resolves when the task's end is journaled here, or when the host
    /// starts shutting down, and only that once: awaited again, it never
    /// resolves (the caller reads the store then).
    pub async fn wait(&mut self) -> WaitEnded {
        if self.woken {
            return std::future::pending().await;
        }
        let ended = match (&mut self.receiver).await {
            Ok(()) => WaitEnded::TaskFinished,
            // Senders are dropped unsent only by `stop_waits`.
            Err(_) => WaitEnded::HostStopping,
        };
        self.woken = true;
        ended
    }
}

impl Drop for TaskFinished {
    fn drop(&mut self) {
        // Woken: the task's entry is gone.
        if self.woken || self.receiver.try_recv().is_ok() {
            return;
        }
        self.receiver.close();
        let mut by_task = self
            .waiters
            .by_task
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(waiters) = by_task.get_mut(&self.task_id) {
            waiters.retain(|waiter| !waiter.is_closed());
            if waiters.is_empty() {
                by_task.remove(&self.task_id);
            }
        }
        self.waiters.tasks.store(by_task.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::store::event_kind;

    fn event(task_id: &str, kind: &str) -> EventRecord {
        EventRecord {
            task_id: task_id.to_owned(),
            seq: 1,
            kind: kind.to_owned(),
            data: Value::Null,
            at: 0,
        }
    }

    async fn woken(finished: &mut TaskFinished) -> bool {
        ended(finished).await == Some(WaitEnded::TaskFinished)
    }

    async fn ended(finished: &mut TaskFinished) -> Option<WaitEnded> {
        tokio::time::timeout(Duration::from_millis(50), finished.wait())
            .await
            .ok()
    }

    #[tokio::test]
    async fn stopping_the_host_ends_every_wait_now_and_later() {
        let bus = EventBus::default();
        let mut waiting = bus.task_finished("t");
        bus.stop_waits();
        assert_eq!(ended(&mut waiting).await, Some(WaitEnded::HostStopping));
        let mut later = bus.task_finished("u");
        assert_eq!(ended(&mut later).await, Some(WaitEnded::HostStopping));
        assert!(bus.finish_waiters.by_task.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_its_own_tasks_end_only() {
        let bus = EventBus::default();
        let mut mine = bus.task_finished("mine");
        let mut also_mine = bus.task_finished("mine");
        let mut other = bus.task_finished("other");
        bus.journaled(event("mine", event_kind::TASK_STARTED));
        bus.journaled(event("someone-else", event_kind::TASK_FINISHED));
        assert!(
            !woken(&mut mine).await,
            "not by another event of its task's"
        );
        bus.journaled(event("mine", event_kind::TASK_FINISHED));
        assert!(woken(&mut mine).await);
        assert!(woken(&mut also_mine).await, "every waiter of the task");
        assert!(!woken(&mut mine).await, "once only");
        assert!(!woken(&mut other).await);
        assert_eq!(bus.finish_waiters.tasks.load(Ordering::Acquire), 1);
    }

    #[tokio::test]
    async fn a_waiter_dropped_unwoken_leaves_nothing_behind() {
        let bus = EventBus::default();
        let first = bus.task_finished("t");
        let mut second = bus.task_finished("t");
        drop(first);
        assert_eq!(bus.finish_waiters.by_task.lock().unwrap()["t"].len(), 1);
        drop(bus.task_finished("u"));
        bus.journaled(event("t", event_kind::TASK_FINISHED));
        assert!(woken(&mut second).await, "the one left is still woken");
        drop(second);
        assert!(bus.finish_waiters.by_task.lock().unwrap().is_empty());
        assert_eq!(bus.finish_waiters.tasks.load(Ordering::Acquire), 0);
    }
}
