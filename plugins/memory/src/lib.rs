//! Long-term memory as three tools, on the host's `memory` interface: what
//! one task saves, a later task of the same tenant and memory namespace
//! finds, after restarts too.

use opspawn_plugin::memory::{self, MemoryError};
use opspawn_plugin::prelude::*;

/// Saves a note for later tasks to find.
#[derive(Deserialize, JsonSchema)]
struct SaveInput {
    /// The note, in plain words: later searches match its words.
    text: String,
    /// Anything to keep with the note, such as its topic or source.
    #[serde(default)]
    metadata: Option<Value>,
}

fn memory_save(input: SaveInput) -> ToolResult {
    let metadata = input.metadata.unwrap_or(Value::Null);
    let id = memory::remember(&input.text, &metadata).map_err(MemoryError::into_tool_error)?;
    Ok(json!({ "id": id }))
}

/// Finds the saved notes that best match a query, best first.
#[derive(Deserialize, JsonSchema)]
struct SearchInput {
    /// Words to look for; empty lists the newest notes.
    query: String,
    /// How many notes to return at most (5 if not given).
    #[serde(default)]
    limit: Option<u32>,
}

fn memory_search(input: SearchInput) -> ToolResult {
    let found = memory::recall(&input.query, input.limit.unwrap_or(5))
        .map_err(MemoryError::into_tool_error)?;
    let notes: Vec<Value> = found
        .into_iter()
        .map(|note| {
            json!({
                "id": note.id,
                "text": note.text,
                "metadata": serde_json::from_str::<Value>(&note.metadata).unwrap_or(Value::Null),
                "created_at": note.created_at,
                "score": note.score,
            })
        })
        .collect();
    Ok(json!({ "notes": notes }))
}

/// Deletes a saved note by its id.
#[derive(Deserialize, JsonSchema)]
struct ForgetInput {
    /// The note's id, as `memory_save` or `memory_search` gave it.
    id: String,
}

fn memory_forget(input: ForgetInput) -> ToolResult {
    let existed = memory::forget(&input.id).map_err(MemoryError::into_tool_error)?;
    Ok(json!({ "forgotten": existed }))
}

register_tools!(memory_save, memory_search, memory_forget);
