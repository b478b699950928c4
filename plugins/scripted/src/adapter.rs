//! Replaying a script, and the demo mode used when there is none.
//!
//! # Scripts
//!
//! The request's `provider-options` is a JSON object holding either
//! `"script"`, an array of responses, or `"script_file"`, the path of a JSON
//! file holding that array. Each response is an object:
//!
//! ```json
//! {
//!   "content": "text of the reply",
//!   "tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}, "id": "optional"}],
//!   "delay_ms": 250,
//!   "usage": {"input_tokens": 10, "output_tokens": 5},
//!   "error": {"kind": "rate-limited", "message": "slow down", "status": 429}
//! }
//! ```
//!
//! All fields are optional. `delay_ms` is how long the host waits before
//! handing the reply (or the error) over. The response replayed is the one whose index is
//! the number of assistant messages already in the request: the first call
//! gets response 0, the call after one reply gets response 1, and so on. A
//! replay or a resumed task therefore gets the same answers as the first run.
//! In a thread, the earlier tasks come first in the conversation, each as a
//! user message `Question: ...` and its answer (as the ReAct planner sends
//! them): only the replies after the last `Question:` count, so each task of
//! a thread replays its own script from the start.
//!
//! # Demo mode
//!
//! With no script, the adapter answers as a toy model would, enough for
//! `opspawn run "What is (2+3)*4?"` to work offline:
//!
//! 1. If the last message is a tool result (a `tool` message, or a user
//!    message starting `Observation:`), it answers `Final Answer: <result>`.
//! 2. Else, if a `calculator` tool is offered and the last user message holds
//!    an arithmetic expression, it calls the calculator on it.
//! 3. Else it answers that it has no script, and how to give it one.
//!
//! # Settings
//!
//! `default_model` in the manifest's `[adapter.settings]` is the model named
//! in responses when the request names none (default `scripted`).

use serde::Deserialize;
use serde_json::{Value, json};

use opspawn_plugin::llm::LocalReply;
use opspawn_plugin::types::{
    ChatMessage, ChatRequest, ChatResponse, FinishReason, LlmError, LlmErrorKind, Role, ToolCall,
    Usage,
};

/// The model named in responses when neither the request nor the settings
/// name one.
const DEFAULT_MODEL: &str = "scripted";

/// The tool demo mode knows how to use.
const CALCULATOR: &str = "calculator";

/// The characters an arithmetic expression is made of in demo mode.
const EXPRESSION_CHARS: &str = "0123456789 .+-*/%^()";
const OPERATORS: &str = "+-*/%^";

/// One scripted response; see the module documentation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedResponse {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<ScriptedCall>,
    #[serde(default)]
    delay_ms: u32,
    usage: Option<ScriptedUsage>,
    error: Option<ScriptedError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedCall {
    name: String,
    /// Usually a JSON object. A string is used verbatim as the arguments
    /// text, which lets a script hand a tool malformed JSON on purpose.
    #[serde(default = "empty_object")]
    arguments: Value,
    id: Option<String>,
}

fn empty_object() -> Value {
    json!({})
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedUsage {
    input_tokens: u32,
    output_tokens: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedError {
    kind: ScriptedErrorKind,
    message: String,
    status: Option<u16>,
    body: Option<String>,
    retry_after_ms: Option<u64>,
}

/// The WIT `llm-error-kind` names; the snake_case spellings are accepted too.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ScriptedErrorKind {
    Auth,
    #[serde(alias = "invalid_request")]
    InvalidRequest,
    #[serde(alias = "rate_limited")]
    RateLimited,
    Unavailable,
    Timeout,
    #[serde(alias = "bad_response")]
    BadResponse,
    Other,
}

impl From<ScriptedErrorKind> for LlmErrorKind {
    fn from(kind: ScriptedErrorKind) -> Self {
        match kind {
            ScriptedErrorKind::Auth => LlmErrorKind::Auth,
            ScriptedErrorKind::InvalidRequest => LlmErrorKind::InvalidRequest,
            ScriptedErrorKind::RateLimited => LlmErrorKind::RateLimited,
            ScriptedErrorKind::Unavailable => LlmErrorKind::Unavailable,
            ScriptedErrorKind::Timeout => LlmErrorKind::Timeout,
            ScriptedErrorKind::BadResponse => LlmErrorKind::BadResponse,
            ScriptedErrorKind::Other => LlmErrorKind::Other,
        }
    }
}

/// The local reply to `request`, from its script or in demo mode; a script
/// that cannot be read, or has no response for this turn, is a reply that
/// is an error. `settings` is the manifest's `[adapter.settings]`.
pub fn answer(request: &ChatRequest, settings: &str) -> LocalReply {
    let scripted = default_model(settings).and_then(|model| Ok((pick(request)?, model)));
    match scripted {
        Ok((scripted, default_model)) => LocalReply {
            delay_ms: scripted.delay_ms,
            reply: reply(request, scripted, &default_model),
        },
        Err(error) => LocalReply {
            reply: Err(error),
            delay_ms: 0,
        },
    }
}

/// The response the script (or the demo) has for this turn.
fn pick(request: &ChatRequest) -> Result<ScriptedResponse, LlmError> {
    let index = turn(request);
    Ok(match load_script(&request.provider_options)? {
        Some(script) => {
            let count = script.len();
            script.into_iter().nth(index).ok_or_else(|| {
                invalid_request(format!(
                    "the script has only {count} responses; the planner asked for response {}",
                    index + 1
                ))
            })?
        }
        None => demo(request),
    })
}

/// How many replies the conversation already holds for this task: those
/// after its question, the last user message starting `Question:` (earlier
/// tasks of its thread come before it), or all of them when there is none.
fn turn(request: &ChatRequest) -> usize {
    let question = request
        .messages
        .iter()
        .rposition(|message| message.role == Role::User && message.content.starts_with("Question:"))
        .unwrap_or(0);
    request.messages[question..]
        .iter()
        .filter(|message| message.role == Role::Assistant)
        .count()
}

/// `default_model` from the settings, else [`DEFAULT_MODEL`].
fn default_model(settings: &str) -> Result<String, LlmError> {
    let invalid = |why: String| {
        LlmError::new(
            LlmErrorKind::Other,
            format!("the scripted adapter's [adapter.settings] are invalid: {why}"),
        )
    };
    let settings = match settings.trim() {
        "" => return Ok(DEFAULT_MODEL.into()),
        text => serde_json::from_str::<Value>(text).map_err(|e| invalid(e.to_string()))?,
    };
    match settings.get("default_model") {
        None | Some(Value::Null) => Ok(DEFAULT_MODEL.into()),
        Some(Value::String(model)) if !model.trim().is_empty() => Ok(model.trim().into()),
        Some(Value::String(_)) => Ok(DEFAULT_MODEL.into()),
        Some(other) => Err(invalid(format!(
            "default_model must be a string, not {other}"
        ))),
    }
}

fn reply(
    request: &ChatRequest,
    scripted: ScriptedResponse,
    default_model: &str,
) -> Result<ChatResponse, LlmError> {
    let index = turn(request);
    if let Some(error) = scripted.error {
        return Err(LlmError {
            kind: error.kind.into(),
            message: error.message,
            status: error.status,
            body: error.body,
            retry_after_ms: error.retry_after_ms,
        });
    }

    let tool_calls: Vec<ToolCall> = scripted
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(n, call)| ToolCall {
            id: call.id.unwrap_or_else(|| format!("call-{index}-{n}")),
            name: call.name,
            arguments: match call.arguments {
                Value::String(text) => text,
                arguments => arguments.to_string(),
            },
        })
        .collect();
    let message = ChatMessage {
        role: Role::Assistant,
        content: scripted.content,
        images: Vec::new(),
        tool_calls,
        tool_call_id: None,
        provider_data: Vec::new(),
    };
    let usage = match scripted.usage {
        Some(usage) => Usage {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        },
        None => Usage {
            input_tokens: estimate_tokens(request_text(request)),
            output_tokens: estimate_tokens(message_text(&message)),
        },
    };
    Ok(ChatResponse {
        finish_reason: if message.tool_calls.is_empty() {
            FinishReason::Stop
        } else {
            FinishReason::ToolCalls
        },
        message,
        usage: Some(usage),
        model: request
            .model
            .clone()
            .unwrap_or_else(|| default_model.into()),
    })
}

/// The script named by the provider options, if any.
fn load_script(provider_options: &str) -> Result<Option<Vec<ScriptedResponse>>, LlmError> {
    if provider_options.trim().is_empty() {
        return Ok(None);
    }
    let options: Value = serde_json::from_str(provider_options)
        .map_err(|e| invalid_request(format!("the provider options are not valid JSON: {e}")))?;
    let Value::Object(mut options) = options else {
        return Err(invalid_request(
            "the provider options must be a JSON object",
        ));
    };
    let script = match (options.remove("script"), options.remove("script_file")) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(invalid_request(
                "give either \"script\" or \"script_file\" in the provider options, not both",
            ));
        }
        (Some(script), None) => script,
        (None, Some(Value::String(path))) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid_request(format!("cannot read the script file '{path}': {e}"))
            })?;
            serde_json::from_str(&text).map_err(|e| {
                invalid_request(format!("the script file '{path}' is not valid JSON: {e}"))
            })?
        }
        (None, Some(_)) => {
            return Err(invalid_request("\"script_file\" must be a string (a path)"));
        }
    };
    serde_json::from_value(script)
        .map(Some)
        .map_err(|e| invalid_request(format!("invalid script: {e}")))
}

fn invalid_request(message: impl Into<String>) -> LlmError {
    LlmError::new(LlmErrorKind::InvalidRequest, message)
}

/// Demo mode: the response a very small model would give.
fn demo(request: &ChatRequest) -> ScriptedResponse {
    if let Some(result) = request.messages.last().and_then(tool_result) {
        return ScriptedResponse {
            content: format!("Final Answer: {result}"),
            ..Default::default()
        };
    }

    let offers_calculator = request.tools.iter().any(|tool| tool.name == CALCULATOR);
    let question = request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == Role::User);
    if offers_calculator
        && let Some(question) = question
        && let Some(expression) = find_expression(&question.content)
    {
        return ScriptedResponse {
            tool_calls: vec![ScriptedCall {
                name: CALCULATOR.into(),
                arguments: json!({ "expression": expression }),
                id: None,
            }],
            ..Default::default()
        };
    }

    ScriptedResponse {
        content: "Final Answer: The scripted adapter has no script, so it can only do arithmetic \
                  with the calculator tool. To replay answers, pass them in the provider options \
                  as {\"script\": [{\"content\": \"...\"}, ...]} or {\"script_file\": \"path.json\"}."
            .into(),
        ..Default::default()
    }
}

/// The result carried by a tool-result message: the `result` field when the
/// content is a JSON object with one (as the calculator answers), else the
/// whole content.
fn tool_result(message: &ChatMessage) -> Option<String> {
    let content = match message.role {
        Role::Tool => message.content.trim(),
        Role::User => message
            .content
            .trim_start()
            .strip_prefix("Observation:")?
            .trim(),
        _ => return None,
    };
    let result = match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(mut object)) => match object.remove("result") {
            Some(Value::String(text)) => text,
            Some(value) => value.to_string(),
            None => content.to_string(),
        },
        _ => content.to_string(),
    };
    Some(result)
}

/// The longest run of expression characters in `text` that holds at least
/// one digit and one operator, trimmed of spaces and of parentheses that
/// close or open nothing within it (`(about 2+3)` gives `2+3`).
pub fn find_expression(text: &str) -> Option<String> {
    text.split(|c| !EXPRESSION_CHARS.contains(c))
        .map(trim_expression)
        .filter(|run| {
            run.contains(|c: char| c.is_ascii_digit()) && run.contains(|c| OPERATORS.contains(c))
        })
        // `max_by_key` keeps the last of equals; prefer the first.
        .rev()
        .max_by_key(|run| run.len())
        .map(str::to_string)
}

fn trim_expression(run: &str) -> &str {
    let mut run = run.trim();
    loop {
        let depth_error = unbalanced(run);
        let trimmed = match depth_error {
            Unbalanced::Close => run.strip_suffix(')'),
            Unbalanced::Open => run.strip_prefix('('),
            Unbalanced::No => None,
        };
        match trimmed {
            Some(shorter) => run = shorter.trim(),
            None => return run,
        }
    }
}

enum Unbalanced {
    No,
    /// More `)` than `(`.
    Close,
    /// More `(` than `)`.
    Open,
}

fn unbalanced(run: &str) -> Unbalanced {
    let opens = run.matches('(').count();
    let closes = run.matches(')').count();
    match opens.cmp(&closes) {
        std::cmp::Ordering::Less => Unbalanced::Close,
        std::cmp::Ordering::Greater => Unbalanced::Open,
        std::cmp::Ordering::Equal => Unbalanced::No,
    }
}

/// A rough token count: providers average about four characters a token.
fn estimate_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

fn request_text(request: &ChatRequest) -> usize {
    let system = request.system.as_deref().map_or(0, |s| s.chars().count());
    system + request.messages.iter().map(message_text).sum::<usize>()
}

fn message_text(message: &ChatMessage) -> usize {
    let calls: usize = message
        .tool_calls
        .iter()
        .map(|call| call.name.chars().count() + call.arguments.chars().count())
        .sum();
    message.content.chars().count() + calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use opspawn_plugin::types::{ToolChoice, ToolSpec};

    /// What `prepare` would answer, with no settings.
    fn complete(request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        answer(request, "").reply
    }

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            provider_data: Vec::new(),
        }
    }

    fn request(messages: Vec<ChatMessage>, provider_options: Value) -> ChatRequest {
        ChatRequest {
            model: None,
            system: None,
            messages,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: None,
            response_format: None,
            temperature: None,
            top_p: None,
            max_tokens: None,
            stop: Vec::new(),
            provider_options: provider_options.to_string(),
        }
    }

    fn calculator() -> ToolSpec {
        ToolSpec {
            name: "calculator".into(),
            description: "Evaluates an arithmetic expression.".into(),
            input_schema: "{}".into(),
        }
    }

    /// A conversation after `replies` assistant replies.
    fn conversation(replies: usize) -> Vec<ChatMessage> {
        let mut messages = vec![message(Role::User, "Question: hello")];
        for n in 0..replies {
            messages.push(message(Role::Assistant, &format!("reply {n}")));
            messages.push(message(Role::User, "Observation: ok"));
        }
        messages
    }

    fn script() -> Value {
        json!({"script": [
            {"content": "first"},
            {"tool_calls": [
                {"name": "calculator", "arguments": {"expression": "1+1"}},
                {"name": "search", "id": "mine"}
            ]},
            {"content": "third", "usage": {"input_tokens": 7, "output_tokens": 3}},
        ]})
    }

    fn complete_ok(request: &ChatRequest) -> ChatResponse {
        complete(request).unwrap_or_else(|e| panic!("completion failed: {e:?}"))
    }

    fn complete_err(request: &ChatRequest) -> LlmError {
        match complete(request) {
            Err(error) => error,
            Ok(response) => panic!("expected an error, got {response:?}"),
        }
    }

    #[test]
    fn replays_the_response_matching_the_number_of_replies() {
        let first = complete_ok(&request(conversation(0), script()));
        assert_eq!(first.message.content, "first");
        assert_eq!(first.message.role, Role::Assistant);
        assert!(first.message.tool_calls.is_empty());
        assert_eq!(first.finish_reason, FinishReason::Stop);
        assert_eq!(first.model, "scripted");

        let third = complete_ok(&request(conversation(2), script()));
        assert_eq!(third.message.content, "third");
        let usage = third.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (7, 3));

        // The same request gets the same answer: replays are deterministic.
        let again = complete_ok(&request(conversation(0), script()));
        assert_eq!(again.message.content, "first");
    }

    #[test]
    fn earlier_tasks_of_a_thread_do_not_count_as_replies() {
        let mut messages = vec![
            message(Role::User, "Question: earlier"),
            message(Role::Assistant, "Final Answer: 1"),
            message(Role::User, "Question: earlier still"),
            message(Role::Assistant, "Final Answer: 2"),
        ];
        messages.extend(conversation(0));
        assert_eq!(
            complete_ok(&request(messages.clone(), script()))
                .message
                .content,
            "first"
        );
        messages.extend(conversation(2).into_iter().skip(1));
        assert_eq!(
            complete_ok(&request(messages, script())).message.content,
            "third"
        );
    }

    #[test]
    fn scripted_tool_calls_get_default_ids() {
        let response = complete_ok(&request(conversation(1), script()));
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        let calls: Vec<_> = response
            .message
            .tool_calls
            .iter()
            .map(|call| {
                (
                    call.id.as_str(),
                    call.name.as_str(),
                    call.arguments.as_str(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("call-1-0", "calculator", r#"{"expression":"1+1"}"#),
                ("mine", "search", "{}"),
            ]
        );
    }

    #[test]
    fn string_arguments_are_used_verbatim() {
        let options =
            json!({"script": [{"tool_calls": [{"name": "t", "arguments": "{not json"}]}]});
        let response = complete_ok(&request(conversation(0), options));
        assert_eq!(response.message.tool_calls[0].arguments, "{not json");
    }

    #[test]
    fn an_exhausted_script_is_an_invalid_request() {
        let error = complete_err(&request(conversation(3), script()));
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
        assert_eq!(
            error.message,
            "the script has only 3 responses; the planner asked for response 4"
        );
    }

    #[test]
    fn scripted_errors_are_returned() {
        let options = json!({"script": [
            {"error": {"kind": "rate-limited", "message": "slow down", "status": 429, "retry_after_ms": 1000}},
            {"error": {"kind": "bad_response", "message": "garbled"}},
        ]});
        let error = complete_err(&request(conversation(0), options.clone()));
        assert_eq!(error.kind, LlmErrorKind::RateLimited);
        assert_eq!(error.message, "slow down");
        assert_eq!(error.status, Some(429));
        assert_eq!(error.retry_after_ms, Some(1000));

        let error = complete_err(&request(conversation(1), options));
        assert_eq!(error.kind, LlmErrorKind::BadResponse);
        assert_eq!(error.status, None);
    }

    #[test]
    fn invalid_scripts_are_invalid_requests() {
        for options in [
            json!({"script": "not an array"}),
            json!({"script": [{"contnet": "typo"}]}),
            json!({"script": [{"error": {"kind": "teapot", "message": "?"}}]}),
            json!({"script": [], "script_file": "x.json"}),
            json!({"script_file": 3}),
            json!([1, 2]),
        ] {
            let error = complete_err(&request(conversation(0), options.clone()));
            assert_eq!(error.kind, LlmErrorKind::InvalidRequest, "{options}");
        }
        let mut bad = request(conversation(0), json!({}));
        bad.provider_options = "{oops".into();
        assert_eq!(complete_err(&bad).kind, LlmErrorKind::InvalidRequest);
    }

    #[test]
    fn reads_the_script_from_a_file() {
        let path = std::env::temp_dir().join(format!("scripted-test-{}.json", std::process::id()));
        std::fs::write(&path, r#"[{"content": "from a file"}]"#).unwrap();
        let options = json!({"script_file": path.to_str().unwrap()});
        let response = complete(&request(conversation(0), options));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(response.unwrap().message.content, "from a file");

        let options = json!({"script_file": "/nonexistent/script.json"});
        let error = complete_err(&request(conversation(0), options));
        assert_eq!(error.kind, LlmErrorKind::InvalidRequest);
        assert!(
            error
                .message
                .starts_with("cannot read the script file '/nonexistent/script.json': ")
        );
    }

    #[test]
    fn the_delay_is_left_to_the_host() {
        let options = json!({"script": [
            {"content": "slow", "delay_ms": 50},
            {"error": {"kind": "timeout", "message": "late"}, "delay_ms": 70},
        ]});
        let reply = answer(&request(conversation(0), options.clone()), "");
        assert_eq!(reply.delay_ms, 50);
        assert_eq!(reply.reply.unwrap().message.content, "slow");
        let reply = answer(&request(conversation(1), options), "{}");
        assert_eq!(reply.delay_ms, 70);
        assert_eq!(reply.reply.unwrap_err().kind, LlmErrorKind::Timeout);

        let invalid = answer(&request(conversation(0), json!({"script": 3})), "");
        assert_eq!(invalid.delay_ms, 0);
        assert_eq!(
            invalid.reply.unwrap_err().kind,
            LlmErrorKind::InvalidRequest
        );
    }

    #[test]
    fn settings_name_the_default_model() {
        let script = json!({"script": [{"content": "hi"}]});
        let reply = answer(
            &request(conversation(0), script.clone()),
            r#"{"default_model": "replayer"}"#,
        );
        assert_eq!(reply.reply.unwrap().model, "replayer");
        let mut named = request(conversation(0), script.clone());
        named.model = Some("gpt-test".into());
        let reply = answer(&named, r#"{"default_model": "replayer"}"#);
        assert_eq!(reply.reply.unwrap().model, "gpt-test");
        let reply = answer(&request(conversation(0), script), r#"{"default_model": 1}"#);
        assert_eq!(reply.reply.unwrap_err().kind, LlmErrorKind::Other);
    }

    #[test]
    fn estimates_usage_and_echoes_the_model() {
        let mut request = request(
            vec![message(Role::User, "12345678")],
            json!({"script": [{"content": "abcde"}]}),
        );
        request.system = Some("1234".into());
        request.model = Some("gpt-test".into());
        let response = complete_ok(&request);
        let usage = response.usage.unwrap();
        // 12 characters in, 5 out; rounded up.
        assert_eq!((usage.input_tokens, usage.output_tokens), (3, 2));
        assert_eq!(response.model, "gpt-test");
    }

    #[test]
    fn demo_calls_the_calculator_on_the_question() {
        let mut request = request(
            vec![message(Role::User, "Question: What is (2+3)*4?")],
            json!({}),
        );
        request.tools = vec![calculator()];
        let response = complete_ok(&request);
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        let call = &response.message.tool_calls[0];
        assert_eq!(call.id, "call-0-0");
        assert_eq!(call.name, "calculator");
        assert_eq!(call.arguments, r#"{"expression":"(2+3)*4"}"#);
    }

    #[test]
    fn demo_answers_with_the_tool_result() {
        let mut tool = message(Role::Tool, r#"{"expression":"(2+3)*4","result":20}"#);
        tool.tool_call_id = Some("call-0-0".into());
        let response = complete_ok(&request(
            vec![message(Role::User, "Question: q"), tool],
            json!({}),
        ));
        assert_eq!(response.message.content, "Final Answer: 20");
        assert_eq!(response.finish_reason, FinishReason::Stop);

        let observation = message(Role::User, "Observation: plain text result ");
        let response = complete_ok(&request(vec![observation], json!({})));
        assert_eq!(response.message.content, "Final Answer: plain text result");
    }

    #[test]
    fn demo_without_an_expression_or_calculator_explains_itself() {
        let mut without_expression = request(
            vec![message(Role::User, "Question: Who are you?")],
            json!({}),
        );
        without_expression.tools = vec![calculator()];
        let without_calculator = request(vec![message(Role::User, "Question: 1+1?")], json!({}));
        for request in [without_expression, without_calculator] {
            let response = complete_ok(&request);
            assert!(response.message.tool_calls.is_empty());
            assert!(
                response
                    .message
                    .content
                    .starts_with("Final Answer: The scripted adapter has no script")
            );
            assert!(response.message.content.contains("\"script\""));
        }
    }

    #[test]
    fn finds_the_longest_expression() {
        let cases = [
            ("Question: What is (2+3)*4?", Some("(2+3)*4")),
            ("What is 2 + 2?", Some("2 + 2")),
            ("Compute 1.5e3", None),
            ("In 2024, what is 10 % 3 - 1 ^ 2?", Some("10 % 3 - 1 ^ 2")),
            ("x 1+1 y 22 * 33 / 4 z", Some("22 * 33 / 4")),
            ("equal lengths: 1+2 and 3+4", Some("1+2")),
            ("(roughly 7*6)", Some("7*6")),
            ("((1+2)*3", Some("(1+2)*3")),
            ("no numbers - here", None),
            ("42", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(find_expression(text).as_deref(), expected, "{text}");
        }
    }
}
