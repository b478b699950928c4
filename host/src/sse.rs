//! Server-sent events read from a stream of bytes, as the WHATWG HTML
//! standard interprets an event stream (§ 9.2.6): lines end with CR LF, LF
//! or CR; a blank line dispatches the event being built, if it has data; a
//! line starting with `:` is a comment; one space after a field's colon is
//! dropped; unknown fields are ignored; an event left unfinished when the
//! stream ends is discarded. `id` and `retry` are ignored too: they serve a
//! client that reconnects, and every reader here reads one response.
//!
//! Every reader of an event stream in the host uses it: an LLM provider's
//! reply, and the task events the CLI, gRPC's `WatchTask` and the MCP
//! server follow. Not `eventsource-stream` (which the end-to-end tests keep
//! as an independent client): a provider streams a reply as dozens of small
//! events, and that crate copies the rest of its buffer for every line it
//! takes (`String::split_off`) and parses each line with nom. On the
//! slow-LLM benchmark that was 2.5 % of the server's CPU. This reads each
//! chunk once, line by line, and copies only a line split across two
//! chunks.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field, if the event gave one (the standard calls an
    /// event without one `message`).
    pub event: Option<String>,
    /// The `data` lines, joined by LF.
    pub data: String,
}

/// The event-stream interpretation, fed chunk by chunk.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// The start of a line whose end has not arrived.
    partial: Vec<u8>,
    /// The last chunk ended in CR: an LF starting the next one ends nothing.
    after_cr: bool,
    /// The stream's first line has been seen (a byte-order mark before it
    /// is dropped).
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    /// Reads `chunk`, appending each event it completes to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut VecDeque<SseEvent>) {
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.partial.is_empty() {
                self.line(&chunk[..end], out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&chunk[..end]);
                self.line(&line, out);
                line.clear();
                self.partial = line;
            }
            if chunk[end] == b'\r' {
                match chunk.get(end + 1) {
                    Some(b'\n') => chunk = &chunk[end + 2..],
                    Some(_) => chunk = &chunk[end + 1..],
                    None => {
                        self.after_cr = true;
                        chunk = &[];
                    }
                }
            } else {
                chunk = &chunk[end + 1..];
            }
        }
        self.partial.extend_from_slice(chunk);
    }

    fn line(&mut self, mut line: &[u8], out: &mut VecDeque<SseEvent>) {
        if !self.started {
            self.started = true;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return,
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.has_data = true;
                self.data.push_str(&String::from_utf8_lossy(value));
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&String::from_utf8_lossy(value));
            }
            // `id` and `retry` (see the module's comment) and any field the
            // standard does not name.
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        out.push_back(SseEvent {
            event: (!event.is_empty()).then_some(event),
            data: std::mem::take(&mut self.data),
        });
    }
}

/// The events of a stream of byte chunks; the stream's errors pass through.
pub struct SseStream<S> {
    chunks: S,
    decoder: SseDecoder,
    ready: VecDeque<SseEvent>,
    ended: bool,
}

impl<S> SseStream<S> {
    pub fn new(chunks: S) -> Self {
        Self {
            chunks,
            decoder: SseDecoder::default(),
            ready: VecDeque::new(),
            ended: false,
        }
    }
}

impl<S, E> Stream for SseStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<SseEvent, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.chunks).poll_next(cx)) {
                Some(Ok(chunk)) => this.decoder.feed(&chunk, &mut this.ready),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut decoder = SseDecoder::default();
        let mut out = VecDeque::new();
        for chunk in chunks {
            decoder.feed(chunk, &mut out);
        }
        out.into_iter()
            .map(|e| (e.event.unwrap_or_else(|| "message".into()), e.data))
            .collect()
    }

    fn event(event: &str, data: &str) -> (String, String) {
        (event.into(), data.into())
    }

    #[test]
    fn reads_the_standards_examples() {
        // § 9.2.6's examples: data lines joined, a comment and `id` lines
        // read past, one space dropped after the colon.
        let stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n";
        assert_eq!(
            events(&[stream]),
            [
                event("message", "first event"),
                event("message", "second event"),
                event("message", " third event"),
            ]
        );
        let stream = b"data\n\ndata\ndata\n\ndata:\n";
        assert_eq!(
            events(&[stream]),
            [event("message", ""), event("message", "\n")]
        );
        let stream = b"data:test\n\ndata: test\n\n";
        assert_eq!(
            events(&[stream]),
            [event("message", "test"), event("message", "test")]
        );
    }

    #[test]
    fn events_are_named_and_unknown_fields_ignored() {
        let stream = b"event: content_block_delta\nretry: 10\nfoo: bar\nnocolon\ndata: {\"a\":1}\n\nevent: ping\n\ndata: x\n\n";
        assert_eq!(
            events(&[stream]),
            [
                event("content_block_delta", "{\"a\":1}"),
                // An event with no data is not dispatched, and its name does
                // not carry over.
                event("message", "x"),
            ]
        );
    }

    #[test]
    fn any_line_ending_and_any_split_read_the_same() {
        let lf = b"\xef\xbb\xbfdata: a\xc3\xa9\nevent: e\n\n: c\ndata: b\ndata: c\n\nid: 7\ndata: [DONE]\n\n".to_vec();
        let expected = [
            event("e", "a\u{e9}"),
            event("message", "b\nc"),
            event("message", "[DONE]"),
        ];
        for ending in [&b"\n"[..], b"\r\n", b"\r"] {
            let text: Vec<u8> = lf.split(|&b| b == b'\n').collect::<Vec<_>>().join(ending);
            assert_eq!(events(&[&text[..]]), expected, "{ending:?}");
            for split in 0..text.len() {
                let (a, b) = text.split_at(split);
                assert_eq!(events(&[a, b]), expected, "{ending:?} at {split}");
            }
            let bytes: Vec<&[u8]> = text.chunks(1).collect();
            assert_eq!(events(&bytes), expected, "{ending:?} byte by byte");
        }
    }

    #[test]
    fn a_crlf_split_by_an_empty_chunk_is_one_line_ending() {
        assert_eq!(
            events(&[b"data: a\r", b"", b"\ndata: b\r\n\r\n"]),
            [event("message", "a\nb")]
        );
    }

    #[test]
    fn an_unfinished_event_is_dropped_at_the_end() {
        assert_eq!(events(&[b"data: a\n\ndata: b\n"]), [event("message", "a")]);
        assert_eq!(events(&[b"data: a\n\ndata: b"]), [event("message", "a")]);
    }

    #[test]
    fn id_lines_are_read_past_and_bad_utf8_replaced() {
        assert_eq!(
            events(&[b"id: 1\n\nid: 2\x00\ndata: \xff\n\n"]),
            [event("message", "\u{fffd}")]
        );
    }

    #[tokio::test]
    async fn a_stream_gives_its_events_then_its_error() {
        use futures::StreamExt;
        let chunks = futures::stream::iter([
            Ok(Bytes::from_static(b"data: a\n\nda")),
            Ok(Bytes::from_static(b"ta: b\n\n")),
            Err("broken"),
        ]);
        let got: Vec<_> = SseStream::new(chunks)
            .map(|e| e.map(|e| e.data))
            .collect()
            .await;
        assert_eq!(got, [Ok("a".to_owned()), Ok("b".to_owned()), Err("broken")]);
    }
}
