//! What the store keeps of schedules, and what both engines share in
//! firing them: the records, the task a run becomes, and the decision per
//! due schedule (made by [`crate::schedules::firing`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{EventRecord, Millis, NewTask, SqlDialect, StoreError, TaskRecord, cut_page};
use crate::budgets::TaskBudget;
use crate::protocol::{Image, ResponseFormat, ToolCall};
use crate::schedules::{CronSpec, Firing, MissedTicks};

/// The task each run of a schedule creates: `POST /v1/tasks`'s body as it
/// was validated and given its defaults when the schedule was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub goal: String,
    pub planner: String,
    pub llm: String,
    pub model: Option<String>,
    pub tools: Vec<String>,
    pub options: Value,
    pub max_steps: u32,
    pub max_retries: u32,
    pub timeout_ms: i64,
    pub priority: i32,
    /// The caps each run gets (`budget` in the task body); absent in
    /// templates stored before budgets existed.
    #[serde(default, skip_serializing_if = "TaskBudget::is_empty")]
    pub budget: TaskBudget,
    /// The memory namespace each run's plugins remember in
    /// (`memory_namespace` in the task body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_namespace: Option<String>,
    /// The JSON Schema each run's answer must match (`response_format` in
    /// the task body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// A call task's tool call (`call` in the task body): each run makes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<ToolCall>,
    /// The images that go with each run's goal (`images` in the task body).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
}

impl TaskTemplate {
    /// The template of a validated task (its times and key are not kept:
    /// each run gets its own).
    pub fn of(task: &NewTask) -> Self {
        Self {
            goal: task.goal.clone(),
            planner: task.planner.clone(),
            llm: task.llm.clone(),
            model: task.model.clone(),
            tools: task.tools.clone(),
            options: task.options.clone(),
            max_steps: task.max_steps,
            max_retries: task.max_retries,
            timeout_ms: task.timeout.as_millis() as i64,
            priority: task.priority,
            budget: task.budget,
            memory_namespace: task.memory_namespace.clone(),
            response_format: task.response_format.clone(),
            call: task.call.clone(),
            images: task.images.clone(),
        }
    }

    /// The task a run for `tick` of schedule `schedule` becomes.
    pub fn run(&self, tenant: &str, schedule: &str, tick: Millis) -> NewTask {
        NewTask {
            tenant: tenant.to_owned(),
            idempotency_key: None,
            priority: self.priority,
            run_at: None,
            deadline_at: None,
            goal: self.goal.clone(),
            planner: self.planner.clone(),
            llm: self.llm.clone(),
            model: self.model.clone(),
            tools: self.tools.clone(),
            options: self.options.clone(),
            max_steps: self.max_steps,
            max_retries: self.max_retries,
            timeout: Duration::from_millis(self.timeout_ms.max(0) as u64),
            trace_parent: None,
            schedule: Some(ScheduledRun {
                schedule_id: schedule.to_owned(),
                tick,
            }),
            budget: self.budget,
            thread: None,
            memory_namespace: self.memory_namespace.clone(),
            response_format: self.response_format.clone(),
            call: self.call.clone(),
            images: self.images.clone(),
        }
    }

    pub(super) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a template serializes")
    }

    pub(super) fn from_json(text: &str) -> Result<Self, StoreError> {
        serde_json::from_str(text).map_err(|source| StoreError::Corrupt {
            what: "schedule template",
            source,
        })
    }
}

/// Which schedule made a task, and for which of its ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRun {
    pub schedule_id: String,
    pub tick: Millis,
}

/// A schedule to create, validated.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub tenant: String,
    pub name: Option<String>,
    pub cron: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub missed_ticks: MissedTicks,
    pub paused: bool,
    /// Its first tick.
    pub next_run_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub id: String,
    pub tenant: String,
    pub name: Option<String>,
    pub cron: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub missed_ticks: MissedTicks,
    pub paused: bool,
    /// When it is due next; `None` when its expression matches no time to
    /// come.
    pub next_run_at: Option<Millis>,
    /// The tick of its latest run.
    pub last_run_at: Option<Millis>,
    /// Its due run found the queue full and waits for room.
    pub waiting_for_room: bool,
    pub created_at: Millis,
}

impl ScheduleRecord {
    /// What the loop does with this (due) schedule at `rules.now`.
    pub fn firing(&self, rules: &FireRules) -> Firing {
        let due = self.next_run_at.unwrap_or(rules.now);
        match CronSpec::parse(&self.cron, &self.timezone) {
            Ok(spec) => crate::schedules::firing(
                &spec,
                due,
                rules.now,
                rules.grace.as_millis() as Millis,
                self.missed_ticks,
                self.waiting_for_room,
            ),
            // Checked when it was created; a zone a newer tz database
            // dropped, say, stops it rather than the loop.
            Err(error) => {
                tracing::error!(schedule = %self.id, %error, "a stored schedule no longer parses; it stops");
                Firing {
                    run_for: None,
                    next_run_at: None,
                }
            }
        }
    }
}

/// A page of a tenant's schedules, newest first.
#[derive(Debug, Clone)]
pub struct ScheduleQuery {
    pub tenant: String,
    /// Schedules older than this id.
    pub before: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct SchedulePage {
    pub schedules: Vec<ScheduleRecord>,
    pub next_cursor: Option<String>,
}

impl ScheduleQuery {
    /// The page size asked for, within what one page may hold.
    pub(super) fn page_size(&self) -> u32 {
        self.limit.clamp(1, 500)
    }

    /// The statement listing this page. The values to bind, in order, are
    /// [`ScheduleQuery::list_parameters`] and then one more than the page
    /// size.
    pub(super) fn list_statement(&self, dialect: &SqlDialect) -> String {
        let placeholder = dialect.placeholder;
        let before = if self.before.is_some() {
            format!(" AND id < {}", placeholder(2))
        } else {
            String::new()
        };
        let limit = placeholder(if self.before.is_some() { 3 } else { 2 });
        format!(
            "SELECT * FROM schedules WHERE tenant = {}{before} ORDER BY id DESC LIMIT {limit}",
            placeholder(1)
        )
    }

    pub(super) fn list_parameters(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.tenant.as_str()).chain(self.before.as_deref())
    }

    /// Turns the rows of one more than a page into the page and its cursor.
    pub(super) fn page(&self, mut schedules: Vec<ScheduleRecord>) -> SchedulePage {
        let next_cursor = cut_page(&mut schedules, self.page_size(), |schedule| &schedule.id);
        SchedulePage {
            schedules,
            next_cursor,
        }
    }
}

/// How [`super::Store::fire_due_schedules`] fires.
#[derive(Debug, Clone)]
pub struct FireRules {
    pub now: Millis,
    /// The most schedules one call fires.
    pub max: usize,
    /// How late a tick may be reached and still count as on time.
    pub grace: Duration,
    /// The queue caps a run waits under, as a submission is refused under
    /// them (`max_queued_tasks`, `max_queued_per_tenant`).
    pub max_queued_tasks: u64,
    pub max_queued_per_tenant: Option<u64>,
}

/// What one call of [`super::Store::fire_due_schedules`] did.
#[derive(Debug, Default)]
pub struct Fired {
    /// The runs created, each with its `task.queued` event.
    pub runs: Vec<(TaskRecord, EventRecord)>,
    /// Due schedules whose run waits for room in the queue.
    pub waiting: usize,
    /// Due schedules taken in all (fired, skipped or left waiting).
    pub taken: usize,
}

/// The data of a scheduled run's `task.queued` event.
pub(super) fn queued_event_data(task: &NewTask) -> Value {
    match &task.schedule {
        None => serde_json::json!({"status": "queued"}),
        Some(run) => serde_json::json!({
            "status": "queued",
            "schedule_id": run.schedule_id,
            "scheduled_for": crate::rfc3339::format(run.tick),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::new_task;

    #[test]
    fn a_templates_response_format_goes_to_each_run_and_old_templates_have_none() {
        let format = ResponseFormat {
            name: "calc".into(),
            schema: serde_json::json!({"type": "object"}),
            strict: true,
        };
        let task = NewTask {
            response_format: Some(format.clone()),
            ..new_task("x", 0, None)
        };
        let template = TaskTemplate::from_json(&TaskTemplate::of(&task).to_json()).unwrap();
        assert_eq!(template.response_format.as_ref(), Some(&format));
        assert_eq!(
            template.run("default", "s1", 0).response_format,
            Some(format)
        );
        let mut old: Value = serde_json::from_str(&template.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("response_format");
        let old = TaskTemplate::from_json(&old.to_string()).unwrap();
        assert_eq!(old.response_format, None, "a template stored before");
    }
}
