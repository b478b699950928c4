//! Long-term memory, kept by the host across tasks (the WIT interface
//! `memory`).
//!
//! A plugin may use it when its manifest asks for it:
//!
//! ```toml
//! [capabilities]
//! memory = true
//! ```
//!
//! Memories belong to the task's tenant and to the memory namespace the
//! task names (`memory_namespace`, `default` when it names none), so one
//! tenant's plugin never sees another tenant's memories. Every call is
//! journaled with its step: a step that runs again gets the same answers,
//! and a memory is never stored twice.
//!
//! Only components have the host's import: natively (in unit tests) these
//! functions must not be called.
//!
//! ```ignore
//! use opspawn_plugin::memory;
//!
//! let id = memory::remember("The user prefers metric units", &json!({"topic": "units"}))?;
//! for found in memory::recall("units", 5)? {
//!     println!("{} ({:.2})", found.text, found.score);
//! }
//! memory::forget(&id)?;
//! ```

use crate::__private::tool::opspawn::plugin::memory as wit;

pub use wit::{MemoryError, MemoryErrorKind, Recalled};

/// Stores `text`, with `metadata` (a JSON object, or `null` for none), and
/// returns its id.
pub fn remember(text: &str, metadata: &serde_json::Value) -> Result<String, MemoryError> {
    let metadata = match metadata {
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    wit::remember(text, &metadata)
}

/// The memories that best match `query`, best first, at most `limit` (the
/// host caps it). An empty query lists the newest memories.
pub fn recall(query: &str, limit: u32) -> Result<Vec<Recalled>, MemoryError> {
    wit::recall(query, limit)
}

/// Deletes the memory `id`; returns whether it existed.
pub fn forget(id: &str) -> Result<bool, MemoryError> {
    wit::forget(id)
}

impl MemoryError {
    /// The stable code for this error, as the host's API names it (such as
    /// `memory_full`).
    pub fn code(&self) -> &'static str {
        match self.kind {
            MemoryErrorKind::NotGranted => "memory_not_granted",
            MemoryErrorKind::Invalid => "invalid_memory",
            MemoryErrorKind::Full => "memory_full",
            MemoryErrorKind::Unavailable => "memory_unavailable",
        }
    }

    /// The same error as a tool's error, under its stable code, so that a
    /// tool can answer it with `.map_err(MemoryError::into_tool_error)?`.
    pub fn into_tool_error(self) -> crate::tool::ToolError {
        crate::tool::ToolError::new(self.code(), self.message)
    }
}
