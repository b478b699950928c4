//! A store that times every operation of the store it wraps, for the
//! `opspawn_store_operation_duration_seconds` histogram.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::Histogram;

use super::MemoryCall;
use super::{ApprovalRecord, ApprovalRequest, DecideOutcome, Decision};
use super::{
    CancelOutcome, Claim, EventRecord, Fence, HistoryStep, Millis, NewTask, PeriodUsage,
    QueueGauges, Renewal, Result, StepEnd, StepRecord, StepStart, Store, TaskEnd, TaskPage,
    TaskQuery, TaskRecord, TaskStats, ThreadDeletion,
};
use super::{FireRules, Fired, NewSchedule, SchedulePage, ScheduleQuery, ScheduleRecord};
use crate::memory::{MemoryConfig, MemoryQuery, MemoryRecord, MemoryReply, NewMemory};

use crate::metrics::{CachedHistogram, STORE_OPERATION_DURATION};

pub struct Metered {
    inner: Arc<dyn Store>,
}

impl Metered {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Self { inner })
    }
}

/// Times the store operation `call`, named by the literal `operation`,
/// into its histogram by outcome; each use keeps the handles it records
/// into (see [`CachedHistogram`]).
macro_rules! timed {
    ($operation:literal, $call:expr $(,)?) => {{
        static OK: CachedHistogram = CachedHistogram::new();
        static ERROR: CachedHistogram = CachedHistogram::new();
        timed(
            [&OK, &ERROR],
            || metrics::histogram!(STORE_OPERATION_DURATION, "operation" => $operation, "outcome" => "ok"),
            || metrics::histogram!(STORE_OPERATION_DURATION, "operation" => $operation, "outcome" => "error"),
            $call,
        )
    }};
}

async fn timed<T>(
    [ok, error]: [&CachedHistogram; 2],
    find_ok: impl FnOnce() -> Histogram,
    find_error: impl FnOnce() -> Histogram,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = Instant::now();
    let result = call.await;
    match result {
        Ok(_) => ok.record(started.elapsed(), find_ok),
        Err(_) => error.record(started.elapsed(), find_error),
    }
    result
}

#[async_trait]
impl Store for Metered {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }

    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord> {
        timed!("create_schedule", self.inner.create_schedule(schedule)).await
    }

    async fn get_schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        timed!("get_schedule", self.inner.get_schedule(id)).await
    }

    async fn list_schedules(&self, query: &ScheduleQuery) -> Result<SchedulePage> {
        timed!("list_schedules", self.inner.list_schedules(query)).await
    }

    async fn set_schedule_paused(
        &self,
        id: &str,
        paused: bool,
        next_run_at: Option<Millis>,
    ) -> Result<Option<ScheduleRecord>> {
        timed!(
            "set_schedule_paused",
            self.inner.set_schedule_paused(id, paused, next_run_at),
        )
        .await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool> {
        timed!("delete_schedule", self.inner.delete_schedule(id)).await
    }

    async fn earliest_schedule_due(&self) -> Result<Option<Millis>> {
        timed!("earliest_schedule_due", self.inner.earliest_schedule_due()).await
    }

    async fn fire_due_schedules(&self, rules: &FireRules) -> Result<Fired> {
        timed!("fire_due_schedules", self.inner.fire_due_schedules(rules)).await
    }

    async fn await_approval(
        &self,
        fence: &Fence,
        requests: Vec<ApprovalRequest>,
    ) -> Result<EventRecord> {
        timed!("await_approval", self.inner.await_approval(fence, requests)).await
    }

    async fn approvals(&self, task_id: &str) -> Result<Vec<ApprovalRecord>> {
        timed!("approvals", self.inner.approvals(task_id)).await
    }

    async fn decide_approval(
        &self,
        task_id: &str,
        call_id: &str,
        decision: &Decision,
    ) -> Result<DecideOutcome> {
        timed!(
            "decide_approval",
            self.inner.decide_approval(task_id, call_id, decision),
        )
        .await
    }

    async fn expire_approvals(&self, now: Millis) -> Result<Vec<EventRecord>> {
        timed!("expire_approvals", self.inner.expire_approvals(now)).await
    }

    async fn create_task(&self, task: NewTask) -> Result<(TaskRecord, Option<EventRecord>)> {
        timed!("create_task", self.inner.create_task(task)).await
    }

    async fn prune_finished(&self, before: Millis) -> Result<u64> {
        timed!("prune_finished", self.inner.prune_finished(before)).await
    }

    async fn count_active(&self, tenant: &str) -> Result<u64> {
        timed!("count_active", self.inner.count_active(tenant)).await
    }

    async fn count_queued(&self, tenant: Option<&str>, at_most: u64) -> Result<u64> {
        timed!("count_queued", self.inner.count_queued(tenant, at_most)).await
    }

    async fn queue_gauges(&self, now: Millis) -> Result<QueueGauges> {
        timed!("queue_gauges", self.inner.queue_gauges(now)).await
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        timed!("get_task", self.inner.get_task(id)).await
    }

    async fn task_stats(
        &self,
        tenant: &str,
        since: Millis,
        now: Millis,
        count_limit: u64,
    ) -> Result<TaskStats> {
        timed!(
            "task_stats",
            self.inner.task_stats(tenant, since, now, count_limit),
        )
        .await
    }

    async fn period_usage(&self, tenant: &str, period: &str) -> Result<PeriodUsage> {
        timed!("period_usage", self.inner.period_usage(tenant, period)).await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        timed!("list_tasks", self.inner.list_tasks(query)).await
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<StepRecord>> {
        timed!("steps", self.inner.steps(task_id)).await
    }

    async fn history_steps(&self, task_ids: &[String]) -> Result<Vec<HistoryStep>> {
        timed!("history_steps", self.inner.history_steps(task_ids)).await
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<EventRecord>> {
        timed!("events_after", self.inner.events_after(task_id, after)).await
    }

    async fn request_cancel(&self, id: &str) -> Result<CancelOutcome> {
        timed!("request_cancel", self.inner.request_cancel(id)).await
    }

    async fn delete_thread(&self, tenant: &str, thread: &str) -> Result<ThreadDeletion> {
        timed!("delete_thread", self.inner.delete_thread(tenant, thread)).await
    }

    async fn memory_call(&self, fence: &Fence, call: &MemoryCall) -> Result<MemoryReply> {
        timed!("memory_call", self.inner.memory_call(fence, call)).await
    }

    async fn create_memory(
        &self,
        memory: NewMemory,
        config: &MemoryConfig,
    ) -> Result<MemoryRecord> {
        timed!("create_memory", self.inner.create_memory(memory, config)).await
    }

    async fn get_memory(&self, tenant: &str, id: &str) -> Result<Option<MemoryRecord>> {
        timed!("get_memory", self.inner.get_memory(tenant, id)).await
    }

    async fn search_memories(&self, query: &MemoryQuery) -> Result<Vec<MemoryRecord>> {
        timed!("search_memories", self.inner.search_memories(query)).await
    }

    async fn delete_memory(&self, tenant: &str, id: &str) -> Result<bool> {
        timed!("delete_memory", self.inner.delete_memory(tenant, id)).await
    }

    async fn claim_batch(&self, worker: &str, lease: Duration, max: usize) -> Result<Vec<Claim>> {
        timed!("claim_batch", self.inner.claim_batch(worker, lease, max)).await
    }

    async fn claim_next(&self, worker: &str, lease: Duration) -> Result<Option<Claim>> {
        timed!("claim_next", self.inner.claim_next(worker, lease)).await
    }

    async fn renew_leases(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>> {
        timed!("renew_leases", self.inner.renew_leases(fences, lease)).await
    }

    async fn expire_all_leases(&self) -> Result<u64> {
        timed!("expire_all_leases", self.inner.expire_all_leases()).await
    }

    async fn start_step(
        &self,
        fence: &Fence,
        step: StepStart,
    ) -> Result<(StepRecord, EventRecord)> {
        timed!("start_step", self.inner.start_step(fence, step)).await
    }

    async fn finish_step(&self, fence: &Fence, end: StepEnd) -> Result<(StepRecord, EventRecord)> {
        timed!("finish_step", self.inner.finish_step(fence, end)).await
    }

    async fn finish_task(&self, fence: &Fence, end: TaskEnd) -> Result<EventRecord> {
        timed!("finish_task", self.inner.finish_task(fence, end)).await
    }

    async fn append_event(
        &self,
        fence: &Fence,
        kind: &'static str,
        data: serde_json::Value,
    ) -> Result<EventRecord> {
        timed!("append_event", self.inner.append_event(fence, kind, data)).await
    }

    async fn finish_step_then_start(
        &self,
        fence: &Fence,
        end: StepEnd,
        next: StepStart,
    ) -> Result<[(StepRecord, EventRecord); 2]> {
        timed!(
            "finish_step_then_start",
            self.inner.finish_step_then_start(fence, end, next),
        )
        .await
    }

    async fn finish_step_then_task(
        &self,
        fence: &Fence,
        end: StepEnd,
        task_end: TaskEnd,
    ) -> Result<((StepRecord, EventRecord), EventRecord)> {
        timed!(
            "finish_step_then_task",
            self.inner.finish_step_then_task(fence, end, task_end),
        )
        .await
    }

    fn wakeups(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.wakeups()
    }

    fn cancellations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.inner.cancellations()
    }
}
