//! Conversions for `opspawn:plugin@0.2.0` components.

use crate::plugins::bindings::v0_2::{planning as wit_planning, types as wit};
use crate::protocol::{
    ChatMessage, ChatRequest, EarlierTask, Image, ProviderDatum, ResponseFormat, TaskState,
    ToolChoice, to_json_text,
};

super::shared_conversions!();

fn image_to_wit(image: &Image) -> wit::Image {
    match image {
        Image::Url { url } => wit::Image::Url(url.clone()),
        Image::Inline { media_type, base64 } => wit::Image::Inline(wit::InlineImage {
            media_type: media_type.clone(),
            base64: base64.clone(),
        }),
    }
}

fn image_from_wit(image: wit::Image) -> Image {
    match image {
        wit::Image::Url(url) => Image::Url { url },
        wit::Image::Inline(inline) => Image::Inline {
            media_type: inline.media_type,
            base64: inline.base64,
        },
    }
}

fn message_to_wit(message: &ChatMessage) -> wit::ChatMessage {
    wit::ChatMessage {
        role: role_to_wit(message.role),
        content: message.content.clone(),
        images: message.images.iter().map(image_to_wit).collect(),
        tool_calls: message.tool_calls.iter().map(tool_call_to_wit).collect(),
        tool_call_id: message.tool_call_id.clone(),
        provider_data: message
            .provider_data
            .iter()
            .map(|datum| wit::ProviderDatum {
                key: datum.key.clone(),
                value: datum.value.clone(),
            })
            .collect(),
    }
}

pub fn message_from_wit(message: wit::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: role_from_wit(message.role),
        content: message.content,
        images: message.images.into_iter().map(image_from_wit).collect(),
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(tool_call_from_wit)
            .collect(),
        tool_call_id: message.tool_call_id,
        provider_data: message
            .provider_data
            .into_iter()
            .map(|datum| ProviderDatum {
                key: datum.key,
                value: datum.value,
            })
            .collect(),
    }
}

fn tool_choice_to_wit(choice: &ToolChoice) -> wit::ToolChoice {
    match choice {
        ToolChoice::Auto => wit::ToolChoice::Auto,
        ToolChoice::None => wit::ToolChoice::None,
        ToolChoice::Required => wit::ToolChoice::Required,
        ToolChoice::Named(name) => wit::ToolChoice::Named(name.clone()),
    }
}

fn tool_choice_from_wit(choice: wit::ToolChoice) -> ToolChoice {
    match choice {
        wit::ToolChoice::Auto => ToolChoice::Auto,
        wit::ToolChoice::None => ToolChoice::None,
        wit::ToolChoice::Required => ToolChoice::Required,
        wit::ToolChoice::Named(name) => ToolChoice::Named(name),
    }
}

pub fn request_to_wit(request: &ChatRequest) -> wit::ChatRequest {
    wit::ChatRequest {
        model: request.model.clone(),
        system: request.system.clone(),
        messages: request.messages.iter().map(message_to_wit).collect(),
        tools: request.tools.iter().map(tool_spec_to_wit).collect(),
        tool_choice: tool_choice_to_wit(&request.tool_choice),
        parallel_tool_calls: request.parallel_tool_calls,
        response_format: request
            .response_format
            .as_ref()
            .map(|format| wit::ResponseFormat {
                name: format.name.clone(),
                schema: to_json_text(&format.schema),
                strict: format.strict,
            }),
        temperature: request.temperature,
        top_p: request.top_p,
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
        tool_choice: tool_choice_from_wit(request.tool_choice),
        parallel_tool_calls: request.parallel_tool_calls,
        response_format: request.response_format.map(|format| ResponseFormat {
            name: format.name,
            schema: lenient_json(&format.schema),
            strict: format.strict,
        }),
        temperature: request.temperature,
        top_p: request.top_p,
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
        history: state.history.iter().map(earlier_task_to_wit).collect(),
        max_steps: state.max_steps,
        options: to_json_text(&state.options),
    }
}

fn earlier_task_to_wit(task: &EarlierTask) -> wit_planning::EarlierTask {
    wit_planning::EarlierTask {
        goal: task.goal.clone(),
        answer: task.answer.clone(),
        steps: task.steps.iter().map(step_to_wit).collect(),
    }
}
