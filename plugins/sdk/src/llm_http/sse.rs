//! Server-sent events, as providers stream their responses.
//!
//! The host frames a live stream into events itself and hands them to
//! `read-stream`; this parser does the same for recorded bodies in tests,
//! and documents the framing adapters expect. The body arrives in chunks
//! that may split a line, a `\r\n` pair or a UTF-8 character anywhere, so
//! bytes are buffered until a line is complete. A dispatched event is its
//! `event:` name, if any, and its `data:` lines joined with `\n`.

pub use crate::llm_http::SseEvent;

#[derive(Debug, Default)]
pub struct SseParser {
    /// The bytes of the line being read.
    line: Vec<u8>,
    /// The last line ended with `\r`: a `\n` right after it belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk of the body; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    events.extend(self.line_done(&line));
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
        events
    }

    /// Ends the body: an event left without its closing blank line is still
    /// dispatched, since some servers close the stream right after it.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.line_done(&line);
        }
        self.dispatch()
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return None; // a comment, such as OpenRouter's keep-alives
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {} // id, retry and unknown fields mean nothing here
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        self.data.take().map(|data| SseEvent { event, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    const STREAM: &str = ": keep-alive\r\n\
        event: message_start\r\ndata: {\"a\":\"é\"}\r\n\r\n\
        data: one\ndata:two\n\n\
        id: 7\nretry: 10\ndata: [DONE]\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            event(Some("message_start"), "{\"a\":\"é\"}"),
            event(None, "one\ntwo"),
            event(None, "[DONE]"),
        ]
    }

    #[test]
    fn parses_a_whole_stream() {
        let mut parser = SseParser::new();
        assert_eq!(parser.push(STREAM.as_bytes()), expected());
        assert_eq!(parser.finish(), None);
    }

    #[test]
    fn chunks_may_split_anywhere() {
        let bytes = STREAM.as_bytes();
        for size in 1..=7 {
            let mut parser = SseParser::new();
            let events: Vec<_> = bytes
                .chunks(size)
                .flat_map(|chunk| parser.push(chunk))
                .collect();
            assert_eq!(events, expected(), "chunks of {size} bytes");
        }
    }

    #[test]
    fn bare_carriage_returns_end_lines() {
        let mut parser = SseParser::new();
        assert_eq!(parser.push(b"data: x\r\rdata: y\r"), [event(None, "x")]);
        assert_eq!(parser.push(b"\n"), []);
        assert_eq!(parser.push(b"\r\n"), [event(None, "y")]);
    }

    #[test]
    fn an_unterminated_last_event_is_kept() {
        let mut parser = SseParser::new();
        assert_eq!(parser.push(b"event: end\ndata: {}"), []);
        assert_eq!(parser.finish(), Some(event(Some("end"), "{}")));
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing() {
        let mut parser = SseParser::new();
        assert_eq!(
            parser.push(b"\n\nevent: ping\n\ndata: x\n\n"),
            [event(None, "x")]
        );
    }
}
