//! A blocking HTTP POST over `wasi:http/outgoing-handler`.
//!
//! The host decides whether the request may leave (its manifest's
//! `outbound_hosts`) and adds the credential header; this side only builds
//! the request and reads the response, the body chunk by chunk so that a
//! stream is handled as it arrives.

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use wasi::io::streams::{InputStream, StreamError};

/// `wasi:io` streams take at most this much per blocking write.
const WRITE_CHUNK: usize = 4096;
const READ_CHUNK: u64 = 16 * 1024;
const SECOND_NS: u64 = 1_000_000_000;

/// Response headers, looked up without regard to case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// How long to wait, in seconds, before giving up on a response.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: u64,
    pub first_byte: u64,
    pub between_bytes: u64,
}

/// A response whose body has not been read yet.
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    // Fields drop in order: a child resource (stream, then body) must go
    // before its parent.
    stream: InputStream,
    _body: IncomingBody,
    _response: IncomingResponse,
}

impl Response {
    /// The next piece of the body as it arrives, or `None` at its end.
    pub fn chunk(&mut self) -> Result<Option<Vec<u8>>, ErrorCode> {
        loop {
            match self.stream.blocking_read(READ_CHUNK) {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => return Ok(Some(bytes)),
                Err(StreamError::Closed) => return Ok(None),
                Err(StreamError::LastOperationFailed(error)) => {
                    return Err(
                        wasi::http::types::http_error_code(&error).unwrap_or_else(|| {
                            ErrorCode::InternalError(Some(error.to_debug_string()))
                        }),
                    );
                }
            }
        }
    }

    /// The rest of the body, stopping once it exceeds `limit` bytes (the
    /// caller tells a too-long body by its length).
    pub fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, ErrorCode> {
        let mut body = Vec::new();
        while body.len() <= limit {
            match self.chunk()? {
                Some(bytes) => body.extend_from_slice(&bytes),
                None => break,
            }
        }
        Ok(body)
    }
}

/// POSTs `body` to `url` and waits for the response's status and headers.
pub fn post(
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeouts: Timeouts,
) -> Result<Response, ErrorCode> {
    let (scheme, authority, path) = split_url(url).ok_or(ErrorCode::HttpRequestUriInvalid)?;
    let mut fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(name, value)| (name.clone(), value.clone().into_bytes()))
        .collect();
    fields.push(("content-length".into(), body.len().to_string().into_bytes()));
    let fields = Fields::from_list(&fields)
        .map_err(|error| ErrorCode::InternalError(Some(format!("invalid header: {error:?}"))))?;

    let request = OutgoingRequest::new(fields);
    let invalid = || ErrorCode::HttpRequestUriInvalid;
    request.set_method(&Method::Post).map_err(|()| invalid())?;
    request.set_scheme(Some(&scheme)).map_err(|()| invalid())?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid())?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| invalid())?;
    let outgoing = request
        .body()
        .map_err(|()| ErrorCode::InternalError(Some("request body taken twice".into())))?;

    let future = outgoing_handler::handle(request, Some(options(timeouts)))?;
    // A request the host refuses fails the write too; its future says why,
    // so that error wins.
    let written = write_body(outgoing, body);
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(code),
        Some(Err(())) | None => {
            return Err(ErrorCode::InternalError(Some("response lost".into())));
        }
    };
    written?;

    let status = response.status();
    let headers = Headers::from_pairs(
        response
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned())),
    );
    let body = response
        .consume()
        .map_err(|()| ErrorCode::InternalError(Some("response body taken twice".into())))?;
    let stream = body
        .stream()
        .map_err(|()| ErrorCode::InternalError(Some("response stream taken twice".into())))?;
    Ok(Response {
        status,
        headers,
        stream,
        _body: body,
        _response: response,
    })
}

fn options(timeouts: Timeouts) -> RequestOptions {
    let options = RequestOptions::new();
    // An `Err` means the host does not support that timeout; it bounds the
    // whole call anyway.
    let _ = options.set_connect_timeout(Some(timeouts.connect * SECOND_NS));
    let _ = options.set_first_byte_timeout(Some(timeouts.first_byte * SECOND_NS));
    let _ = options.set_between_bytes_timeout(Some(timeouts.between_bytes * SECOND_NS));
    options
}

fn write_body(outgoing: OutgoingBody, body: &[u8]) -> Result<(), ErrorCode> {
    let failed = |what: &str| ErrorCode::InternalError(Some(format!("writing the request {what}")));
    {
        let stream = outgoing.write().map_err(|()| failed("body"))?;
        for chunk in body.chunks(WRITE_CHUNK) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|_| failed("body"))?;
        }
    }
    OutgoingBody::finish(outgoing, None)
}

/// `scheme://authority/path?query` in parts; the path defaults to `/`.
fn split_url(url: &str) -> Option<(Scheme, &str, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return None;
    }
    let path = match path {
        "" => "/".to_owned(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_owned(),
    };
    Some((scheme, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> Option<(String, String, String)> {
        split_url(url).map(|(scheme, authority, path)| {
            let scheme = match scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
                Scheme::Other(_) => "other",
            };
            (scheme.into(), authority.into(), path)
        })
    }

    #[test]
    fn urls_split_into_request_parts() {
        let parts = |a: &str, b: &str, c: &str| Some((a.into(), b.into(), c.into()));
        assert_eq!(
            split("https://api.openai.com/v1/chat/completions"),
            parts("https", "api.openai.com", "/v1/chat/completions")
        );
        assert_eq!(
            split("http://127.0.0.1:11434/v1beta/models/m:streamGenerateContent?alt=sse"),
            parts(
                "http",
                "127.0.0.1:11434",
                "/v1beta/models/m:streamGenerateContent?alt=sse"
            )
        );
        assert_eq!(split("HTTP://[::1]:8080"), parts("http", "[::1]:8080", "/"));
        assert_eq!(split("https://host?x=1"), parts("https", "host", "/?x=1"));
        assert_eq!(split("ftp://host/x"), None);
        assert_eq!(split("https:///x"), None);
        assert_eq!(split("api.openai.com/v1"), None);
    }

    #[test]
    fn headers_ignore_case() {
        let headers = Headers::from_pairs([("Retry-After".into(), "3".into())]);
        assert_eq!(headers.get("retry-after"), Some("3"));
        assert_eq!(headers.get("content-type"), None);
    }
}
