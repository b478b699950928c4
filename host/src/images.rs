//! Images in a task (docs/architecture.md, "Images").
//!
//! Two kinds reach an LLM:
//! - the goal's, `images` in the task body, checked here when the task is
//!   submitted and stored with it;
//! - a tool's: an output in MCP's content shape (a list of `text`, `image`
//!   and other blocks), which is what MCP tools answer and what a
//!   component tool may answer too. Its images are checked here when the
//!   planner is shown the step, and left out of what it reads.
//!
//! Planners handle text: they never see image bytes, and an LLM step's
//! journaled request holds none. The host attaches the images when it
//! calls the LLM ([`attach`]): the goal's to the user message that carries
//! the goal, a tool's to the tool message that answers its call. Each
//! adapter then shapes them for its provider.

use base64::Engine as _;
use serde_json::Value;

use crate::protocol::{ChatRequest, Image, Role};

/// The most images a task's goal may carry.
pub const MAX_GOAL_IMAGES: usize = 8;
/// The most bytes an inline image may decode to: Anthropic's limit, the
/// strictest of the providers (OpenAI and Gemini take 20 MB).
pub const MAX_IMAGE_BYTES: usize = 5 * 1024 * 1024;
/// The longest image URL taken.
pub const MAX_URL_BYTES: usize = 2048;
/// The image types every provider takes.
pub const MEDIA_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/webp", "image/gif"];

/// The goal's images, from the task body's `images`: each either
/// `{"url": "https://..."}` or `{"media_type": "image/png", "data": <base64>}`.
pub fn goal_images(values: &[Value]) -> Result<Vec<Image>, String> {
    if values.len() > MAX_GOAL_IMAGES {
        return Err(format!(
            "images holds {} images; a task may carry at most {MAX_GOAL_IMAGES}",
            values.len()
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(index, value)| image(value).map_err(|why| format!("images[{index}]: {why}")))
        .collect()
}

fn image(value: &Value) -> Result<Image, String> {
    let Value::Object(fields) = value else {
        return Err(format!(
            "expected an object with url, or with media_type and data, not {value}"
        ));
    };
    let text = |name: &str| match fields.get(name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.as_str())),
        Some(other) => Err(format!("{name} must be a string, not {other}")),
    };
    if let Some(unknown) = fields
        .keys()
        .find(|key| !["url", "media_type", "data"].contains(&key.as_str()))
    {
        return Err(format!(
            "unknown field {unknown:?}: an image is url, or media_type and data"
        ));
    }
    match (text("url")?, text("media_type")?, text("data")?) {
        (Some(url), None, None) => {
            check_url(url)?;
            Ok(Image::Url {
                url: url.to_owned(),
            })
        }
        (None, Some(media_type), Some(data)) => {
            check_inline(media_type, data)?;
            Ok(Image::Inline {
                media_type: media_type.to_owned(),
                base64: data.to_owned(),
            })
        }
        (Some(_), _, _) => Err("give url, or media_type and data, not both".into()),
        _ => Err("an image needs url, or both media_type and data".into()),
    }
}

/// An address the provider fetches: absolute http(s), bounded.
fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("url is longer than {MAX_URL_BYTES} bytes"));
    }
    if url.starts_with("data:") {
        return Err("a data: URL is inline bytes: give them as media_type and data".into());
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| format!("url {url:?} is not a valid URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(host)) if !host.is_empty() => Ok(()),
        _ => Err(format!(
            "url {url:?} must be an absolute http:// or https:// address"
        )),
    }
}

/// Inline bytes: a type every provider takes, valid base64, at most
/// [`MAX_IMAGE_BYTES`], and bytes that are what the type says (providers
/// refuse an image whose bytes are another type's).
pub fn check_inline(media_type: &str, data: &str) -> Result<(), String> {
    if !MEDIA_TYPES.contains(&media_type) {
        return Err(format!(
            "media_type {media_type:?} is not one of {}",
            MEDIA_TYPES.join(", ")
        ));
    }
    // Base64 is 4 characters for 3 bytes: too long is refused undecoded.
    if data.len() / 4 * 3 > MAX_IMAGE_BYTES + 3 {
        return Err(format!(
            "the image is larger than {} MiB",
            MAX_IMAGE_BYTES >> 20
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("data is not standard base64: {e}"))?;
    if bytes.is_empty() {
        return Err("data is empty".into());
    }
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "the image is larger than {} MiB",
            MAX_IMAGE_BYTES >> 20
        ));
    }
    if media_type_of(&bytes) != Some(media_type) {
        return Err(format!("data is not an image of type {media_type}"));
    }
    Ok(())
}

/// The type of image `bytes` are, read from how they start (their magic
/// bytes): one of [`MEDIA_TYPES`], or `None`.
pub fn media_type_of(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n', ..] => Some("image/png"),
        [0xFF, 0xD8, 0xFF, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some("image/gif"),
        [b'R', b'I', b'F', b'F', _, _, _, _, kind @ ..] if kind.starts_with(b"WEBP") => {
            Some("image/webp")
        }
        _ => None,
    }
}

/// A tool's output in MCP's content shape with at least one image block:
/// the text a planner reads (its text blocks, a note for each image, and
/// any other block as JSON) and the images that pass [`check_inline`]. An
/// image that does not pass is left out, and the note says why. `None`
/// for any other output.
pub fn tool_output(output: &Value) -> Option<(String, Vec<Image>)> {
    let blocks = output.as_array()?;
    let kind = |block: &Value| block.get("type").and_then(Value::as_str).map(str::to_owned);
    if blocks.iter().any(|block| kind(block).is_none())
        || !blocks
            .iter()
            .any(|block| kind(block).as_deref() == Some("image"))
    {
        return None;
    }
    let mut text = Vec::new();
    let mut images = Vec::new();
    for block in blocks {
        match kind(block).as_deref() {
            Some("text") => text.push(block["text"].as_str().unwrap_or_default().to_owned()),
            Some("image") => {
                let media_type = block["mimeType"].as_str().unwrap_or_default();
                let data = block["data"].as_str().unwrap_or_default();
                match check_inline(media_type, data) {
                    Ok(()) => {
                        images.push(Image::Inline {
                            media_type: media_type.to_owned(),
                            base64: data.to_owned(),
                        });
                        text.push(format!(
                            "[image {}: {media_type}, attached for the model to see]",
                            images.len()
                        ));
                    }
                    Err(why) => text.push(format!("[an image left out: {why}]")),
                }
            }
            _ => text.push(block.to_string()),
        }
    }
    Some((text.join("\n"), images))
}

/// Attaches the task's images to a chat request its planner made: the
/// goal's to the user message carrying the goal (the first that contains
/// its text, else the first user message), and each tool's, found by
/// `tool_images` from the call id, to the tool message answering that
/// call. A message that already has images keeps them. Returns whether
/// anything was attached.
pub fn attach(
    request: &mut ChatRequest,
    goal: &str,
    goal_images: &[Image],
    tool_images: impl Fn(&str) -> Vec<Image>,
) -> bool {
    let mut attached = false;
    if !goal_images.is_empty() {
        let users = || {
            request
                .messages
                .iter()
                .position(|m| m.role == Role::User && m.content.contains(goal))
                .or_else(|| request.messages.iter().position(|m| m.role == Role::User))
        };
        if let Some(at) = users()
            && request.messages[at].images.is_empty()
        {
            request.messages[at].images = goal_images.to_vec();
            attached = true;
        }
    }
    for message in &mut request.messages {
        if message.role != Role::Tool || !message.images.is_empty() {
            continue;
        }
        if let Some(call_id) = &message.tool_call_id {
            let images = tool_images(call_id);
            if !images.is_empty() {
                message.images = images;
                attached = true;
            }
        }
    }
    attached
}

/// How many images a request carries.
pub fn count(request: &ChatRequest) -> usize {
    request.messages.iter().map(|m| m.images.len()).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::protocol::ChatMessage;

    /// A one-pixel PNG.
    pub(crate) const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    fn pixel() -> Image {
        Image::Inline {
            media_type: "image/png".into(),
            base64: PIXEL_PNG.into(),
        }
    }

    #[test]
    fn goal_images_are_urls_or_checked_inline_bytes() {
        let images = goal_images(&[
            json!({"url": "https://example.com/cat.jpg"}),
            json!({"media_type": "image/png", "data": PIXEL_PNG}),
        ])
        .unwrap();
        assert_eq!(
            images,
            [
                Image::Url {
                    url: "https://example.com/cat.jpg".into()
                },
                pixel()
            ]
        );
        // The stored and viewed shape is the one submitted.
        assert_eq!(
            serde_json::to_value(&images).unwrap(),
            json!([{"url": "https://example.com/cat.jpg"},
                   {"media_type": "image/png", "data": PIXEL_PNG}])
        );
    }

    #[test]
    fn the_type_is_read_from_the_first_bytes() {
        let png = base64::engine::general_purpose::STANDARD
            .decode(PIXEL_PNG)
            .unwrap();
        assert_eq!(media_type_of(&png), Some("image/png"));
        assert_eq!(
            media_type_of(&[0xFF, 0xD8, 0xFF, 0xE0, 0]),
            Some("image/jpeg")
        );
        assert_eq!(media_type_of(b"GIF89a\x01\x00"), Some("image/gif"));
        assert_eq!(media_type_of(b"GIF87a"), Some("image/gif"));
        assert_eq!(media_type_of(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        for not_an_image in [
            &b""[..],
            b"GIF8",
            b"GIF88a",
            b"RIFF\0\0\0\0WAVE",
            b"\x89PNG",
        ] {
            assert_eq!(media_type_of(not_an_image), None, "{not_an_image:?}");
        }
    }

    #[test]
    fn bad_images_are_refused_saying_which_and_why() {
        let too_big = "A".repeat((MAX_IMAGE_BYTES / 3 + 2) * 4);
        let cases = [
            (
                json!("https://example.com/a.png"),
                "images[0]: expected an object",
            ),
            (
                json!({}),
                "images[0]: an image needs url, or both media_type and data",
            ),
            (json!({"url": 3}), "url must be a string"),
            (
                json!({"url": "ftp://example.com/a.png"}),
                "must be an absolute http://",
            ),
            (json!({"url": "/a.png"}), "must be an absolute http://"),
            (
                json!({"url": "data:image/png;base64,AAAA"}),
                "give them as media_type and data",
            ),
            (
                json!({"url": format!("https://e.com/{}", "a".repeat(MAX_URL_BYTES))}),
                "longer than 2048",
            ),
            (
                json!({"url": "https://e.com/a.png", "data": PIXEL_PNG}),
                "not both",
            ),
            (
                json!({"url": "https://e.com/a.png", "detail": "high"}),
                "unknown field \"detail\"",
            ),
            (
                json!({"media_type": "image/png"}),
                "needs url, or both media_type and data",
            ),
            (
                json!({"url": "https://e.com/a.png", "media_type": "image/png", "data": PIXEL_PNG}),
                "not both",
            ),
            (
                json!({"media_type": "image/bmp", "data": PIXEL_PNG}),
                "is not one of image/png",
            ),
            (
                json!({"media_type": "image/png", "data": "not base64!"}),
                "not standard base64",
            ),
            (
                json!({"media_type": "image/png", "data": ""}),
                "data is empty",
            ),
            (
                json!({"media_type": "image/jpeg", "data": PIXEL_PNG}),
                "data is not an image of type image/jpeg",
            ),
            (
                json!({"media_type": "image/png", "data": too_big}),
                "larger than 5 MiB",
            ),
        ];
        for (value, why) in cases {
            let error = goal_images(std::slice::from_ref(&value)).unwrap_err();
            assert!(error.contains(why), "{value}: {error}");
        }
        let nine = vec![json!({"url": "https://example.com/a.png"}); MAX_GOAL_IMAGES + 1];
        assert!(goal_images(&nine).unwrap_err().contains("at most 8"));
    }

    #[test]
    fn a_tool_outputs_images_are_taken_out_of_what_the_planner_reads() {
        let output = json!([
            {"type": "text", "text": "Here is the chart."},
            {"type": "image", "data": PIXEL_PNG, "mimeType": "image/png"},
            {"type": "image", "data": "AAAA", "mimeType": "image/tiff"},
            {"type": "resource_link", "uri": "file:///chart.csv", "name": "chart.csv"},
        ]);
        let (text, images) = tool_output(&output).unwrap();
        assert_eq!(images, [pixel()]);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "Here is the chart.",
                "[image 1: image/png, attached for the model to see]",
                "[an image left out: media_type \"image/tiff\" is not one of image/png, \
                 image/jpeg, image/webp, image/gif]",
                r#"{"name":"chart.csv","type":"resource_link","uri":"file:///chart.csv"}"#,
            ]
        );
        for other in [
            json!("text"),
            json!({"type": "image"}),
            json!([{"type": "text", "text": "no image"}]),
            json!([{"type": "image", "data": PIXEL_PNG, "mimeType": "image/png"}, 3]),
        ] {
            assert_eq!(tool_output(&other), None, "{other}");
        }
    }

    fn message(role: Role, content: &str, call_id: Option<&str>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: call_id.map(str::to_owned),
            provider_data: Vec::new(),
        }
    }

    fn request(messages: Vec<ChatMessage>) -> ChatRequest {
        let mut request: ChatRequest = serde_json::from_value(json!({"messages": []})).unwrap();
        request.messages = messages;
        request
    }

    #[test]
    fn images_are_attached_to_the_goals_message_and_the_results_of_their_calls() {
        let url = Image::Url {
            url: "https://example.com/cat.jpg".into(),
        };
        let mut chat = request(vec![
            message(Role::User, "Question: an earlier one", None),
            message(Role::Assistant, "An earlier answer", None),
            message(Role::User, "Question: what is in the picture?", None),
            message(Role::Tool, "[image 1: image/png, attached]", Some("call_1")),
            message(Role::Tool, "no images", Some("call_2")),
        ]);
        let tool_images = |id: &str| {
            if id == "call_1" {
                vec![pixel()]
            } else {
                Vec::new()
            }
        };
        assert!(attach(
            &mut chat,
            "what is in the picture?",
            std::slice::from_ref(&url),
            tool_images
        ));
        let images: Vec<&[Image]> = chat.messages.iter().map(|m| &m.images[..]).collect();
        assert_eq!(
            images,
            [&[][..], &[], std::slice::from_ref(&url), &[pixel()], &[]]
        );
        assert_eq!(count(&chat), 2);

        // A planner that words the goal its own way: the first user message.
        let mut reworded = request(vec![message(Role::User, "Describe it.", None)]);
        assert!(attach(
            &mut reworded,
            "what is in the picture?",
            std::slice::from_ref(&url),
            |_| Vec::new()
        ));
        assert_eq!(reworded.messages[0].images, std::slice::from_ref(&url));
        // Images a planner set itself are kept.
        assert!(!attach(&mut reworded, "Describe it.", &[pixel()], |_| {
            Vec::new()
        }));
        assert_eq!(reworded.messages[0].images, [url]);
    }
}
