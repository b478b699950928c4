//! Images in messages, as the providers take them. The host checks them
//! before they reach an adapter (media type, base64, size); an adapter only
//! shapes them. Images go in user and tool messages: a system or assistant
//! message with images is refused, as providers refuse them.

use crate::llm_http::{ChatMessage, LlmError, Provider, Role};
use crate::types::{Image, InlineImage};

/// An image as a URL: its address, or its bytes as a `data:` URL (how both
/// OpenAI APIs take inline images).
pub fn url_or_data(image: &Image) -> String {
    match image {
        Image::Url(url) => url.clone(),
        Image::Inline(InlineImage { media_type, base64 }) => {
            format!("data:{media_type};base64,{base64}")
        }
    }
}

/// Refuses images where no provider takes them.
pub fn check_placement(provider: &Provider, message: &ChatMessage) -> Result<(), LlmError> {
    match message.role {
        Role::User | Role::Tool => Ok(()),
        Role::System | Role::Assistant if message.images.is_empty() => Ok(()),
        Role::System | Role::Assistant => Err(provider.invalid_request(
            "images go in user and tool messages, not system or assistant ones".into(),
        )),
    }
}

/// The text that introduces a tool's images where a provider cannot put
/// them in the tool's own result (Chat Completions): they follow in a user
/// message, which says whose they are.
pub fn tool_images_caption(call_id: &str, count: usize) -> String {
    let noun = if count == 1 { "image" } else { "images" };
    format!("The {noun} returned by tool call {call_id}:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_images_become_data_urls_and_urls_stay() {
        let inline = Image::Inline(InlineImage {
            media_type: "image/png".into(),
            base64: "iVBORw0KGgo=".into(),
        });
        assert_eq!(url_or_data(&inline), "data:image/png;base64,iVBORw0KGgo=");
        let url = Image::Url("https://example.com/cat.jpg".into());
        assert_eq!(url_or_data(&url), "https://example.com/cat.jpg");
    }

    #[test]
    fn images_are_refused_in_system_and_assistant_messages() {
        let provider = Provider::named("P");
        let message = |role| ChatMessage {
            images: vec![Image::Url("https://example.com/a.png".into())],
            ..crate::llm_http::fixtures::message(role, "look")
        };
        for role in [Role::User, Role::Tool] {
            assert!(check_placement(&provider, &message(role)).is_ok());
        }
        for role in [Role::System, Role::Assistant] {
            let error = check_placement(&provider, &message(role)).unwrap_err();
            assert!(
                error
                    .message
                    .contains("images go in user and tool messages")
            );
        }
    }
}
