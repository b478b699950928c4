//! Rows into records, the same way whichever driver fetched them: sqlx for
//! the pooled readers, rusqlite for the writer.

use sqlx::Row as _;
use sqlx::sqlite::SqliteRow;

use crate::memory::MemoryRecord;
use crate::protocol::Usage;
use crate::schedules::MissedTicks;
use crate::store::memories::MemoryColumns;
use crate::store::schedules::{ScheduleRecord, TaskTemplate};
use crate::store::{
    ErrorInfo, EventRecord, HistoryStep, Millis, Result, StepKind, StepRecord, StepStatus,
    StepVersions, StoreError, TaskBudget, TaskRecord, TaskStatus, parse_json,
};

/// Named columns of a row, as both drivers give them.
pub(super) trait Columns {
    fn text(&self, column: &str) -> Result<String>;
    fn optional_text(&self, column: &str) -> Result<Option<String>>;
    fn integer(&self, column: &str) -> Result<i64>;
    fn optional_integer(&self, column: &str) -> Result<Option<i64>>;
    fn real(&self, column: &str) -> Result<f64>;
    /// A column only some queries select (a joined payload): `None` where
    /// the query has no such column.
    fn joined_text(&self, column: &str) -> Option<String>;
}

impl Columns for SqliteRow {
    fn text(&self, column: &str) -> Result<String> {
        Ok(self.try_get(column)?)
    }
    fn optional_text(&self, column: &str) -> Result<Option<String>> {
        Ok(self.try_get(column)?)
    }
    fn integer(&self, column: &str) -> Result<i64> {
        Ok(self.try_get(column)?)
    }
    fn optional_integer(&self, column: &str) -> Result<Option<i64>> {
        Ok(self.try_get(column)?)
    }
    fn real(&self, column: &str) -> Result<f64> {
        Ok(self.try_get(column)?)
    }
    fn joined_text(&self, column: &str) -> Option<String> {
        self.try_get::<Option<String>, _>(column).ok().flatten()
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, column: &str) -> Result<String> {
        Ok(self.get(column)?)
    }
    fn optional_text(&self, column: &str) -> Result<Option<String>> {
        Ok(self.get(column)?)
    }
    fn integer(&self, column: &str) -> Result<i64> {
        Ok(self.get(column)?)
    }
    fn optional_integer(&self, column: &str) -> Result<Option<i64>> {
        Ok(self.get(column)?)
    }
    fn real(&self, column: &str) -> Result<f64> {
        Ok(self.get(column)?)
    }
    fn joined_text(&self, column: &str) -> Option<String> {
        self.get::<_, Option<String>>(column).ok().flatten()
    }
}

/// The records of a rusqlite query whose rows each decode to a `Result`.
pub(super) fn collect<T>(
    rows: impl Iterator<Item = rusqlite::Result<Result<T>>>,
) -> Result<Vec<T>> {
    rows.map(|row| row?).collect()
}

pub(super) fn task_from_row(row: &impl Columns) -> Result<TaskRecord> {
    let status = row.text("status")?;
    let tools = row.text("tools")?;
    Ok(TaskRecord {
        id: row.text("id")?,
        tenant: row.text("tenant")?,
        idempotency_key: row.optional_text("idempotency_key")?,
        priority: row.integer("priority")? as i32,
        run_at: row.optional_integer("run_at")?,
        deadline_at: row.optional_integer("deadline_at")?,
        status: TaskStatus::parse(&status).ok_or_else(|| corrupt_enum("task status", &status))?,
        goal: row.text("goal")?,
        planner: row.text("planner")?,
        llm: row.text("llm")?,
        model: row.optional_text("model")?,
        tools: serde_json::from_str(&tools).map_err(|source| StoreError::Corrupt {
            what: "task tools",
            source,
        })?,
        options: parse_json(&row.text("options")?, "task options")?,
        max_steps: row.integer("max_steps")? as u32,
        max_retries: row.integer("max_retries")? as u32,
        timeout_ms: row.integer("timeout_ms")?,
        result: row.optional_text("result")?,
        error: error_from_row(row)?,
        attempt: row.integer("attempt")?,
        cancel_requested: row.integer("cancel_requested")? != 0,
        usage: Usage {
            input_tokens: row.integer("input_tokens")? as u64,
            output_tokens: row.integer("output_tokens")? as u64,
        },
        cost_nanos: row.optional_integer("cost_nanos")?,
        budget: TaskBudget {
            max_tokens: row.optional_integer("budget_max_tokens")?.map(|n| n as u64),
            max_cost_nanos: row.optional_integer("budget_max_cost_nanos")?,
        },
        created_at: row.integer("created_at")?,
        started_at: row.optional_integer("started_at")?,
        finished_at: row.optional_integer("finished_at")?,
        trace_parent: row.optional_text("trace_parent")?,
        schedule_id: row.optional_text("schedule_id")?,
        scheduled_for: row.optional_integer("scheduled_for")?,
        thread: row.optional_text("thread")?,
        memory_namespace: row.optional_text("memory_namespace")?,
        response_format: match row.optional_text("response_format")? {
            Some(text) => {
                Some(
                    serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                        what: "task response format",
                        source,
                    })?,
                )
            }
            None => None,
        },
        call: match row.optional_text("tool_call")? {
            Some(text) => {
                Some(
                    serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                        what: "call task's tool call",
                        source,
                    })?,
                )
            }
            None => None,
        },
        images: match row.optional_text("images")? {
            Some(text) => serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                what: "task images",
                source,
            })?,
            None => Vec::new(),
        },
    })
}

pub(super) fn schedule_from_row(row: &impl Columns) -> Result<ScheduleRecord> {
    let missed = row.text("missed_ticks")?;
    Ok(ScheduleRecord {
        id: row.text("id")?,
        tenant: row.text("tenant")?,
        name: row.optional_text("name")?,
        cron: row.text("cron")?,
        timezone: row.text("timezone")?,
        template: TaskTemplate::from_json(&row.text("template")?)?,
        missed_ticks: MissedTicks::parse(&missed)
            .ok_or_else(|| corrupt_enum("missed-tick policy", &missed))?,
        paused: row.integer("paused")? != 0,
        next_run_at: row.optional_integer("next_run_at")?,
        last_run_at: row.optional_integer("last_run_at")?,
        waiting_for_room: row.integer("waiting_for_room")? != 0,
        created_at: row.integer("created_at")?,
    })
}

/// A step, with its payloads from `payloads` where they were stored out of
/// line (the `steps_with_payloads!` join).
pub(super) fn step_from_row(row: &impl Columns) -> Result<StepRecord> {
    let kind = row.text("kind")?;
    let status = row.text("status")?;
    let input = match row.joined_text("input_body") {
        Some(body) => body,
        None => row.text("input")?,
    };
    let output = match row.joined_text("output_body") {
        Some(body) => Some(body),
        None => row.optional_text("output")?,
    };
    let input_tokens = row.optional_integer("input_tokens")?;
    let output_tokens = row.optional_integer("output_tokens")?;
    Ok(StepRecord {
        seq: row.integer("seq")? as u32,
        kind: StepKind::parse(&kind).ok_or_else(|| corrupt_enum("step kind", &kind))?,
        plugin: row.text("plugin")?,
        status: StepStatus::parse(&status).ok_or_else(|| corrupt_enum("step status", &status))?,
        input: parse_json(&input, "step input")?,
        output: output.map(|o| parse_json(&o, "step output")).transpose()?,
        error: error_from_row(row)?,
        usage: match (input_tokens, output_tokens) {
            (None, None) => None,
            (i, o) => Some(Usage {
                input_tokens: i.unwrap_or(0) as u64,
                output_tokens: o.unwrap_or(0) as u64,
            }),
        },
        attempt: row.integer("attempt")?,
        started_at: row.integer("started_at")?,
        finished_at: row.optional_integer("finished_at")?,
        versions: StepVersions {
            plugin_sha256: row.optional_text("plugin_sha256")?,
            planner_sha256: row.optional_text("planner_sha256")?,
        },
    })
}

/// A row of `history_steps`: its JSON stays text.
pub(super) fn history_step_from_row(row: &impl Columns) -> Result<HistoryStep> {
    let kind = row.text("kind")?;
    Ok(HistoryStep {
        task_id: row.text("task_id")?,
        seq: row.integer("seq")? as u32,
        kind: StepKind::parse(&kind).ok_or_else(|| corrupt_enum("step kind", &kind))?,
        call: row.optional_text("call")?,
        output: row.optional_text("output")?,
        error: error_from_row(row)?,
    })
}

fn error_from_row(row: &impl Columns) -> Result<Option<ErrorInfo>> {
    let message = row.optional_text("error_message")?;
    Ok(row.optional_text("error_code")?.map(|code| ErrorInfo {
        code,
        message: message.unwrap_or_default(),
    }))
}

pub(super) fn event_from_row(row: &impl Columns) -> Result<EventRecord> {
    Ok(EventRecord {
        task_id: row.text("task_id")?,
        seq: row.integer("seq")?,
        kind: row.text("kind")?,
        data: parse_json(&row.text("data")?, "event data")?,
        at: row.integer("at")? as Millis,
    })
}

fn corrupt_enum(what: &str, value: &str) -> StoreError {
    StoreError::Config(format!("unknown {what} {value:?} in the database"))
}

pub(super) fn approval_from_row(row: &impl Columns) -> Result<crate::store::ApprovalRecord> {
    crate::store::approvals::ApprovalColumns {
        task_id: row.text("task_id")?,
        step: row.integer("step")?,
        call_id: row.text("call_id")?,
        tool: row.text("tool")?,
        input: row.text("input")?,
        status: row.text("status")?,
        edited_input: row.optional_text("edited_input")?,
        comment: row.optional_text("comment")?,
        decided_by: row.optional_text("decided_by")?,
        decided_at: row.optional_integer("decided_at")?,
        requested_at: row.integer("requested_at")?,
        expires_at: row.integer("expires_at")?,
    }
    .into_record()
}

pub(super) fn memory_from_row(row: &impl Columns) -> Result<MemoryRecord> {
    Ok(MemoryColumns {
        id: row.text("id")?,
        namespace: row.text("namespace")?,
        text: row.text("text")?,
        metadata: row.text("metadata")?,
        created_at: row.integer("created_at")?,
        task_id: row.optional_text("task_id")?,
        score: row.real("score")?,
    }
    .into())
}
