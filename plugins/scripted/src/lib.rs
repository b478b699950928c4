//! The `scripted` LLM adapter: replays scripted responses instead of calling
//! a provider, for offline runs, demos and tests.
//!
//! The script comes in the request's provider options, either inline
//! (`{"script": [...]}`) or as a file (`{"script_file": "path.json"}`). Without
//! one the adapter runs a small demo that can do arithmetic with the
//! `calculator` tool. See [`adapter`] for the details.
//!
//! It needs no network: `prepare` answers with a local reply, and the host
//! waits out the scripted delay holding no instance. Nothing is left to read,
//! so `read-response` and `read-stream` only say so.

pub mod adapter;

wit_bindgen::generate!({ world: "llm-adapter", path: "../../wit/v0.2.0" });

use exports::opspawn::plugin::translate::{
    Exchange, Guest, HttpResponse, Prepared, SseEvent, StreamPart,
};
use opspawn::plugin::types::{CallContext, ChatRequest, ChatResponse, LlmError, LlmErrorKind};

struct Scripted;

impl Guest for Scripted {
    fn prepare(
        _context: CallContext,
        request: ChatRequest,
        settings: String,
    ) -> Result<Prepared, LlmError> {
        Ok(Prepared {
            exchange: Exchange::Local(adapter::answer(&request, &settings)),
            reply_context: String::new(),
        })
    }

    fn read_response(_context: String, _response: HttpResponse) -> Result<ChatResponse, LlmError> {
        Err(answers_locally())
    }

    fn read_stream(_context: String, _events: Vec<SseEvent>) -> Result<Vec<StreamPart>, LlmError> {
        Err(answers_locally())
    }
}

fn answers_locally() -> LlmError {
    LlmError {
        kind: LlmErrorKind::Other,
        message: "the scripted adapter answers locally, from prepare: it has no HTTP response \
                  to read"
            .into(),
        status: None,
        body: None,
        retry_after_ms: None,
    }
}

// The exported symbols are named like `opspawn:plugin/translate@0.2.0#prepare`,
// which a native linker refuses in a shared library: export them only when
// building the component, so a host-target `cargo build` or `cargo test` works.
#[cfg(target_arch = "wasm32")]
export!(Scripted);
