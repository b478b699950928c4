//! The `scripted` LLM adapter: replays scripted responses instead of calling
//! a provider, for offline runs, demos and tests.
//!
//! The script comes in the request's provider options, either inline
//! (`{"script": [...]}`) or as a file (`{"script_file": "path.json"}`). Without
//! one the adapter runs a small demo that can do arithmetic with the
//! `calculator` tool. See [`adapter`] for the details.

pub mod adapter;

wit_bindgen::generate!({ world: "llm-adapter", path: "../../wit" });

use exports::opspawn::plugin::chat::Guest;
use opspawn::plugin::llm_stream::emit_delta;
use opspawn::plugin::types::{CallContext, ChatRequest, ChatResponse, LlmError};

struct Scripted;

impl Guest for Scripted {
    fn complete(_context: CallContext, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let response = adapter::complete(&request)?;
        // Stream the reply as a provider would, so the event stream and its
        // consumers see deltas before the step completes.
        for chunk in adapter::chunks(&response.message.content) {
            emit_delta(chunk);
        }
        Ok(response)
    }
}

// The exported symbols are named like `opspawn:plugin/chat@0.1.0#complete`,
// which a native linker refuses in a shared library: export them only when
// building the component, so a host-target `cargo build` or `cargo test` works.
#[cfg(target_arch = "wasm32")]
export!(Scripted);
