//! Every stable error code Opspawn sends, in one table: the API's request
//! errors (with their HTTP status), the codes a failed task or step
//! carries in `error.code`, and why a plugin file did not load. `docs/api.md` documents each one; a test below
//! fails when a code is missing there or when an entry is used nowhere.
//!
//! A tool's own codes (`invalid_expression` from the calculator, say) are
//! free text and not in the table; [`ErrorInfo`] carries either.

use serde::{Deserialize, Serialize};

macro_rules! codes {
    ($( $variant:ident = $wire:literal, status $status:expr, $on:ident; )*) => {
        /// A stable, documented error code. The wire string is
        /// [`Code::as_str`]; the HTTP status, for a request error, is
        /// [`Code::status`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $( $variant, )*
        }

        impl Code {
            pub const ALL: &[Code] = &[$( Code::$variant, )*];

            /// The code as clients see it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Code::$variant => $wire, )*
                }
            }

            /// The HTTP status a request refused with this code gets; `None`
            /// for codes only a task or step carries.
            pub const fn status(self) -> Option<u16> {
                match self {
                    $( Code::$variant => $status, )*
                }
            }

            /// Whether a failed task or step may carry this code.
            pub const fn on_steps(self) -> bool {
                match self {
                    $( Code::$variant => codes!(@on $on), )*
                }
            }

            /// Whether a plugin file that failed to load may carry this
            /// code (`GET /v1/plugins`, `failures`).
            pub const fn on_loads(self) -> bool {
                match self {
                    $( Code::$variant => codes!(@loads $on), )*
                }
            }
        }
    };
    (@on request) => { false };
    (@on step) => { true };
    (@on both) => { true };
    (@on load) => { false };
    (@loads load) => { true };
    (@loads $other:ident) => { false };
}

codes! {
    // Request errors.
    InvalidJson = "invalid_json", status Some(400), request;
    InvalidRequest = "invalid_request", status Some(400), request;
    InvalidQuery = "invalid_query", status Some(400), request;
    InvalidPath = "invalid_path", status Some(400), request;
    InvalidLastEventId = "invalid_last_event_id", status Some(400), request;
    InvalidIdempotencyKey = "invalid_idempotency_key", status Some(400), request;
    Unauthorized = "unauthorized", status Some(401), request;
    InvalidToken = "invalid_token", status Some(401), request;
    Forbidden = "forbidden", status Some(403), request;
    TaskNotFound = "task_not_found", status Some(404), request;
    ScheduleNotFound = "schedule_not_found", status Some(404), request;
    ThreadNotFound = "thread_not_found", status Some(404), request;
    RouteNotFound = "route_not_found", status Some(404), request;
    ApprovalNotFound = "approval_not_found", status Some(404), request;
    MemoryNotFound = "memory_not_found", status Some(404), request;
    MethodNotAllowed = "method_not_allowed", status Some(405), request;
    RequestTimeout = "request_timeout", status Some(408), request;
    TaskAlreadyFinished = "task_already_finished", status Some(409), request;
    ApprovalAlreadyDecided = "approval_already_decided", status Some(409), request;
    ThreadActive = "thread_active", status Some(409), request;
    MemoryFull = "memory_full", status Some(409), request;
    PayloadTooLarge = "payload_too_large", status Some(413), request;
    UnsupportedMediaType = "unsupported_media_type", status Some(415), request;
    InvalidGoal = "invalid_goal", status Some(422), request;
    UnknownPlanner = "unknown_planner", status Some(422), request;
    UnknownLlm = "unknown_llm", status Some(422), request;
    InvalidOptions = "invalid_options", status Some(422), request;
    InvalidModel = "invalid_model", status Some(422), request;
    InvalidMaxSteps = "invalid_max_steps", status Some(422), request;
    InvalidMaxRetries = "invalid_max_retries", status Some(422), request;
    InvalidTimeout = "invalid_timeout", status Some(422), request;
    InvalidPriority = "invalid_priority", status Some(422), request;
    InvalidTime = "invalid_time", status Some(422), request;
    InvalidSchedule = "invalid_schedule", status Some(422), request;
    InvalidTimezone = "invalid_timezone", status Some(422), request;
    InvalidThread = "invalid_thread", status Some(422), request;
    InvalidMemory = "invalid_memory", status Some(422), request;
    InvalidMemoryNamespace = "invalid_memory_namespace", status Some(422), request;
    RateLimited = "rate_limited", status Some(429), request;
    TooManyActiveTasks = "too_many_active_tasks", status Some(429), request;
    QueueFull = "queue_full", status Some(429), request;
    InternalError = "internal_error", status Some(500), request;
    PluginsLoading = "plugins_loading", status Some(503), request;
    ResponseTimeout = "response_timeout", status Some(503), request;
    StoreFull = "store_full", status Some(507), request;
    InvalidBudget = "invalid_budget", status Some(422), request;
    // A submission naming a tool nothing offers, and a tool call doing so.
    UnknownTool = "unknown_tool", status Some(422), both;
    // A cost cap on a model with no price: refused at submission, and an
    // LLM call of one (a model the planner chose) is not made.
    BudgetUnpriced = "budget_unpriced", status Some(422), both;
    // Task and step errors.
    BudgetExceeded = "budget_exceeded", status None, step;
    StepLimitExceeded = "step_limit_exceeded", status None, step;
    TaskTimeout = "task_timeout", status None, step;
    DeadlineExceeded = "deadline_exceeded", status None, step;
    PlannerGaveUp = "planner_gave_up", status None, step;
    PlannerError = "planner_error", status None, step;
    ToolNotAllowed = "tool_not_allowed", status None, step;
    // A call that needed approval was rejected (or timed out waiting): the
    // tool did not run; the planner sees this as the call's error.
    ApprovalRejected = "approval_rejected", status None, step;
    InvalidToolInput = "invalid_tool_input", status None, step;
    InvalidStepInput = "invalid_step_input", status None, step;
    PluginTrap = "plugin_trap", status None, step;
    PluginTimeout = "plugin_timeout", status None, step;
    PluginMemoryLimit = "plugin_memory_limit", status None, step;
    PluginStackOverflow = "plugin_stack_overflow", status None, step;
    PluginOutputTooLarge = "plugin_output_too_large", status None, step;
    PluginResourceLimit = "plugin_resource_limit", status None, step;
    PluginFolderQuota = "plugin_folder_quota", status None, step;
    PluginBadOutput = "plugin_bad_output", status None, step;
    PluginInstantiateFailed = "plugin_instantiate_failed", status None, step;
    PluginNotLoaded = "plugin_not_loaded", status None, step;
    LlmAuth = "llm_auth", status None, step;
    LlmInvalidRequest = "llm_invalid_request", status None, step;
    LlmRateLimited = "llm_rate_limited", status None, step;
    LlmUnavailable = "llm_unavailable", status None, step;
    LlmTimeout = "llm_timeout", status None, step;
    LlmBadResponse = "llm_bad_response", status None, step;
    LlmError = "llm_error", status None, step;
    LlmAdapterMisconfigured = "llm_adapter_misconfigured", status None, step;
    InvalidLlmOptions = "invalid_llm_options", status None, step;
    McpUnavailable = "mcp_unavailable", status None, step;
    McpTimeout = "mcp_timeout", status None, step;
    McpToolError = "mcp_tool_error", status None, step;
    McpError = "mcp_error", status None, step;
    // Structured output: a task's `response_format` refused at submission,
    // and a task whose answer does not match it.
    InvalidResponseFormat = "invalid_response_format", status Some(422), request;
    // A task's `images` refused at submission (the message says which and
    // why).
    InvalidImages = "invalid_images", status Some(422), request;
    // A call task (`call`) asked with what only an agent task takes, or
    // with `tools` that leave its tool out.
    InvalidCall = "invalid_call", status Some(422), request;
    AnswerSchemaMismatch = "answer_schema_mismatch", status None, step;
    // Why a plugin file did not load.
    PluginUnreadable = "plugin_unreadable", status None, load;
    PluginInvalidManifest = "plugin_invalid_manifest", status None, load;
    PluginLoadFailed = "plugin_load_failed", status None, load;
    PluginNameTaken = "plugin_name_taken", status None, load;
}

impl Code {
    /// The step errors worth trying again: they may go away by themselves.
    /// Everything else (bad input, a policy denial, an unknown tool, a
    /// crash) is permanent.
    pub const TRANSIENT: &[Code] = &[
        Code::LlmRateLimited,
        Code::LlmUnavailable,
        Code::LlmTimeout,
        Code::PluginTimeout,
        Code::PluginInstantiateFailed,
        Code::PluginNotLoaded,
        Code::McpUnavailable,
        Code::McpTimeout,
    ];
}

/// A tool's own codes that mark its error transient, as documented in
/// `docs/api.md`: the step is tried again like a [`Code::TRANSIENT`] one.
pub const TRANSIENT_TOOL_CODES: &[&str] = &["unavailable", "timeout", "rate_limited"];

/// Whether a step that failed with `code` may be tried again.
pub fn is_transient(code: &str) -> bool {
    Code::TRANSIENT.iter().any(|c| c.as_str() == code) || TRANSIENT_TOOL_CODES.contains(&code)
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl From<Code> for String {
    fn from(code: Code) -> Self {
        code.as_str().to_owned()
    }
}

/// Why a task or step failed, as journaled and sent: a code (from the
/// table, or a tool's own) and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        // Postgres text cannot hold NUL, and a plugin's message may contain one.
        let message: String = message.into();
        Self {
            code: code.into(),
            message: message.replace('\0', "\u{fffd}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::test_support;

    /// The codes in the first backticked column of the table under
    /// `heading` in docs/api.md, each with the row's first cell.
    fn documented(heading: &str) -> BTreeMap<String, String> {
        let docs = std::fs::read_to_string(test_support::repo_root().join("docs/api.md"))
            .expect("reading docs/api.md");
        let table = docs
            .split_once(heading)
            .unwrap_or_else(|| panic!("docs/api.md has no {heading:?}"))
            .1;
        let mut codes = BTreeMap::new();
        for row in table
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'))
        {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // `| status | code | when |` or `| code | meaning |`.
            let (first, code_cell) = if cells.len() >= 5 {
                (cells[1], cells[2])
            } else {
                (cells[1], cells[1])
            };
            for code in code_cell.split('`').skip(1).step_by(2) {
                codes.insert(code.to_owned(), first.to_owned());
            }
        }
        assert!(
            !codes.is_empty(),
            "no codes under {heading:?} in docs/api.md"
        );
        codes
    }

    #[test]
    fn every_code_is_documented_with_its_status_and_nothing_else_is() {
        let requests = documented("Request errors:");
        let steps = documented("Task and step errors");
        let loads = documented("Plugin load failures");
        for code in Code::ALL {
            if let Some(status) = code.status() {
                assert_eq!(
                    requests.get(code.as_str()),
                    Some(&status.to_string()),
                    "docs/api.md's request errors must list `{code}` with status {status}"
                );
            }
            if code.on_steps() {
                assert!(
                    steps.contains_key(code.as_str()),
                    "docs/api.md's task and step errors must list `{code}`"
                );
            }
            if code.on_loads() {
                assert!(
                    loads.contains_key(code.as_str()),
                    "docs/api.md's plugin load failures must list `{code}`"
                );
            }
        }
        let known: BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        for documented in requests.keys().chain(steps.keys()).chain(loads.keys()) {
            assert!(
                known.contains(documented.as_str()),
                "docs/api.md documents `{documented}`, which errors::Code does not have"
            );
        }
    }

    /// Lemmy's habit: an entry nothing uses is a code that can never be
    /// sent, and the docs would promise it.
    #[test]
    fn every_code_is_used_by_the_code() {
        let sources = test_support::non_test_sources("src");
        for code in Code::ALL {
            let name = format!("Code::{code:?}");
            let users: Vec<_> = sources
                .iter()
                .filter(|(path, text)| !path.ends_with("errors.rs") && uses(text, &name))
                .collect();
            assert!(
                !users.is_empty(),
                "errors::{name} ({code}) is used nowhere; remove it from the table and the docs"
            );
        }
    }

    /// `name` appears as a whole path (`Code::Llm` is not `Code::LlmAuth`).
    fn uses(text: &str, name: &str) -> bool {
        text.match_indices(name).any(|(at, _)| {
            !text[at + name.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        })
    }

    #[test]
    fn transient_codes_are_the_documented_ones() {
        assert!(is_transient("llm_rate_limited"));
        assert!(is_transient("timeout"), "a tool's own transient code");
        assert!(!is_transient("plugin_trap"));
        assert!(!is_transient("invalid_expression"));
    }

    #[test]
    fn wire_strings_are_unique() {
        let unique: BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(unique.len(), Code::ALL.len());
    }
}
