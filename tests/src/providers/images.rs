//! Images as the mocks check and see them. Each provider's mock checks the
//! shape of its own image parts and calls these for what they share: a
//! `data:` URL (both OpenAI APIs) and base64 bytes that must be an image of
//! the type they claim (Anthropic refuses a mismatch, and the others cannot
//! read one). What the model "sees" is [`seen`]: every image of a request,
//! in any provider's shape, in the order it comes.

use base64::Engine as _;
use serde_json::Value;

/// The image types all four APIs take.
pub(super) const MEDIA_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Checks base64 `data` that claims to be a `media_type` image.
pub(super) fn check_bytes(media_type: &str, data: &str) -> Result<(), String> {
    if !MEDIA_TYPES.contains(&media_type) {
        return Err(format!(
            "media type {media_type:?} is not one of {}",
            MEDIA_TYPES.join(", ")
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("the image data is not valid base64: {e}"))?;
    let matches = match media_type {
        "image/png" => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => bytes.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => bytes.starts_with(b"GIF8"),
        _ => bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP",
    };
    if matches {
        Ok(())
    } else {
        Err(format!(
            "Image does not match the provided media type {media_type}"
        ))
    }
}

/// Checks an image URL as both OpenAI APIs take it: an http(s) address, or
/// a `data:` URL of base64 image bytes.
pub(super) fn check_image_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(());
    }
    let expected = "Expected a base64-encoded data URL with an image MIME type (e.g. \
                    'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got";
    let Some((media_type, data)) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    else {
        return Err(format!(
            "{expected} a value that is neither a URL nor a data URL."
        ));
    };
    check_bytes(media_type, data).map_err(|why| format!("{expected} one that is not: {why}."))
}

/// What the model sees: each image of the request, in order, as its media
/// type (inline bytes) or `url` (an address), in any provider's shape.
pub fn seen(body: &Value) -> Vec<String> {
    let mut images = Vec::new();
    walk(body, &mut images);
    images
}

fn walk(value: &Value, images: &mut Vec<String>) {
    let url_or_type = |url: &str| match url.strip_prefix("data:") {
        Some(rest) => rest.split(';').next().unwrap_or_default().to_owned(),
        None => "url".to_owned(),
    };
    match value {
        Value::Array(items) => items.iter().for_each(|item| walk(item, images)),
        Value::Object(object) => {
            let image = match object.get("type").and_then(Value::as_str) {
                // Chat Completions.
                Some("image_url") => object["image_url"]["url"].as_str().map(url_or_type),
                // The Responses API.
                Some("input_image") => object["image_url"].as_str().map(url_or_type),
                // Anthropic.
                Some("image") => match object["source"]["type"].as_str() {
                    Some("base64") => object["source"]["media_type"].as_str().map(str::to_owned),
                    Some("url") => Some("url".to_owned()),
                    _ => None,
                },
                _ => None,
            }
            // Gemini.
            .or_else(|| {
                object.get("inlineData")?["mimeType"]
                    .as_str()
                    .map(str::to_owned)
            });
            match image {
                Some(image) => images.push(image),
                None => object.values().for_each(|value| walk(value, images)),
            }
        }
        _ => {}
    }
}
