//! Conversions for `opspawn:plugin@0.1.0` components. Fields that version
//! does not have (images, provider data, tool choice, structured output,
//! thread history) are left out of what such a component is given.

use crate::plugins::bindings::v0_1::{planning as wit_planning, types as wit};
use crate::protocol::{ChatMessage, ChatRequest, TaskState, to_json_text};

super::shared_conversions!();

fn message_to_wit(message: &ChatMessage) -> wit::ChatMessage {
    wit::ChatMessage {
        role: role_to_wit(message.role),
        content: message.content.clone(),
        tool_calls: message.tool_calls.iter().map(tool_call_to_wit).collect(),
        tool_call_id: message.tool_call_id.clone(),
    }
}

fn message_from_wit(message: wit::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: role_from_wit(message.role),
        content: message.content,
        images: Vec::new(),
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(tool_call_from_wit)
            .collect(),
        tool_call_id: message.tool_call_id,
        provider_data: Vec::new(),
    }
}

pub fn request_to_wit(request: &ChatRequest) -> wit::ChatRequest {
    wit::ChatRequest {
        model: request.model.clone(),
        system: request.system.clone(),
        messages: request.messages.iter().map(message_to_wit).collect(),
        tools: request.tools.iter().map(tool_spec_to_wit).collect(),
        temperature: request.temperature,
        max_tokens: request.max_tokens,
        stop: request.stop.clone(),
        provider_options: to_json_text(&request.provider_options),
    }
}

fn request_from_wit(request: wit::ChatRequest) -> ChatRequest {
    ChatRequest {
        model: request.model,
        system: request.system,
        messages: request.messages.into_iter().map(message_from_wit).collect(),
        tools: request
            .tools
            .into_iter()
            .map(tool_spec_from_planner)
            .collect(),
        tool_choice: Default::default(),
        parallel_tool_calls: None,
        response_format: None,
        temperature: request.temperature,
        top_p: None,
        max_tokens: request.max_tokens,
        stop: request.stop,
        provider_options: lenient_json(&request.provider_options),
    }
}

pub fn state_to_wit(state: &TaskState<'_>) -> wit_planning::TaskState {
    wit_planning::TaskState {
        goal: state.goal.to_owned(),
        tools: state
            .tools
            .iter()
            .map(|tool| tool_spec_to_wit(tool))
            .collect(),
        steps: state.steps.iter().map(|step| step_to_wit(step)).collect(),
        max_steps: state.max_steps,
        options: to_json_text(&state.options),
    }
}
