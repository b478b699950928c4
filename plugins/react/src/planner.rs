//! The ReAct decision procedure: task state in, next action out.
//!
//! The conversation is rebuilt from the journaled steps on every call, so the
//! planner keeps no state of its own and resumes correctly after a crash.
//! Earlier tasks of the same thread come first, each as its question and
//! answer. An LLM reply goes back whole, with the provider data it carries
//! (a Gemini thought signature, say), which the provider needs again.
//!
//! Two ways of calling tools are understood:
//!
//! - Native tool calls, for providers that support them: the LLM reply carries
//!   `tool-calls`, which are run as given and answered with `tool` messages.
//! - The classic text format (`Action:` / `Action Input:`), for any model: the
//!   planner parses the call out of the reply and mints its id with the
//!   [`TEXT_CALL_PREFIX`] prefix, so that later it knows to answer it with an
//!   `Observation:` user message rather than a `tool` message the provider
//!   would not recognise.

use serde::Deserialize;
use serde_json::{Map, Value};

use opspawn_plugin::planner::{Action, EarlierTask, Step, TaskState};
use opspawn_plugin::types::{ChatMessage, ChatRequest, Role, ToolCall, ToolChoice, ToolSpec};

/// Ids of tool calls the planner parsed from the reply text.
pub const TEXT_CALL_PREFIX: &str = "react-text-";

/// Models write `Observation:` themselves when not stopped; the observation
/// must come from the tool, so generation stops there.
const OBSERVATION: &str = "Observation:";
const FINAL_ANSWER: &str = "Final Answer:";
const ACTION: &str = "Action:";
const ACTION_INPUT: &str = "Action Input:";

/// Planner options, given per task as a JSON object. Unknown keys are
/// ignored so that a task can carry options for other planners too.
#[derive(Debug, Default, Deserialize)]
struct Options {
    /// Lowers the task's step limit (it can never raise it).
    max_steps: Option<u32>,
    /// Replaces the built-in system prompt.
    system_prompt: Option<String>,
}

impl Options {
    fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(json).map_err(|e| format!("invalid planner options: {e}"))
    }
}

/// Decides what to do next.
///
/// The step limit stops the planner from asking for more work; a final
/// answer (or an LLM failure) already in the last step is still reported,
/// since honouring it costs no further step.
pub fn next_action(state: &TaskState) -> Result<Action, String> {
    let options = Options::parse(&state.options)?;
    let limit = options
        .max_steps
        .map_or(state.max_steps, |max| max.min(state.max_steps));

    let action = match state.steps.last() {
        None => call_llm(state, &options),
        Some(Step::LlmFailed(message)) => {
            return Ok(Action::Fail(format!("the LLM call failed: {message}")));
        }
        Some(Step::ToolResult(_)) => call_llm(state, &options),
        Some(Step::LlmReply(response)) => {
            let message = &response.message;
            if !message.tool_calls.is_empty() {
                Action::CallTools(message.tool_calls.clone())
            } else {
                let index = state.steps.len() - 1;
                match parse_reply(&message.content) {
                    Reply::Empty => Action::Fail("the LLM returned an empty reply".into()),
                    Reply::Answer(answer) => Action::Finish(answer),
                    Reply::Action { tool, input } => Action::CallTools(vec![ToolCall {
                        id: format!("{TEXT_CALL_PREFIX}{index}"),
                        arguments: arguments(&state.tools, &tool, &input),
                        name: tool,
                    }]),
                }
            }
        }
    };

    let needs_a_step = matches!(action, Action::CallLlm(_) | Action::CallTools(_));
    if needs_a_step && state.steps.len() >= limit as usize {
        return Ok(Action::Fail(format!(
            "reached the step limit of {limit} steps without a final answer"
        )));
    }
    Ok(action)
}

fn call_llm(state: &TaskState, options: &Options) -> Action {
    let system = options
        .system_prompt
        .clone()
        .unwrap_or_else(|| system_prompt(&state.tools));
    Action::CallLlm(ChatRequest {
        model: None,
        system: Some(system),
        messages: messages(state),
        // Also offered natively, for providers with tool calling; the
        // prompt covers the others.
        tools: state.tools.clone(),
        tool_choice: ToolChoice::Auto,
        parallel_tool_calls: None,
        response_format: None,
        temperature: None,
        top_p: None,
        max_tokens: None,
        stop: vec![OBSERVATION.into()],
        provider_options: "{}".into(),
    })
}

/// The built-in ReAct instructions, listing the tools.
pub fn system_prompt(tools: &[ToolSpec]) -> String {
    let mut prompt = String::from(
        "You answer the user's question by reasoning step by step and, when it helps, \
         by using tools.\n\n",
    );
    if tools.is_empty() {
        prompt.push_str(
            "No tools are available, so answer from what you know, in this format:\n\n\
             Question: the question you must answer\n\
             Thought: your reasoning\n\
             Final Answer: the answer to the question\n",
        );
        return prompt;
    }

    prompt.push_str("You can use these tools:\n\n");
    for tool in tools {
        prompt.push_str(&format!(
            "- {}: {}\n  Input schema: {}\n",
            tool.name, tool.description, tool.input_schema
        ));
    }
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_str()).collect();
    prompt.push_str(&format!(
        "\nUse this format:\n\n\
         Question: the question you must answer\n\
         Thought: what you should do next, and why\n\
         Action: the tool to use, one of [{}]\n\
         Action Input: the tool's input, as a JSON object matching its input schema\n\
         Observation: the tool's result\n\
         ... (Thought, Action, Action Input and Observation can repeat)\n\
         Thought: I now know the final answer\n\
         Final Answer: the answer to the question\n\n\
         After writing an Action Input, stop: the Observation is written for you once the \
         tool has run. Never make up an Observation. When you need no tool, give the \
         Final Answer directly.\n",
        names.join(", ")
    ));
    prompt
}

/// The conversation so far: earlier tasks of the thread, the question, then
/// one message per step.
fn messages(state: &TaskState) -> Vec<ChatMessage> {
    let mut messages: Vec<ChatMessage> = state.history.iter().flat_map(earlier).collect();
    messages.push(message(Role::User, format!("Question: {}", state.goal)));
    for step in &state.steps {
        match step {
            Step::LlmReply(response) => messages.push(ChatMessage {
                role: Role::Assistant,
                tool_call_id: None,
                ..response.message.clone()
            }),
            Step::ToolResult(outcome) => {
                let result = &outcome.result;
                let content = if result.is_error {
                    format!("Error: {}", result.content)
                } else {
                    result.content.clone()
                };
                if outcome.call.id.starts_with(TEXT_CALL_PREFIX) {
                    messages.push(message(Role::User, format!("{OBSERVATION} {content}")));
                } else {
                    messages.push(ChatMessage {
                        tool_call_id: Some(outcome.call.id.clone()),
                        ..message(Role::Tool, content)
                    });
                }
            }
            // Nothing was said; a failure that ended the task is reported by
            // `next_action`, and one the host retried past left no reply.
            Step::LlmFailed(_) => {}
        }
    }
    messages
}

/// An earlier task of the thread as its question and, if it found one, its
/// answer. Its steps stay out: the answer is what the user saw, and tool
/// calls left unanswered there (a task that failed) would make providers
/// refuse the conversation.
fn earlier(task: &EarlierTask) -> Vec<ChatMessage> {
    let mut messages = vec![message(Role::User, format!("Question: {}", task.goal))];
    if let Some(answer) = &task.answer {
        messages.push(message(Role::Assistant, format!("{FINAL_ANSWER} {answer}")));
    }
    messages
}

fn message(role: Role, content: String) -> ChatMessage {
    ChatMessage {
        role,
        content,
        images: Vec::new(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        provider_data: Vec::new(),
    }
}

/// What a text reply (without native tool calls) asks for.
#[derive(Debug, PartialEq)]
enum Reply {
    Empty,
    Answer(String),
    /// `input` is the raw Action Input text, possibly empty.
    Action {
        tool: String,
        input: String,
    },
}

fn parse_reply(content: &str) -> Reply {
    let content = content.trim();
    if content.is_empty() {
        return Reply::Empty;
    }
    let lines: Vec<&str> = content.lines().collect();
    let find = |marker: &str| {
        lines
            .iter()
            .position(|line| line.trim_start().starts_with(marker))
    };
    let rest = |line: usize, marker: &str| {
        let first = &lines[line].trim_start()[marker.len()..];
        std::iter::once(first)
            .chain(lines[line + 1..].iter().copied())
            .collect::<Vec<_>>()
    };

    // Whichever comes first wins: a model that acts and then imagines the
    // outcome and an answer must still act first.
    let answer = find(FINAL_ANSWER);
    let action = find(ACTION).filter(|&line| answer.is_none_or(|answer| line < answer));
    match (action, answer) {
        (Some(line), _) => {
            let tool = unquote(lines[line].trim_start()[ACTION.len()..].trim()).to_string();
            let input = match find(ACTION_INPUT) {
                Some(input) if input > line => {
                    // The input may span lines (a pretty-printed object); it
                    // ends where an imagined observation would begin.
                    let text = rest(input, ACTION_INPUT)
                        .into_iter()
                        .take_while(|line| !line.trim_start().starts_with(OBSERVATION))
                        .collect::<Vec<_>>()
                        .join("\n");
                    strip_code_fence(text.trim()).to_string()
                }
                _ => String::new(),
            };
            Reply::Action { tool, input }
        }
        (None, Some(line)) => Reply::Answer(rest(line, FINAL_ANSWER).join("\n").trim().to_string()),
        // A plain reply, with neither marker, is the model's answer.
        (None, None) => Reply::Answer(content.to_string()),
    }
}

/// `calculator`, `` `calculator` `` and `"calculator"` all name the same tool.
fn unquote(name: &str) -> &str {
    name.trim_matches(|c| matches!(c, '`' | '"' | '\''))
}

/// Removes a Markdown code fence (```` ```json ... ``` ````) around `text`.
fn strip_code_fence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let Some(inner) = inner.trim_end().strip_suffix("```") else {
        return text;
    };
    // Drop the info string (`json`) on the opening line.
    match inner.split_once('\n') {
        Some((info, body)) if !info.trim().contains(['{', '[', '"']) => body.trim(),
        _ => inner.trim(),
    }
}

/// Turns an Action Input into the JSON object arguments of a tool call.
fn arguments(tools: &[ToolSpec], tool: &str, input: &str) -> String {
    if input.is_empty() {
        return "{}".into();
    }
    let text = match serde_json::from_str::<Value>(input) {
        Ok(Value::Object(object)) => return Value::Object(object).to_string(),
        // `"2 + 3"` means the text inside the quotes.
        Ok(Value::String(text)) => text,
        _ => input.to_string(),
    };
    let key = tools
        .iter()
        .find(|spec| spec.name == tool)
        .and_then(|spec| sole_required_string(&spec.input_schema))
        .unwrap_or_else(|| "input".into());
    let mut object = Map::new();
    object.insert(key, Value::String(text));
    Value::Object(object).to_string()
}

/// The name of the schema's only required property, if there is exactly one
/// and it is a string: then plain text can only have meant that property.
fn sole_required_string(schema: &str) -> Option<String> {
    let schema: Value = serde_json::from_str(schema).ok()?;
    let [name] = schema.get("required")?.as_array()?.as_slice() else {
        return None;
    };
    let name = name.as_str()?;
    let kind = schema.get("properties")?.get(name)?.get("type")?;
    (kind == "string").then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opspawn_plugin::planner::ToolCallOutcome;
    use opspawn_plugin::types::{ChatResponse, FinishReason, ProviderDatum, ToolResult};

    fn calculator() -> ToolSpec {
        ToolSpec {
            name: "calculator".into(),
            description: "Evaluates an arithmetic expression.".into(),
            input_schema: r#"{"type":"object","properties":{"expression":{"type":"string"}},"required":["expression"]}"#.into(),
        }
    }

    fn search() -> ToolSpec {
        ToolSpec {
            name: "search".into(),
            description: "Searches the web.".into(),
            input_schema: r#"{"type":"object","properties":{"query":{"type":"string"},"limit":{"type":"integer"}},"required":["query","limit"]}"#.into(),
        }
    }

    fn task(steps: Vec<Step>) -> TaskState {
        TaskState {
            goal: "What is (2+3)*4?".into(),
            tools: vec![calculator(), search()],
            steps,
            history: Vec::new(),
            max_steps: 10,
            options: "{}".into(),
        }
    }

    fn reply(content: &str, tool_calls: Vec<ToolCall>) -> Step {
        Step::LlmReply(ChatResponse {
            message: ChatMessage {
                tool_calls,
                ..message(Role::Assistant, content.into())
            },
            finish_reason: FinishReason::Stop,
            usage: None,
            model: "test".into(),
        })
    }

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    fn result(call: ToolCall, content: &str, is_error: bool) -> Step {
        Step::ToolResult(ToolCallOutcome {
            result: ToolResult {
                call_id: call.id.clone(),
                name: call.name.clone(),
                content: content.into(),
                is_error,
            },
            call,
        })
    }

    fn decide(state: &TaskState) -> Action {
        next_action(state).expect("the planner should decide")
    }

    fn request(action: Action) -> ChatRequest {
        match action {
            Action::CallLlm(request) => request,
            other => panic!("expected call-llm, got {other:?}"),
        }
    }

    /// The single call of a `call-tools` action.
    fn single_call(action: Action) -> ToolCall {
        match action {
            Action::CallTools(mut calls) if calls.len() == 1 => calls.remove(0),
            other => panic!("expected one tool call, got {other:?}"),
        }
    }

    #[test]
    fn starts_by_asking_the_llm() {
        let request = request(decide(&task(vec![])));
        let system = request.system.expect("a system prompt");
        assert!(system.contains("- calculator: Evaluates an arithmetic expression."));
        assert!(system.contains(r#"Input schema: {"type":"object""#));
        assert!(system.contains("Action: the tool to use, one of [calculator, search]"));
        for marker in ["Thought:", "Action Input:", "Observation:", "Final Answer:"] {
            assert!(system.contains(marker), "{marker}");
        }
        assert_eq!(request.tools, vec![calculator(), search()]);
        assert_eq!(
            request.messages,
            vec![message(Role::User, "Question: What is (2+3)*4?".into())]
        );
        assert_eq!(request.stop, vec!["Observation:".to_string()]);
        assert_eq!(request.provider_options, "{}");
        assert_eq!(request.model, None);
        assert_eq!(request.temperature, None);
        assert_eq!(request.top_p, None);
        assert_eq!(request.max_tokens, None);
        assert_eq!(request.tool_choice, ToolChoice::Auto);
        assert_eq!(request.parallel_tool_calls, None);
        assert_eq!(request.response_format, None);
    }

    #[test]
    fn a_reply_goes_back_whole_with_its_provider_data() {
        let native = call("call_1", "calculator", r#"{"expression":"2+3"}"#);
        let mut step = reply("Let me compute.", vec![native.clone()]);
        let signature = ProviderDatum {
            key: "thoughtSignature".into(),
            value: "c2lnbmF0dXJl".into(),
        };
        if let Step::LlmReply(response) = &mut step {
            response.message.provider_data = vec![signature.clone()];
        }
        let steps = vec![step, result(native, r#"{"result":5}"#, false)];
        let request = request(decide(&task(steps)));
        assert_eq!(request.messages[1].content, "Let me compute.");
        assert_eq!(request.messages[1].provider_data, [signature]);
        assert_eq!(request.messages[1].role, Role::Assistant);
    }

    #[test]
    fn earlier_tasks_of_the_thread_come_first_as_questions_and_answers() {
        let mut state = task(vec![]);
        state.history = vec![
            EarlierTask {
                goal: "What is 2+2?".into(),
                answer: Some("4".into()),
                steps: vec![reply("Final Answer: 4", vec![])],
            },
            EarlierTask {
                goal: "Divide by zero".into(),
                answer: None,
                steps: vec![Step::LlmFailed("overloaded".into())],
            },
        ];
        assert_eq!(
            request(decide(&state)).messages,
            [
                message(Role::User, "Question: What is 2+2?".into()),
                message(Role::Assistant, "Final Answer: 4".into()),
                message(Role::User, "Question: Divide by zero".into()),
                message(Role::User, "Question: What is (2+3)*4?".into()),
            ]
        );
    }

    #[test]
    fn prompt_without_tools_asks_for_a_direct_answer() {
        let prompt = system_prompt(&[]);
        assert!(prompt.contains("No tools are available"));
        assert!(!prompt.contains("Action:"));
    }

    #[test]
    fn runs_native_tool_calls_as_given() {
        let calls = vec![
            call("call_1", "calculator", r#"{"expression":"2+3"}"#),
            call("call_2", "search", r#"{"query":"x","limit":1}"#),
        ];
        let action = decide(&task(vec![reply("Let me compute.", calls.clone())]));
        assert_eq!(action, Action::CallTools(calls));
    }

    #[test]
    fn parses_a_text_action_with_json_input() {
        let content = "Thought: I should compute it.\nAction: calculator\nAction Input: {\"expression\": \"(2+3)*4\"}";
        let call = single_call(decide(&task(vec![reply(content, vec![])])));
        assert_eq!(call.id, "react-text-0");
        assert_eq!(call.name, "calculator");
        assert_eq!(call.arguments, r#"{"expression":"(2+3)*4"}"#);
    }

    #[test]
    fn parses_multi_line_and_fenced_json_input() {
        let content =
            "Action: `calculator`\nAction Input: ```json\n{\n  \"expression\": \"1+1\"\n}\n```";
        let call = single_call(decide(&task(vec![reply(content, vec![])])));
        assert_eq!(call.name, "calculator");
        assert_eq!(call.arguments, r#"{"expression":"1+1"}"#);
    }

    #[test]
    fn plain_text_input_fills_the_sole_required_string_property() {
        let content = "Thought: compute\nAction: calculator\nAction Input: (2+3)*4";
        let call = single_call(decide(&task(vec![reply(content, vec![])])));
        assert_eq!(call.arguments, r#"{"expression":"(2+3)*4"}"#);

        // A JSON string means its contents.
        let content = "Action: calculator\nAction Input: \"2 * 3\"";
        let call = single_call(decide(&task(vec![reply(content, vec![])])));
        assert_eq!(call.arguments, r#"{"expression":"2 * 3"}"#);
    }

    #[test]
    fn plain_text_input_falls_back_to_an_input_property() {
        // `search` has two required properties, `unknown` has no schema at all.
        for tool in ["search", "unknown"] {
            let content = format!("Action: {tool}\nAction Input: rust wasm components");
            let call = single_call(decide(&task(vec![reply(&content, vec![])])));
            assert_eq!(call.name, tool);
            assert_eq!(call.arguments, r#"{"input":"rust wasm components"}"#);
        }
    }

    #[test]
    fn an_action_without_input_gets_an_empty_object() {
        let call = single_call(decide(&task(vec![reply("Action: search", vec![])])));
        assert_eq!(call.arguments, "{}");
    }

    #[test]
    fn an_imagined_observation_is_not_part_of_the_input() {
        let content = "Action: calculator\nAction Input: 2+2\nObservation: 4\nFinal Answer: 4";
        let call = single_call(decide(&task(vec![reply(content, vec![])])));
        assert_eq!(call.arguments, r#"{"expression":"2+2"}"#);
    }

    #[test]
    fn text_call_ids_name_the_step_they_came_from() {
        let first = call("call_1", "calculator", r#"{"expression":"2+3"}"#);
        let steps = vec![
            reply("", vec![first.clone()]),
            result(first, r#"{"result":5}"#, false),
            reply("Action: calculator\nAction Input: 5*4", vec![]),
        ];
        let call = single_call(decide(&task(steps)));
        assert_eq!(call.id, "react-text-2");
    }

    #[test]
    fn finishes_with_the_final_answer() {
        let content = "Thought: I now know the final answer\nFinal Answer: 20";
        assert_eq!(
            decide(&task(vec![reply(content, vec![])])),
            Action::Finish("20".into())
        );
    }

    #[test]
    fn a_final_answer_keeps_its_following_lines() {
        let content = "Thought: done\nFinal Answer: The result is:\n\n- 20\n- twenty\n  ";
        assert_eq!(
            decide(&task(vec![reply(content, vec![])])),
            Action::Finish("The result is:\n\n- 20\n- twenty".into())
        );
    }

    #[test]
    fn a_final_answer_before_an_action_wins() {
        let content = "Final Answer: 20\nAction: calculator\nAction Input: 1+1";
        assert_eq!(
            decide(&task(vec![reply(content, vec![])])),
            Action::Finish("20\nAction: calculator\nAction Input: 1+1".into())
        );
    }

    #[test]
    fn a_plain_reply_is_the_answer() {
        let action = decide(&task(vec![reply("\n  It is 20.  \n", vec![])]));
        assert_eq!(action, Action::Finish("It is 20.".into()));
    }

    #[test]
    fn an_empty_reply_fails() {
        let action = decide(&task(vec![reply(" \n ", vec![])]));
        assert_eq!(
            action,
            Action::Fail("the LLM returned an empty reply".into())
        );
    }

    #[test]
    fn an_llm_failure_fails_the_task() {
        let action = decide(&task(vec![Step::LlmFailed("rate limited".into())]));
        assert_eq!(
            action,
            Action::Fail("the LLM call failed: rate limited".into())
        );
    }

    #[test]
    fn a_tool_result_goes_back_to_the_llm_as_a_tool_message() {
        let native = call("call_1", "calculator", r#"{"expression":"(2+3)*4"}"#);
        let steps = vec![
            reply("", vec![native.clone()]),
            result(
                native.clone(),
                r#"{"expression":"(2+3)*4","result":20}"#,
                false,
            ),
        ];
        let request = request(decide(&task(steps)));
        assert_eq!(
            request.messages,
            vec![
                message(Role::User, "Question: What is (2+3)*4?".into()),
                ChatMessage {
                    tool_calls: vec![native],
                    ..message(Role::Assistant, String::new())
                },
                ChatMessage {
                    tool_call_id: Some("call_1".into()),
                    ..message(Role::Tool, r#"{"expression":"(2+3)*4","result":20}"#.into())
                },
            ]
        );
    }

    #[test]
    fn a_text_call_result_goes_back_as_an_observation() {
        let content = "Action: calculator\nAction Input: 1/0";
        let parsed = call("react-text-0", "calculator", r#"{"expression":"1/0"}"#);
        let steps = vec![
            reply(content, vec![]),
            result(parsed, "division by zero", true),
        ];
        let request = request(decide(&task(steps)));
        assert_eq!(
            request.messages[1..],
            [
                message(Role::Assistant, content.into()),
                message(Role::User, "Observation: Error: division by zero".into()),
            ]
        );
    }

    #[test]
    fn every_result_of_a_batch_is_sent_in_order() {
        let a = call("a", "calculator", r#"{"expression":"1"}"#);
        let b = call("b", "calculator", r#"{"expression":"2"}"#);
        let steps = vec![
            reply("", vec![a.clone(), b.clone()]),
            result(a, "1", false),
            result(b, "tool crashed", true),
        ];
        let request = request(decide(&task(steps)));
        let tail: Vec<_> = request.messages[2..]
            .iter()
            .map(|m| (m.tool_call_id.clone().unwrap(), m.content.clone()))
            .collect();
        assert_eq!(
            tail,
            [
                ("a".into(), "1".into()),
                ("b".into(), "Error: tool crashed".into())
            ]
        );
    }

    #[test]
    fn stops_at_the_step_limit() {
        let first = call("call_1", "calculator", r#"{"expression":"1"}"#);
        let mut state = task(vec![
            reply("", vec![first.clone()]),
            result(first, "1", false),
        ]);
        state.max_steps = 2;
        assert_eq!(
            decide(&state),
            Action::Fail("reached the step limit of 2 steps without a final answer".into())
        );

        // A limit that allows no step at all.
        let mut empty = task(vec![]);
        empty.max_steps = 0;
        assert!(matches!(decide(&empty), Action::Fail(_)));
    }

    #[test]
    fn a_final_answer_at_the_step_limit_still_finishes() {
        let mut state = task(vec![reply("Final Answer: 20", vec![])]);
        state.max_steps = 1;
        assert_eq!(decide(&state), Action::Finish("20".into()));

        let mut state = task(vec![reply("Action: calculator\nAction Input: 1", vec![])]);
        state.max_steps = 1;
        assert!(matches!(decide(&state), Action::Fail(_)));
    }

    #[test]
    fn options_lower_the_step_limit_but_never_raise_it() {
        let mut state = task(vec![reply("Action: calculator\nAction Input: 1", vec![])]);
        state.options = r#"{"max_steps": 1}"#.into();
        assert_eq!(
            decide(&state),
            Action::Fail("reached the step limit of 1 steps without a final answer".into())
        );

        let mut state = task(vec![]);
        state.max_steps = 0;
        state.options = r#"{"max_steps": 50}"#.into();
        assert!(
            matches!(decide(&state), Action::Fail(message) if message.contains("limit of 0 steps"))
        );
    }

    #[test]
    fn options_can_replace_the_system_prompt() {
        let mut state = task(vec![]);
        state.options = r#"{"system_prompt": "Be brief.", "other_planner_option": true}"#.into();
        assert_eq!(request(decide(&state)).system.as_deref(), Some("Be brief."));
    }

    #[test]
    fn empty_options_are_no_options() {
        let mut state = task(vec![]);
        state.options = String::new();
        assert!(matches!(decide(&state), Action::CallLlm(_)));
    }

    #[test]
    fn invalid_options_are_an_error() {
        for options in [
            "not json",
            "[]",
            r#"{"max_steps": -1}"#,
            r#"{"system_prompt": 3}"#,
        ] {
            let mut state = task(vec![]);
            state.options = options.into();
            let error = next_action(&state).expect_err(options);
            assert!(error.starts_with("invalid planner options: "), "{error}");
        }
    }
}
