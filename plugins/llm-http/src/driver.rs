//! The exchange every adapter runs: build the request, POST it, and read the
//! answer, streamed or whole.

use serde_json::Value;

use crate::bindings::opspawn::plugin::llm_stream::emit_delta;
use crate::bindings::opspawn::plugin::logging::{Level, log};
use crate::http::{self, Response, Timeouts};
use crate::options::ProviderOptions;
use crate::sse::SseParser;
use crate::wire::{Flow, ReplyContext, StreamDecoder, Wire};
use crate::{ChatRequest, ChatResponse, LlmError, Provider, json};

/// The largest whole response body read; a reply is far smaller.
const MAX_BODY: usize = 16 << 20;
/// How much of an error response is read (the journal keeps 4 KiB of it).
const MAX_ERROR_READ: usize = 64 << 10;

/// [`complete`], streaming text to the task's event stream.
pub fn run<W: Wire>(wire: &W, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
    complete(wire, request, &mut |text| emit_delta(text))
}

/// Sends `request` in `wire`'s format and returns the reply, passing text to
/// `emit` as it arrives (all at once when the response is not streamed).
pub fn complete<W: Wire>(
    wire: &W,
    request: &ChatRequest,
    emit: &mut dyn FnMut(&str),
) -> Result<ChatResponse, LlmError> {
    let provider = wire.provider();
    let options = ProviderOptions::parse(&provider, &request.provider_options)?;
    let model = wire.model(request);
    let mut body = wire.body(request, &model, options.stream)?;
    json::merge(&mut body, Value::Object(options.extra));
    let body = body.to_string();
    let url = wire.url(&model, options.stream);
    log(
        Level::Debug,
        &format!("POST {url} (model {model}, stream {})", options.stream),
    );

    let timeouts = Timeouts {
        connect: 10,
        // A whole reply comes only once it is fully generated.
        first_byte: if options.stream { 60 } else { 120 },
        between_bytes: 60,
    };
    let transport = |code| provider.transport_error(&url, &code);
    let mut response = http::post(
        &url,
        &wire.headers(options.stream),
        body.as_bytes(),
        timeouts,
    )
    .map_err(transport)?;
    let status = response.status;
    if !(200..300).contains(&status) {
        let body = response.read_to_end(MAX_ERROR_READ).unwrap_or_default();
        return Err(wire.error(status, &response.headers, &body));
    }

    let context = ReplyContext::new(request, &model);
    // A server that ignores `stream` answers with plain JSON.
    let is_json = response
        .headers
        .get("content-type")
        .is_some_and(|kind| kind.contains("json"));
    let result = if options.stream && !is_json {
        read_stream(wire.decoder(context), &mut response, emit, &provider, &url)
    } else {
        let body = response.read_to_end(MAX_BODY).map_err(transport)?;
        if body.len() > MAX_BODY {
            return Err(provider.bad_response("the response is larger than 16 MiB", &[]));
        }
        wire.parse(&body, &context).inspect(|reply| {
            if !reply.message.content.is_empty() {
                emit(&reply.message.content);
            }
        })
    };
    result.map_err(|mut error| {
        error.status.get_or_insert(status);
        error
    })
}

fn read_stream<D: StreamDecoder>(
    mut decoder: D,
    response: &mut Response,
    emit: &mut dyn FnMut(&str),
    provider: &Provider,
    url: &str,
) -> Result<ChatResponse, LlmError> {
    let mut parser = SseParser::new();
    while let Some(chunk) = response
        .chunk()
        .map_err(|code| provider.transport_error(url, &code))?
    {
        for event in parser.push(&chunk) {
            if decoder.event(&event, emit)? == Flow::Done {
                return decoder.finish();
            }
        }
    }
    if let Some(event) = parser.finish() {
        decoder.event(&event, emit)?;
    }
    decoder.finish()
}
