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
//! so `read-response` and `read-stream` keep the SDK's defaults, which say so.

pub mod adapter;

use opspawn_plugin::llm::{Exchange, LlmAdapter, Prepared};
use opspawn_plugin::types::{CallContext, ChatRequest, LlmError};

struct Scripted;

// Only `prepare`: the trait's `read_response` and `read_stream` answer that
// this adapter has nothing to read.
impl LlmAdapter for Scripted {
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
}

opspawn_plugin::register_llm_adapter!(Scripted);
