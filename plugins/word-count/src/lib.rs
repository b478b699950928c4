use opspawn_plugin::prelude::*;

/// Counts the words in a text (runs of characters between whitespace).
#[derive(Deserialize, JsonSchema)]
struct Input {
    text: String,
}

fn word_count(input: Input) -> ToolResult {
    Ok(json!({ "words": input.text.split_whitespace().count() }))
}

register_tools!(word_count);
