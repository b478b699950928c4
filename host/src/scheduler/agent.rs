//! The agent loop for one claimed task.
//!
//! The planner decides; this loop performs. Each effect (an LLM call, a tool
//! call) is a step journaled before it runs and again when it ends, and the
//! planner only ever sees finished, journaled steps. After a crash the next
//! claim replays the journal: finished steps are never run again, and a step
//! that was in flight runs again under the same number (and so the same
//! idempotency key).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::step_memory::RunMemory;
use super::{Shared, spans};
use crate::budgets::{self, Reservation};
use crate::errors::{Code, is_transient};
use crate::memory::{MemoryHandle, Site};
use crate::plugins::{CallError, RecordedVersions, TaskPluginNames, TaskPlugins};
use crate::protocol::{
    CallContext, ChatRequest, ChatResponse, EarlierTask, LlmError, PlannerAction, PlannerStep,
    TaskState, ToolCall, ToolResult, Usage,
};
use crate::store::{
    ApprovalRecord, ApprovalRequest, ApprovalStatus, Claim, ErrorInfo, Fence, HistoryStep, StepEnd,
    StepKind, StepRecord, StepStart, StepStatus, StepVersions, StoreError, TaskEnd, TaskRecord,
    now_millis,
};
use crate::telemetry::TraceSpan;

/// Why a run stopped without finishing its task.
enum Interrupted {
    /// Another worker holds the claim now; it will finish the task.
    ClaimLost,
    /// This host is shutting down; the task resumes from its journal later.
    Shutdown,
    /// The store failed; the lease will expire and the task be retried.
    Store(StoreError),
    /// The task waits for approval of tool calls; its claim is released
    /// and it goes back to the queue once every call is answered.
    AwaitingApproval,
}

impl From<StoreError> for Interrupted {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Fenced { .. } => Self::ClaimLost,
            other => Self::Store(other),
        }
    }
}

pub(super) struct Run {
    shared: Arc<Shared>,
    task: TaskRecord,
    fence: Fence,
    steps: Vec<StepRecord>,
    /// What the planner sees of each finished step, by sequence number, kept
    /// as steps finish so no step's JSON is decoded again on later steps.
    planner_steps: PlannerSteps,
    cancel: CancellationToken,
    lost: CancellationToken,
    /// Retries spent in this claim, against the task's `max_retries`.
    retries_used: u32,
    /// A finished step whose end is journaled together with what the
    /// planner chooses next (`Store::finish_step_then_start`): one write
    /// per step instead of two. Its planner view is in `planner_steps`.
    unwritten_end: Option<StepEnd>,
    /// This run's `invoke_agent` span, when traces are on.
    trace: TraceSpan,
    /// The plugin versions the task runs on, held from its first step to
    /// its end.
    plugins: Option<TaskPlugins>,
    /// The tenant budget held for the LLM step in `unwritten_end`: released
    /// (with its real usage) once that end is journaled, so a check never
    /// sees the usage neither in the store nor held.
    settling: Option<Reservation>,
    /// The earlier tasks of the task's thread, as its planner is given them;
    /// read once per claim, before the first step it plans (empty for a
    /// task without a thread, which costs no read).
    history: Vec<EarlierTask>,
    /// The run's long-term memory scope, made when a plugin first needs it.
    memory: Option<Arc<RunMemory>>,
}

impl Run {
    pub fn new(
        shared: Arc<Shared>,
        claim: Claim,
        cancel: CancellationToken,
        lost: CancellationToken,
    ) -> Self {
        Self {
            shared,
            task: claim.task,
            fence: claim.fence,
            planner_steps: claim
                .steps
                .iter()
                .filter_map(|step| Some((step.seq, planner_view(step)?)))
                .collect(),
            steps: claim.steps,
            cancel,
            lost,
            retries_used: 0,
            unwritten_end: None,
            trace: TraceSpan::none(),
            plugins: None,
            settling: None,
            history: Vec::new(),
            memory: None,
        }
    }

    /// The task's run to its end (or until it stops: see `run_in_span`).
    /// Not an `async fn`, so that its future does not keep a second copy
    /// of the run beside the one it hands on.
    pub fn run(mut self) -> impl Future<Output = ()> + Send + 'static {
        // A root: the run is made in the dispatcher, and its log lines
        // belong to no span of whatever made it.
        let span = tracing::info_span!(
            parent: None,
            "task",
            id = %self.task.id,
            attempt = self.fence.attempt
        );
        // The trace span is handed to each plugin call made for the task
        // (as `trace`), not attached around this future.
        self.trace = spans::task(&self.task, self.fence.attempt);
        // Instrument the future rather than holding an entered span across
        // awaits, which would leak the span into other tasks on this thread.
        //
        // The run's nested futures are boxed where they are awaited (here,
        // `drive`, each `perform`, each planner or plugin call). Inline,
        // each level held its callee's whole state, often twice (a future
        // moved into the one that awaits it keeps its place in both): a
        // task's future was 143 KB, most of it for states it was not in.
        Box::pin(self.run_in_span()).instrument(span)
    }

    async fn run_in_span(mut self) {
        let end = match Box::pin(self.drive()).await {
            Ok(end) => end,
            Err(Interrupted::ClaimLost) => {
                tracing::warn!(task = %self.task.id, "stopped: another worker took over the task");
                return;
            }
            Err(Interrupted::Shutdown) => {
                // The step that finished last is not run again on resume.
                self.write_unwritten_end().await;
                tracing::info!(task = %self.task.id, "paused for shutdown; it resumes from its journal");
                return;
            }
            Err(Interrupted::Store(error)) => {
                tracing::error!(task = %self.task.id, %error, "the store failed; the task will be retried when its lease expires");
                return;
            }
            Err(Interrupted::AwaitingApproval) => {
                tracing::info!(task = %self.task.id, "waiting for approval; the claim is released");
                return;
            }
        };
        let status = end.status();
        spans::task_ended(&self.trace, &end);
        let store = &self.shared.store;
        let written = match self.unwritten_end.take() {
            Some(step_end) => store
                .finish_step_then_task(&self.fence, step_end, end)
                .await
                .map(|((_, step_event), event)| {
                    self.shared.events.journaled(step_event);
                    event
                }),
            None => store.finish_task(&self.fence, end).await,
        };
        match written {
            Ok(event) => {
                metrics::counter!(
                    crate::metrics::TASKS_FINISHED,
                    "tenant" => self.task.tenant.clone(),
                    "status" => status.as_str(),
                )
                .increment(1);
                tracing::info!(task = %self.task.id, status = %event.data["status"], "task finished");
                self.shared.events.journaled(event);
            }
            Err(StoreError::Fenced { .. }) => {
                tracing::warn!(task = %self.task.id, "finished, but another worker had taken over")
            }
            Err(error) => {
                tracing::error!(task = %self.task.id, %error, "recording the task's end failed")
            }
        }
    }

    async fn drive(&mut self) -> Result<TaskEnd, Interrupted> {
        // A call task has no planner or LLM to hold.
        let agent = self.task.call.is_none();
        let names = TaskPluginNames {
            planner: agent.then_some(self.task.planner.as_str()),
            llm: agent.then_some(self.task.llm.as_str()),
            tools: &self.task.tools,
        };
        let recorded = recorded_versions(&self.steps);
        let tools = match Box::pin(self.shared.runtime.hold_task_plugins(names, &recorded)).await {
            Ok((plugins, tools)) => {
                self.plugins = Some(plugins);
                tools
            }
            Err(error) => return Ok(failed(error.code(), error.to_string())),
        };

        // Steps left in flight by a claim that died run again first.
        let in_flight: Vec<StepRecord> = self
            .steps
            .iter()
            .filter(|step| step.status == StepStatus::Running)
            .cloned()
            .collect();
        // A rejected call never runs, not even as a step left in flight.
        let answered = if in_flight.iter().any(|s| s.kind == StepKind::Tool) {
            self.shared.store.approvals(&self.task.id).await?
        } else {
            Vec::new()
        };
        for step in in_flight {
            tracing::info!(
                step = step.seq,
                "re-running a step that was in flight when the last claim ended"
            );
            let effect = Effect::from_journal(step.kind, &step.input);
            let refusal = answered
                .iter()
                .find(|a| a.step == step.seq && a.status == ApprovalStatus::Rejected)
                .map(rejection);
            if let Some(end) = self.perform(step.seq, step.input, effect, refusal).await? {
                return Ok(end);
            }
        }

        if let Some(call) = self.task.call.clone() {
            return Box::pin(self.make_the_call(call)).await;
        }
        if self.task.thread.is_some() {
            self.history = Box::pin(crate::threads::history(
                self.shared.store.as_ref(),
                &self.task,
                &self.shared.config.threads,
                history_view,
            ))
            .await?;
        }
        let planner_options = option_section(&self.task.options, "planner");
        loop {
            if let Some(end) = self.boundary_check()? {
                return Ok(end);
            }
            let planner_memory = self.memory_for(self.next_seq(), Site::Planner);
            let state = TaskState {
                task_id: &self.task.id,
                goal: &self.task.goal,
                tools: &tools,
                steps: self.planner_steps.values().collect(),
                history: &self.history,
                max_steps: self.task.max_steps,
                options: &planner_options,
                tenant: Some(&self.task.tenant),
                memory: planner_memory,
            };
            let action = self
                .bounded(Box::pin(self.shared.runtime.next_action(
                    self.plugins(),
                    &state,
                    &self.trace,
                )))
                .await;
            drop(state);
            let action = match action {
                Ok(action) => action,
                Err(error) => return Ok(TaskEnd::Failed { error }),
            };
            match action {
                PlannerAction::Finish { answer } => {
                    // A task that asked for structured output succeeds only
                    // with an answer that matches its schema.
                    if let Some(format) = &self.task.response_format
                        && let Some(problem) = crate::structured::check_answer(format, &answer)
                    {
                        return Ok(TaskEnd::AnswerRefused {
                            answer,
                            error: ErrorInfo::new(Code::AnswerSchemaMismatch, problem),
                        });
                    }
                    return Ok(TaskEnd::Succeeded { result: answer });
                }
                PlannerAction::Fail { reason } => return Ok(failed(Code::PlannerGaveUp, reason)),
                PlannerAction::CallLlm { mut request } => {
                    if request.model.is_none() {
                        request.model = self.task.model.clone();
                    }
                    if request.response_format.is_none() {
                        request.response_format = self.task.response_format.clone();
                    }
                    if request
                        .provider_options
                        .as_object()
                        .is_none_or(|o| o.is_empty())
                    {
                        request.provider_options = option_section(&self.task.options, "llm");
                    }
                    // A budget's worst case holds only if the output is
                    // bounded: a call that sets no bound is given one.
                    if self.has_budget() && budgets::max_output_tokens(&request).is_none() {
                        request.max_tokens =
                            Some(self.shared.config.budgets.default_max_output_tokens());
                    }
                    let effect = Effect::Llm(request);
                    let input = effect.journal_input();
                    let seq = self.next_seq();
                    if let Some(end) = self.perform(seq, input, Ok(effect), None).await? {
                        return Ok(end);
                    }
                }
                PlannerAction::CallTools { calls } => {
                    if calls.is_empty() {
                        return Ok(failed(
                            Code::PlannerError,
                            "the planner asked to call no tools",
                        ));
                    }
                    for (call, refusal) in self.gate(calls).await? {
                        if let Some(end) = self.boundary_check()? {
                            return Ok(end);
                        }
                        let effect = Effect::Tool(call);
                        let input = effect.journal_input();
                        let seq = self.next_seq();
                        if let Some(end) = self.perform(seq, input, Ok(effect), refusal).await? {
                            return Ok(end);
                        }
                    }
                }
            }
        }
    }

    /// A call task's one step: the call, unless an earlier run of the task
    /// made it, and the task's end from its outcome. The call goes through
    /// the approval rules as a planner's would.
    async fn make_the_call(&mut self, call: ToolCall) -> Result<TaskEnd, Interrupted> {
        if self.call_outcome().is_none() {
            if let Some(end) = self.boundary_check()? {
                return Ok(end);
            }
            for (call, refusal) in self.gate(vec![call]).await? {
                let effect = Effect::Tool(call);
                let input = effect.journal_input();
                let seq = self.next_seq();
                if let Some(end) = self.perform(seq, input, Ok(effect), refusal).await? {
                    return Ok(end);
                }
            }
        }
        Ok(match self.call_outcome() {
            Some(Ok(output)) => TaskEnd::Succeeded {
                result: output_text(&output),
            },
            Some(Err(error)) => TaskEnd::Failed { error },
            None => failed(
                Code::InternalError,
                "the call task's step ended without an outcome",
            ),
        })
    }

    /// How a call task's tool step ended, if it has: held for the next
    /// write, or journaled by an earlier run.
    fn call_outcome(&self) -> Option<Result<Value, ErrorInfo>> {
        if let Some(end) = &self.unwritten_end {
            return Some(end.output.clone());
        }
        let step = self
            .steps
            .iter()
            .rev()
            .find(|step| step.kind == StepKind::Tool && step.status != StepStatus::Running)?;
        Some(match &step.error {
            Some(error) => Err(error.clone()),
            None => Ok(step.output.clone().unwrap_or(Value::Null)),
        })
    }

    /// Checks a planner's tool calls against the approval rules (the
    /// operator's, and the manifest's of the plugin offering each tool). Calls that
    /// need approval and have none yet are journaled as pending and the
    /// task waits (`Interrupted::AwaitingApproval`): none of the batch runs
    /// until each is answered. Once all are, the calls come back in order:
    /// approved ones with the approver's arguments if given, rejected ones
    /// with the error their step is journaled with instead of running.
    ///
    /// A call is known by the step it becomes (this batch's first free
    /// number, plus its place) and its id: the journal, and so the planner's
    /// choice, is the same when the task resumes.
    async fn gate(
        &mut self,
        calls: Vec<ToolCall>,
    ) -> Result<Vec<(ToolCall, Option<ErrorInfo>)>, Interrupted> {
        let rules = &self.shared.config.approvals;
        let runtime = &self.shared.runtime;
        let needs: Vec<bool> = calls
            .iter()
            .map(|call| {
                rules.needs_approval(&call.name, &call.arguments)
                    || runtime.tool_asks_approval(self.plugins(), &call.name, &call.arguments)
            })
            .collect();
        if !needs.contains(&true) {
            return Ok(calls.into_iter().map(|call| (call, None)).collect());
        }
        let expires_at = now_millis() + rules.timeout.as_millis() as i64;
        let answers = self.shared.store.approvals(&self.task.id).await?;
        let first = self.next_seq();
        let mut gated = Vec::with_capacity(calls.len());
        let mut unanswered = Vec::new();
        for (place, (mut call, needed)) in calls.into_iter().zip(needs).enumerate() {
            let step = first + place as u32;
            if !needed {
                gated.push((call, None));
                continue;
            }
            let answer = answers.iter().find(|a| {
                a.step == step
                    && a.call_id == call.id
                    && a.tool == call.name
                    && a.input == call.arguments
            });
            match answer.map(|a| (a.status, a)) {
                Some((ApprovalStatus::Approved, answer)) => {
                    if let Some(input) = &answer.edited_input {
                        call.arguments = input.clone();
                    }
                    gated.push((call, None));
                }
                Some((ApprovalStatus::Rejected, answer)) => {
                    gated.push((call, Some(rejection(answer))));
                }
                _ => unanswered.push(ApprovalRequest {
                    step,
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    input: call.arguments.clone(),
                    expires_at,
                }),
            }
        }
        if unanswered.is_empty() {
            return Ok(gated);
        }
        // The planner's last step is journaled first: the wait must not
        // leave it to run again.
        if let Some(end) = self.unwritten_end.take() {
            let (record, event) = self.shared.store.finish_step(&self.fence, end).await?;
            self.settling = None;
            self.shared.events.journaled(event);
            self.keep(record);
        }
        let event = self
            .shared
            .store
            .await_approval(&self.fence, unanswered)
            .await?;
        self.shared.events.journaled(event);
        Err(Interrupted::AwaitingApproval)
    }

    /// The plugin versions the task runs on; held before its first step.
    fn plugins(&self) -> &TaskPlugins {
        self.plugins
            .as_ref()
            .expect("a task holds its plugins before it takes a step")
    }

    /// The plugin (or external source) offering `tool`.
    fn tool_owner(&self, tool: &str) -> Option<String> {
        match self.plugins().tool_owner(tool) {
            Some(owner) => Some(owner.to_owned()),
            None => self
                .shared
                .runtime
                .catalog()
                .tool_owner(tool)
                .map(str::to_owned),
        }
    }

    /// Where the memory calls of `site`, for step `step`, go.
    fn memory_for(&mut self, step: u32, site: Site) -> MemoryHandle {
        let memory = self.memory.get_or_insert_with(|| {
            RunMemory::new(
                self.shared.store.clone(),
                self.fence.clone(),
                &self.task.tenant,
                self.task.memory_namespace.as_deref(),
                &self.shared.config.memory,
            )
        });
        memory.for_step(step, site)
    }

    fn next_seq(&self) -> u32 {
        let unwritten = self.unwritten_end.as_ref().map(|end| end.started.seq);
        let journaled = self.steps.iter().map(|s| s.seq).max();
        journaled.max(unwritten).unwrap_or(0) + 1
    }

    /// Steps run so far in this task, the unwritten end's included.
    fn step_count(&self) -> u32 {
        (self.steps.len() + usize::from(self.unwritten_end.is_some())) as u32
    }

    /// Journals the end held back for the next write, when the run stops
    /// before there is one (a shutdown), so that the step is not run again.
    async fn write_unwritten_end(&mut self) {
        let Some(end) = self.unwritten_end.take() else {
            return;
        };
        match self.shared.store.finish_step(&self.fence, end).await {
            Ok((record, event)) => {
                self.settling = None;
                self.shared.events.journaled(event);
                self.keep(record);
            }
            Err(error) => {
                tracing::warn!(task = %self.task.id, %error, "the last step's end was not journaled; it runs again on resume")
            }
        }
    }

    /// Checks, between steps, whether the task must stop.
    fn boundary_check(&self) -> Result<Option<TaskEnd>, Interrupted> {
        if self.lost.is_cancelled() {
            return Err(Interrupted::ClaimLost);
        }
        if self.shared.shutdown.is_cancelled() {
            return Err(Interrupted::Shutdown);
        }
        if self.cancel.is_cancelled() {
            return Ok(Some(TaskEnd::Cancelled));
        }
        if self.remaining().is_zero() {
            return Ok(Some(self.timed_out()));
        }
        let finished = self.step_count();
        if finished >= self.task.max_steps {
            return Ok(Some(failed(
                Code::StepLimitExceeded,
                format!(
                    "the task used all of its {} steps without finishing; raise max_steps if it needs more",
                    self.task.max_steps
                ),
            )));
        }
        Ok(None)
    }

    /// Time left before the task's time limit or its deadline, whichever
    /// comes first.
    fn remaining(&self) -> Duration {
        let started = self.task.started_at.unwrap_or(self.task.created_at);
        let end = match self.task.deadline_at {
            Some(deadline) => deadline.min(started + self.task.timeout_ms),
            None => started + self.task.timeout_ms,
        };
        Duration::from_millis((end - now_millis()).max(0) as u64)
    }

    fn timed_out(&self) -> TaskEnd {
        TaskEnd::Failed {
            error: timed_out_error(&self.task),
        }
    }

    /// Runs a plugin call, but no longer than the task has left.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, ErrorInfo> {
        match tokio::time::timeout(self.remaining(), call).await {
            Ok(result) => result.map_err(|e| ErrorInfo::new(e.code(), e.to_string())),
            Err(_) => Err(timed_out_error(&self.task)),
        }
    }

    /// The span of step `seq`, when traces are on.
    fn step_span(&self, seq: u32, effect: &Result<Effect, (StepKind, ErrorInfo)>) -> TraceSpan {
        if !self.trace.is_recording() {
            return TraceSpan::none();
        }
        let record_content = self.shared.config.trace_content;
        match effect {
            Ok(Effect::Llm(request)) => {
                spans::chat(&self.trace, &self.task.llm, seq, request, record_content)
            }
            Ok(Effect::Tool(call)) => {
                let plugin = self.tool_owner(&call.name);
                let plugin = plugin.as_deref().unwrap_or("unknown");
                spans::execute_tool(&self.trace, plugin, seq, call, record_content)
            }
            Err(_) => TraceSpan::none(),
        }
    }

    /// Journals a step, performs it, and journals how it ended. Returns the
    /// task's end when the step ends the task (an LLM failure, a timeout).
    ///
    /// `input` is the step's input as journaled; `effect` the same, typed
    /// (or why the journaled input could not be read).
    ///
    /// `refusal`, when given, is the step's outcome instead of running it
    /// (a rejected call).
    ///
    /// The step's future is boxed, as the run's nested futures are (see
    /// [`Run::run`]), so the loops that perform steps hold only a pointer.
    fn perform(
        &mut self,
        seq: u32,
        input: Value,
        effect: Result<Effect, (StepKind, ErrorInfo)>,
        refusal: Option<ErrorInfo>,
    ) -> BoxFuture<'_, Result<Option<TaskEnd>, Interrupted>> {
        Box::pin(self.perform_inline(seq, input, effect, refusal))
    }

    async fn perform_inline(
        &mut self,
        seq: u32,
        input: Value,
        effect: Result<Effect, (StepKind, ErrorInfo)>,
        refusal: Option<ErrorInfo>,
    ) -> Result<Option<TaskEnd>, Interrupted> {
        let span = &self.step_span(seq, &effect);
        let started_at = Instant::now();
        let kind = match &effect {
            Ok(effect) => effect.kind(),
            Err((kind, _)) => *kind,
        };
        // The plugin as a metric label: a tool nothing offers is `unknown`,
        // not the name the planner made up.
        let (plugin, plugin_label) = match kind {
            StepKind::Llm => (self.task.llm.clone(), self.task.llm.clone()),
            StepKind::Tool => {
                let tool = input["name"].as_str().unwrap_or_default();
                let owner = self.tool_owner(tool);
                (
                    owner.clone().unwrap_or_else(|| tool.to_owned()),
                    owner.unwrap_or_else(|| "unknown".to_owned()),
                )
            }
        };
        let (plugin_sha256, planner_sha256) =
            self.shared.runtime.step_versions(self.plugins(), &plugin);
        let versions = StepVersions {
            plugin_sha256,
            planner_sha256,
        };
        let start = StepStart {
            seq,
            kind,
            plugin,
            input,
            versions,
        };
        let store = &self.shared.store;
        let (record, mut event) = match self.unwritten_end.take() {
            None => store.start_step(&self.fence, start).await?,
            Some(end) => {
                let [(finished, finished_event), started] = store
                    .finish_step_then_start(&self.fence, end, start)
                    .await?;
                self.settling = None;
                self.shared.events.journaled(finished_event);
                self.keep(finished);
                started
            }
        };
        // The store keeps the input in the step's row only; the event gets
        // it for whoever is watching.
        if self.shared.events.has_subscribers() {
            crate::store::restore_step_input(&mut event, &record);
        }
        self.shared.events.journaled(event);
        self.remember(record);

        // Every try of a step runs under the same number, so the same
        // idempotency key: a tool with side effects can tell a retry.
        let mut context = CallContext::new(&self.task.id, seq).for_tenant(&self.task.tenant);
        if kind == StepKind::Tool {
            context.memory = self.memory_for(seq, Site::Tool);
        }
        // An LLM call, retries included, lasts no longer than its adapter's
        // call_timeout_ms: a hung provider is cut there, not retried past it.
        let llm_deadline = match kind {
            StepKind::Llm => {
                let limit = self.plugins().llm_call_timeout();
                Some(Instant::now() + limit.unwrap_or_else(|| self.remaining()))
            }
            StepKind::Tool => None,
        };
        // Budgets are checked once per step, before its first try: a call
        // that could pass a cap is not made.
        // The task's images go to the LLM with each call, never into the
        // journaled request.
        let with_images = match &effect {
            Ok(Effect::Llm(request)) => self.with_images(request),
            _ => None,
        };
        let (mut reservation, refused) = match &effect {
            _ if refusal.is_some() => (None, refusal),
            Ok(Effect::Llm(request)) => match self
                .check_budgets(with_images.as_ref().unwrap_or(request))
                .await?
            {
                Ok(reservation) => (reservation, None),
                Err(refusal) => (None, Some(refusal)),
            },
            _ => (None, None),
        };
        let mut tries = 0;
        let (output, usage, reply) = if let Some(refusal) = refused {
            (Err(refusal), None, None)
        } else {
            loop {
                let attempt = match &effect {
                    Ok(Effect::Llm(request)) => {
                        let deadline = llm_deadline
                            .unwrap_or_else(Instant::now)
                            .min(Instant::now() + self.remaining());
                        let request = with_images.as_ref().unwrap_or(request);
                        Box::pin(self.call_llm(&context, request, deadline, span)).await
                    }
                    Ok(Effect::Tool(call)) => {
                        Attempt::from(Box::pin(self.call_tool(&context, call, span)).await)
                    }
                    Err((_, unreadable)) => Attempt::from(Err(unreadable.clone())),
                };
                let Err(error) = &attempt.output else {
                    break (attempt.output, attempt.usage, attempt.reply);
                };
                let delay = self.shared.config.retry.delay(tries, attempt.retry_after);
                let time_left = llm_deadline.map_or_else(
                    || self.remaining(),
                    |end| {
                        end.saturating_duration_since(Instant::now())
                            .min(self.remaining())
                    },
                );
                let may_retry = is_transient(&error.code)
                    && self.retries_used < self.task.max_retries
                    && delay < time_left
                    && !self.cancel.is_cancelled()
                    && !self.lost.is_cancelled()
                    && !self.shared.shutdown.is_cancelled();
                if !may_retry {
                    break (attempt.output, attempt.usage, attempt.reply);
                }
                tries += 1;
                self.retries_used += 1;
                metrics::counter!(
                    crate::metrics::STEP_RETRIES,
                    "kind" => kind.as_str(),
                    "code" => crate::metrics::code_label(&error.code),
                )
                .increment(1);
                tracing::info!(
                    task = %self.task.id,
                    step = seq,
                    code = %error.code,
                    retry = tries,
                    delay_ms = delay.as_millis() as u64,
                    "retrying a step that failed with a transient error"
                );
                tokio::time::sleep(delay).await;
                if self.lost.is_cancelled() {
                    // Another worker owns the task now; it will run this step.
                    return Err(Interrupted::ClaimLost);
                }
            }
        };
        let task_end = match &output {
            Err(error) if error.code == Code::TaskTimeout.as_str() => Some(self.timed_out()),
            Err(error)
                if error.code == Code::BudgetExceeded.as_str()
                    || error.code == Code::BudgetUnpriced.as_str() =>
            {
                Some(failed(error.code.clone(), error.message.clone()))
            }
            Err(error) if kind == StepKind::Llm => Some(failed(
                error.code.clone(),
                format!("the LLM step failed: {}", error.message),
            )),
            _ => None,
        };
        spans::step_ended(
            span,
            &output,
            reply.as_ref(),
            tries,
            self.shared.config.trace_content,
        );
        let cost_nanos = match (&effect, &usage) {
            (Ok(Effect::Llm(request)), Some(usage)) => {
                let model = request
                    .model
                    .as_deref()
                    .or(reply.as_ref().map(|r| r.model.as_str()));
                let cost = self
                    .shared
                    .config
                    .budgets
                    .cost(&self.task.llm, model, usage);
                self.task.usage.add(*usage);
                self.task.cost_nanos = self.task.cost_nanos.zip(cost).map(|(a, b)| a + b);
                if let Some(reservation) = &mut reservation {
                    reservation.settle(usage.input_tokens + usage.output_tokens, cost.unwrap_or(0));
                }
                cost
            }
            _ => None,
        };
        let charge = reservation.as_ref().map(Reservation::charge);
        // What the planner will see of this step, from the typed values in
        // hand rather than decoded again from the journal.
        let view = match (effect, reply) {
            (_, Some(response)) => Some(PlannerStep::LlmReply { response }),
            (Ok(Effect::Tool(call)), None) => {
                let content = output.as_ref().ok().map(output_text);
                Some(tool_view(call, content, output.as_ref().err()))
            }
            _ => None,
        };
        metrics::histogram!(
            crate::metrics::STEP_DURATION,
            "kind" => kind.as_str(),
            "plugin" => plugin_label,
            "outcome" => crate::metrics::outcome_label(&output.as_ref().map_err(|e| &e.code)),
        )
        .record(started_at.elapsed());
        let started = self.take_step(seq);
        let end = StepEnd {
            started,
            output,
            usage,
            cost_nanos,
            charge,
            finished_at: now_millis(),
        };
        match view {
            // Journaled with the next write, once the planner has chosen.
            Some(view) => {
                self.planner_steps.insert(seq, view);
                self.unwritten_end = Some(end);
                self.settling = reservation;
            }
            None => {
                let (record, event) = self.shared.store.finish_step(&self.fence, end).await?;
                drop(reservation);
                self.shared.events.journaled(event);
                self.remember(record);
            }
        }
        Ok(task_end)
    }

    /// Takes the journaled record of step `seq` out of the run, to be put
    /// back (by [`Run::remember`]) once its end is journaled.
    fn take_step(&mut self, seq: u32) -> StepRecord {
        let at = self
            .steps
            .iter()
            .position(|s| s.seq == seq)
            .expect("a step is journaled before it runs");
        self.steps.remove(at)
    }

    fn remember(&mut self, record: StepRecord) {
        match planner_view(&record) {
            Some(view) => self.planner_steps.insert(record.seq, view),
            None => self.planner_steps.remove(record.seq),
        }
        self.keep(record);
    }

    fn keep(&mut self, mut record: StepRecord) {
        // An LLM step's request and reply are the largest part of a task's
        // memory (the tools' schemas and the whole conversation, as JSON
        // trees), and once journaled nothing in the run reads them again:
        // the planner has its own view of the reply (`planner_steps`), and
        // the store writes neither again when the step ends.
        if record.kind == StepKind::Llm {
            record.input = Value::Null;
            record.output = None;
        }
        match self.steps.iter_mut().find(|s| s.seq == record.seq) {
            Some(existing) => *existing = record,
            None => self.steps.push(record),
        }
    }

    /// Whether a cap applies to this task's LLM calls: its own, or its
    /// tenant's.
    fn has_budget(&self) -> bool {
        !self.task.budget.is_empty()
            || self
                .shared
                .config
                .budgets
                .tenant_cap(&self.task.tenant)
                .is_some()
    }

    /// Checks the task's caps and its tenant's before `request` is sent:
    /// the worst case of the call (see [`budgets::Budgets::estimate`]) must
    /// fit in what is left. Holds the tenant's share until the call's usage
    /// is journaled. Costs nothing when no cap applies.
    async fn check_budgets(
        &self,
        request: &crate::protocol::ChatRequest,
    ) -> Result<Result<Option<Reservation>, ErrorInfo>, Interrupted> {
        if !self.has_budget() {
            return Ok(Ok(None));
        }
        let budgets = &self.shared.config.budgets;
        let refused = |refusal: budgets::Refusal| {
            let code = if refusal.unpriced {
                Code::BudgetUnpriced
            } else {
                Code::BudgetExceeded
            };
            Ok(Err(ErrorInfo::new(code, refusal.message)))
        };
        let estimate = budgets.estimate(&self.task.llm, request);
        if let Err(refusal) = budgets::check_task(
            &self.task.budget,
            &self.task.usage,
            self.task.cost_nanos,
            &estimate,
        ) {
            return refused(refusal);
        }
        let tenant = &self.task.tenant;
        let Some(cap) = budgets.tenant_cap(tenant) else {
            return Ok(Ok(None));
        };
        let period = cap.period.at(now_millis());
        let (mark, used) = match budgets.recent_read(tenant, &period.key) {
            Some(read) => read,
            None => {
                let mark = budgets.mark(tenant, &period.key);
                let used = self.shared.store.period_usage(tenant, &period.key).await?;
                budgets.note_read(tenant, &period.key, mark, used);
                (mark, used)
            }
        };
        match budgets.reserve_for_tenant(tenant, &cap, &period, mark, used, &estimate) {
            Ok(reservation) => Ok(Ok(Some(reservation))),
            Err(refusal) => refused(refusal),
        }
    }

    /// `request` with the task's images attached (see
    /// [`crate::images::attach`]); `None` when there are none to attach.
    fn with_images(&self, request: &ChatRequest) -> Option<ChatRequest> {
        // Only a tool output that is a list can hold images.
        let tool_lists = || {
            self.steps
                .iter()
                .any(|s| s.kind == StepKind::Tool && s.output.as_ref().is_some_and(Value::is_array))
        };
        if self.task.images.is_empty() && !tool_lists() {
            return None;
        }
        let mut request = request.clone();
        let tool_images = |call_id: &str| {
            self.steps
                .iter()
                .filter(|s| s.kind == StepKind::Tool && s.input["id"] == call_id)
                .find_map(|s| crate::images::tool_output(s.output.as_ref()?))
                .map(|(_, images)| images)
                .unwrap_or_default()
        };
        crate::images::attach(
            &mut request,
            &self.task.goal,
            &self.task.images,
            tool_images,
        )
        .then_some(request)
    }

    /// Sends a chat request; the adapter's spans go under `trace` (the
    /// step's).
    async fn call_llm(
        &self,
        context: &CallContext,
        request: &ChatRequest,
        deadline: Instant,
        trace: &TraceSpan,
    ) -> Attempt {
        let (deltas, streamed) = mpsc::unbounded_channel::<String>();
        let forward = tokio::spawn(journal_deltas(
            streamed,
            DeltaJournal {
                store: self.shared.store.clone(),
                events: self.shared.events.clone(),
                fence: self.fence.clone(),
                step: context.step,
                config: self.shared.config.events.clone(),
            },
        ));
        let result = self
            .shared
            .runtime
            .complete(
                self.plugins(),
                context,
                request,
                Some(deltas),
                deadline,
                trace,
            )
            .await;
        let _ = forward.await;
        if let Ok(response) = &result
            && let Some(usage) = &response.usage
        {
            let model = request.model.as_deref().unwrap_or(&response.model);
            crate::metrics::llm_tokens(
                &self.task.llm,
                Some(model),
                usage.input_tokens,
                usage.output_tokens,
            );
        }
        match result {
            Ok(response) => Attempt {
                usage: response.usage,
                output: Ok(json!(response)),
                retry_after: None,
                reply: Some(response),
            },
            // The task's own time ran out first.
            Err(_) if self.remaining().is_zero() => Attempt::from(Err(timed_out_error(&self.task))),
            Err(CallError::Llm(error)) => Attempt {
                output: Err(llm_error_info(&error)),
                usage: None,
                retry_after: error.retry_after_ms.map(Duration::from_millis),
                reply: None,
            },
            Err(error) => Attempt::from(Err(ErrorInfo::new(error.code(), error.to_string()))),
        }
    }

    /// Runs a tool call; its plugin's span goes under `trace` (the step's).
    async fn call_tool(
        &self,
        context: &CallContext,
        call: &ToolCall,
        trace: &TraceSpan,
    ) -> Result<Value, ErrorInfo> {
        if !self.task.tools.contains(&call.name) {
            return Err(ErrorInfo::new(
                Code::ToolNotAllowed,
                format!(
                    "tool {:?} is not one of this task's tools ({})",
                    call.name,
                    self.task.tools.join(", ")
                ),
            ));
        }
        self.bounded(self.shared.runtime.invoke_tool(
            self.plugins(),
            &call.name,
            context,
            &call.arguments,
            trace,
        ))
        .await
    }
}

/// The plugin versions a task's journal recorded: the latest of each
/// plugin, and of the planner.
fn recorded_versions(steps: &[StepRecord]) -> RecordedVersions {
    let mut recorded = RecordedVersions::default();
    let mut in_order: Vec<&StepRecord> = steps.iter().collect();
    in_order.sort_by_key(|step| step.seq);
    for step in in_order {
        if let Some(sha) = &step.versions.plugin_sha256 {
            recorded.plugins.insert(step.plugin.clone(), sha.clone());
        }
        if let Some(sha) = &step.versions.planner_sha256 {
            recorded.planner = Some(sha.clone());
        }
    }
    recorded
}

/// Where a step's streamed LLM text goes: the task's journal, then its
/// live subscribers.
struct DeltaJournal {
    store: Arc<dyn crate::store::Store>,
    events: crate::events::EventBus,
    fence: Fence,
    step: u32,
    config: crate::events::EventsConfig,
}

/// The most streamed text gathered into one `llm.delta` event.
const MAX_DELTA_EVENT_BYTES: usize = 4096;

/// Journals the text an LLM call streams as `llm.delta` events, gathered
/// for `delta_interval` (or [`MAX_DELTA_EVENT_BYTES`]) into one event each,
/// and publishes each once journaled, so live subscribers and those who
/// reconnect see the same events with the same ids. Past
/// `delta_bytes_per_step`, the last event is marked `truncated` and the
/// rest is left to the step's reply. Ends when the call drops its sender.
async fn journal_deltas(mut streamed: mpsc::UnboundedReceiver<String>, journal: DeltaJournal) {
    let mut room = journal.config.delta_bytes_per_step;
    let mut open = true;
    while open && room > 0 {
        let Some(mut text) = streamed.recv().await else {
            return;
        };
        let gathered_until = tokio::time::Instant::now() + journal.config.delta_interval;
        while text.len() < MAX_DELTA_EVENT_BYTES {
            match tokio::time::timeout_at(gathered_until, streamed.recv()).await {
                Ok(Some(more)) => text.push_str(&more),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let truncated = text.len() > room;
        if truncated {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        room = if truncated { 0 } else { room - text.len() };
        let mut data = json!({"step": journal.step, "text": text});
        if truncated {
            data["truncated"] = json!(true);
        }
        match journal
            .store
            .append_event(&journal.fence, crate::store::event_kind::LLM_DELTA, data)
            .await
        {
            Ok(event) => journal.events.journaled(event),
            // The claim is lost or the store is failing: the step's own
            // end will say so; the text is in its reply either way.
            Err(error) => {
                tracing::debug!(%error, "streamed text not journaled");
                return;
            }
        }
    }
    // Past the cap: what still streams is only in the step's reply.
    while streamed.recv().await.is_some() {}
}

/// The planner's view of each finished step, in step order. A sorted list,
/// since a task has few steps: a `BTreeMap`'s first node has room for 11,
/// about 2.8 KB per task where a view is about 250 bytes, and thousands of
/// tasks wait at once.
#[derive(Default)]
struct PlannerSteps(Vec<(u32, PlannerStep)>);

impl PlannerSteps {
    fn position(&self, seq: u32) -> Result<usize, usize> {
        self.0.binary_search_by_key(&seq, |(s, _)| *s)
    }

    fn insert(&mut self, seq: u32, view: PlannerStep) {
        match self.position(seq) {
            Ok(at) => self.0[at].1 = view,
            Err(at) => self.0.insert(at, (seq, view)),
        }
    }

    fn remove(&mut self, seq: u32) {
        if let Ok(at) = self.position(seq) {
            self.0.remove(at);
        }
    }

    fn values(&self) -> impl Iterator<Item = &PlannerStep> {
        self.0.iter().map(|(_, view)| view)
    }
}

impl FromIterator<(u32, PlannerStep)> for PlannerSteps {
    fn from_iter<I: IntoIterator<Item = (u32, PlannerStep)>>(views: I) -> Self {
        let mut steps = Self::default();
        for (seq, view) in views {
            steps.insert(seq, view);
        }
        steps
    }
}

/// What a step performs: its journaled input, typed.
enum Effect {
    Llm(Box<ChatRequest>),
    Tool(ToolCall),
}

impl Effect {
    fn kind(&self) -> StepKind {
        match self {
            Self::Llm(_) => StepKind::Llm,
            Self::Tool(_) => StepKind::Tool,
        }
    }

    /// The step's input as the journal keeps it.
    fn journal_input(&self) -> Value {
        match self {
            Self::Llm(request) => json!(request),
            Self::Tool(call) => json!(call),
        }
    }

    /// The effect a journaled step asked for, or why it cannot be read (the
    /// step then fails with `invalid_step_input`).
    fn from_journal(kind: StepKind, input: &Value) -> Result<Self, (StepKind, ErrorInfo)> {
        let unreadable =
            |e: serde_json::Error| (kind, ErrorInfo::new(Code::InvalidStepInput, e.to_string()));
        match kind {
            StepKind::Llm => ChatRequest::deserialize(input)
                .map(|request| Self::Llm(Box::new(request)))
                .map_err(unreadable),
            StepKind::Tool => ToolCall::deserialize(input)
                .map(Self::Tool)
                .map_err(unreadable),
        }
    }
}

/// One try of a step.
struct Attempt {
    output: Result<Value, ErrorInfo>,
    usage: Option<Usage>,
    /// How long the provider asked us to wait before trying again.
    retry_after: Option<Duration>,
    /// An LLM's reply, typed (its JSON is `output`).
    reply: Option<ChatResponse>,
}

impl From<Result<Value, ErrorInfo>> for Attempt {
    fn from(output: Result<Value, ErrorInfo>) -> Self {
        Self {
            output,
            usage: None,
            retry_after: None,
            reply: None,
        }
    }
}

/// An LLM error for the journal, with the provider's answer kept.
fn llm_error_info(error: &LlmError) -> ErrorInfo {
    let mut message = error.message.clone();
    if let Some(body) = error.body.as_deref().filter(|b| !b.is_empty()) {
        let status = error.status.map(|s| format!(" {s}")).unwrap_or_default();
        message.push_str(&format!("; the provider answered{status}: {body}"));
    }
    ErrorInfo::new(error.kind.code(), message)
}

fn timed_out_error(task: &TaskRecord) -> ErrorInfo {
    if let Some(deadline) = task.deadline_at
        && now_millis() >= deadline
    {
        return ErrorInfo::new(
            Code::DeadlineExceeded,
            format!(
                "the task did not finish by its deadline, {}",
                crate::rfc3339::format(deadline)
            ),
        );
    }
    ErrorInfo::new(
        Code::TaskTimeout,
        format!(
            "the task ran past its time limit of {}",
            humantime::format_duration(Duration::from_millis(task.timeout_ms as u64))
        ),
    )
}

/// The error a rejected call's step is journaled with: the planner sees
/// it as the call's result.
fn rejection(answer: &ApprovalRecord) -> ErrorInfo {
    let by = answer.decided_by.as_deref().unwrap_or("unknown");
    if by == "timeout" {
        return ErrorInfo::new(
            Code::ApprovalRejected,
            "the call needed approval and none came in time; it was not run",
        );
    }
    let mut message = format!("the call was rejected by {by}; it was not run");
    if let Some(comment) = answer.comment.as_deref().filter(|c| !c.is_empty()) {
        message.push_str(&format!(": {comment}"));
    }
    ErrorInfo::new(Code::ApprovalRejected, message)
}

fn failed(code: impl Into<String>, message: impl Into<String>) -> TaskEnd {
    TaskEnd::Failed {
        error: ErrorInfo::new(code, message),
    }
}

/// `options.<section>` of a task, or an empty object.
fn option_section(options: &Value, section: &str) -> Value {
    match options.get(section) {
        Some(value @ Value::Object(_)) => value.clone(),
        _ => json!({}),
    }
}

/// A finished step as the planner sees it; running steps are not shown.
pub(super) fn planner_view(step: &StepRecord) -> Option<PlannerStep> {
    if step.status == StepStatus::Running {
        return None;
    }
    match step.kind {
        StepKind::Llm => Some(match &step.output {
            Some(output) => llm_reply_view(ChatResponse::deserialize(output)),
            None => llm_failed_view(step.error.as_ref()),
        }),
        StepKind::Tool => {
            let call = ToolCall::deserialize(&step.input).ok()?;
            let content = step.output.as_ref().map(output_text);
            Some(tool_view(call, content, step.error.as_ref()))
        }
    }
}

/// [`planner_view`] of an earlier task's finished step, parsed straight
/// from the journal's text (a thread's history).
pub(super) fn history_view(step: &HistoryStep) -> Option<PlannerStep> {
    match step.kind {
        StepKind::Llm => Some(match &step.output {
            Some(output) => llm_reply_view(serde_json::from_str(output)),
            None => llm_failed_view(step.error.as_ref()),
        }),
        StepKind::Tool => {
            let call = serde_json::from_str(step.call.as_deref()?).ok()?;
            // A string output is its text; a list may hold images, which
            // are left out; any other is its JSON, as stored.
            let content = step.output.as_ref().map(|output| {
                if output.starts_with('[') {
                    serde_json::from_str(output)
                        .map_or_else(|_| output.clone(), |v| output_text(&v))
                } else {
                    serde_json::from_str::<String>(output).unwrap_or_else(|_| output.clone())
                }
            });
            Some(tool_view(call, content, step.error.as_ref()))
        }
    }
}

fn llm_reply_view(reply: serde_json::Result<ChatResponse>) -> PlannerStep {
    match reply {
        Ok(response) => PlannerStep::LlmReply { response },
        Err(e) => PlannerStep::LlmFailed {
            message: format!("the journaled reply is unreadable: {e}"),
        },
    }
}

fn llm_failed_view(error: Option<&ErrorInfo>) -> PlannerStep {
    PlannerStep::LlmFailed {
        message: error.map_or_else(|| "unknown error".to_owned(), |e| e.message.clone()),
    }
}

/// What a planner reads of a tool's output: a string's text, any other
/// value's JSON, except that an output with images (MCP's content shape)
/// reads as its text with a note in each image's place: the images go to
/// the LLM beside the text (see [`crate::images`]).
fn output_text(output: &Value) -> String {
    match output {
        Value::String(text) => text.clone(),
        other => match crate::images::tool_output(other) {
            Some((text, _)) => text,
            None => other.to_string(),
        },
    }
}

/// A tool step as the planner sees it: `content` is a string output's
/// text, or any other output's JSON.
fn tool_view(call: ToolCall, content: Option<String>, error: Option<&ErrorInfo>) -> PlannerStep {
    let (content, is_error) = match (content, error) {
        (Some(text), _) => (text, false),
        (None, Some(error)) => (format!("{}: {}", error.code, error.message), true),
        (None, None) => ("the tool returned nothing".to_owned(), true),
    };
    PlannerStep::ToolResult {
        result: ToolResult {
            call_id: call.id.clone(),
            name: call.name.clone(),
            content,
            is_error,
        },
        call,
    }
}
