//! What the store keeps of approvals (docs/architecture.md, "Approvals"):
//! the records, and the statements both engines run, written once with
//! `$n` parameters (SQLite reads them as `?n`, see [`sqlite`]).

use serde::Serialize;
use serde_json::{Value, json};

use super::{EventRecord, Millis, Result, StoreError, parse_json};

/// How a call that needs approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Rejected]
            .into_iter()
            .find(|status| status.as_str() == s)
    }
}

/// One tool call that needs approval, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalRecord {
    pub task_id: String,
    /// The step the call runs as (or is rejected as).
    pub step: u32,
    pub call_id: String,
    pub tool: String,
    /// The arguments the planner asked for.
    pub input: Value,
    pub status: ApprovalStatus,
    /// The arguments the approver gave instead, if any: what the tool gets.
    pub edited_input: Option<Value>,
    pub comment: Option<String>,
    /// Who decided: the API token's name, `anonymous` without tokens, or
    /// `timeout`.
    pub decided_by: Option<String>,
    pub decided_at: Option<Millis>,
    pub requested_at: Millis,
    pub expires_at: Millis,
}

/// The columns of an `approvals` row, as either engine reads them.
pub struct ApprovalColumns {
    pub task_id: String,
    pub step: i64,
    pub call_id: String,
    pub tool: String,
    pub input: String,
    pub status: String,
    pub edited_input: Option<String>,
    pub comment: Option<String>,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    pub requested_at: i64,
    pub expires_at: i64,
}

impl ApprovalColumns {
    pub fn into_record(self) -> Result<ApprovalRecord> {
        Ok(ApprovalRecord {
            status: ApprovalStatus::parse(&self.status).ok_or_else(|| {
                StoreError::Config(format!("unknown approval status {:?}", self.status))
            })?,
            input: parse_json(&self.input, "approval input")?,
            edited_input: self
                .edited_input
                .as_deref()
                .map(|text| parse_json(text, "approval edited input"))
                .transpose()?,
            task_id: self.task_id,
            step: self.step as u32,
            call_id: self.call_id,
            tool: self.tool,
            comment: self.comment,
            decided_by: self.decided_by,
            decided_at: self.decided_at,
            requested_at: self.requested_at,
            expires_at: self.expires_at,
        })
    }
}

/// A call the agent loop found needing approval and unanswered.
#[derive(Debug, Clone)]
pub struct ApprovalRequest {
    pub step: u32,
    pub call_id: String,
    pub tool: String,
    pub input: Value,
    pub expires_at: Millis,
}

/// An answer to one pending call.
#[derive(Debug, Clone)]
pub struct Decision {
    pub approve: bool,
    /// The arguments to call the tool with instead (approvals only).
    pub input: Option<Value>,
    pub comment: Option<String>,
    pub by: String,
}

/// What answering a call found.
#[derive(Debug, Clone)]
pub enum DecideOutcome {
    /// This answer won: the call is decided, and once the task had nothing
    /// more pending it went back to the queue (`requeued`).
    Decided {
        approval: ApprovalRecord,
        events: Vec<EventRecord>,
        requeued: bool,
    },
    /// The call was answered before (or timed out): nothing changed.
    AlreadyDecided(ApprovalRecord),
    /// The task has no such call.
    NotFound,
}

/// Journals a request. One for a step already asked about with the same
/// call, tool and arguments changes nothing; one for a different call (a
/// planner that chose otherwise after a restart) replaces the old request,
/// which never ran: an answer only ever holds for the exact call it saw.
pub const INSERT: &str = "INSERT INTO approvals (task_id, step, call_id, tool, input, status,
                                                 requested_at, expires_at)
     VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)
     ON CONFLICT (task_id, step) DO UPDATE
        SET call_id = excluded.call_id, tool = excluded.tool, input = excluded.input,
            status = 'pending', edited_input = NULL, comment = NULL, decided_by = NULL,
            decided_at = NULL, requested_at = excluded.requested_at,
            expires_at = excluded.expires_at
      WHERE approvals.call_id <> excluded.call_id OR approvals.tool <> excluded.tool
         OR approvals.input <> excluded.input";

/// Releases the claim of a task that waits: no lease, no worker.
pub const PARK: &str = "UPDATE tasks
    SET status = 'waiting_approval', lease_owner = NULL, lease_expires_at = NULL
  WHERE id = $1";

pub const LIST: &str = "SELECT * FROM approvals WHERE task_id = $1 ORDER BY step";

/// The one conditional write that answers a call: only a pending one
/// changes, so of answers racing for a call exactly one wins. (If a call
/// id repeats in the same wait, the earliest pending step is answered.)
pub const DECIDE: &str = "UPDATE approvals
    SET status = $3, edited_input = $4, comment = $5, decided_by = $6, decided_at = $7
  WHERE task_id = $1
    AND step = (SELECT MIN(step) FROM approvals
                 WHERE task_id = $1 AND call_id = $2 AND status = 'pending')
 RETURNING *";

/// The latest call with this id, whatever its state (for the 409).
pub const LATEST_WITH_CALL_ID: &str = "SELECT * FROM approvals
  WHERE task_id = $1 AND call_id = $2 ORDER BY step DESC LIMIT 1";

/// Rejects a task's expired pending calls.
pub const EXPIRE: &str = "UPDATE approvals
    SET status = 'rejected', comment = 'timed out: no answer in time',
        decided_by = 'timeout', decided_at = $2
  WHERE task_id = $1 AND status = 'pending' AND expires_at <= $2
 RETURNING *";

/// Tasks with an expired pending call (`approvals_pending`).
pub const EXPIRED_TASKS: &str = "SELECT DISTINCT task_id FROM
    (SELECT task_id FROM approvals WHERE status = 'pending' AND expires_at <= $1
      ORDER BY expires_at LIMIT $2) AS due";

/// Puts a waiting task back in the queue once nothing of it is pending.
/// The wait does not count against the task's time limit: its start moves
/// on by as long as it waited (its deadline, a wall-clock time, stays).
pub const REQUEUE: &str = "UPDATE tasks
    SET status = 'queued',
        started_at = started_at + ($2 - (SELECT MAX(requested_at) FROM approvals
                                           WHERE task_id = $1))
  WHERE id = $1 AND status = 'waiting_approval'
    AND NOT EXISTS (SELECT 1 FROM approvals WHERE task_id = $1 AND status = 'pending')";

/// A cancelled task's pending calls are rejected, so none is answered
/// later.
pub const REJECT_ON_CANCEL: &str = "UPDATE approvals
    SET status = 'rejected', comment = 'the task was cancelled', decided_by = 'cancel',
        decided_at = $2
  WHERE task_id = $1 AND status = 'pending'";

/// A statement as SQLite takes it: `?n` for `$n`.
pub fn sqlite(statement: &str) -> String {
    statement.replace('$', "?")
}

/// `task.waiting_approval`: every call the task now waits on.
pub fn waiting_event_data(requests: &[ApprovalRequest]) -> Value {
    json!({
        "status": "waiting_approval",
        "pending": requests.iter().map(|r| json!({
            "call_id": r.call_id,
            "step": r.step,
            "tool": r.tool,
            "input": r.input,
            "expires_at": crate::rfc3339::format(r.expires_at),
        })).collect::<Vec<_>>(),
    })
}

/// `approval.decided`: who answered a call, when, and how.
pub fn decided_event_data(approval: &ApprovalRecord) -> Value {
    json!({
        "call_id": approval.call_id,
        "step": approval.step,
        "tool": approval.tool,
        "decision": approval.status,
        "input": approval.edited_input,
        "comment": approval.comment,
        "decided_by": approval.decided_by,
        "decided_at": approval.decided_at.map(crate::rfc3339::format),
    })
}

/// How many tasks with expired calls one sweep takes at most.
pub const EXPIRE_BATCH: i64 = 100;
