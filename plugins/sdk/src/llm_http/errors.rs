//! Failures mapped to `llm-error`: HTTP statuses and provider error bodies,
//! each with a message a user can act on. Transport failures (refused,
//! unreachable, timed out) never reach an adapter: the host reports them.

use std::borrow::Cow;

use crate::llm_http::headers::Headers;
use crate::llm_http::{LlmError, LlmErrorKind};

/// How much of a provider's error body is kept in `llm-error.body`.
pub const MAX_ERROR_BODY: usize = 4096;

/// Who an adapter talks to, for error messages. The name is the adapter's
/// own, or the one its manifest gives it (an adapter serving several
/// endpoints under several names). Which variable holds the key is the
/// manifest's business: the host names it when a key is missing or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// As users know it: "OpenAI".
    pub name: Cow<'static, str>,
}

/// The kind of error an HTTP status means.
pub fn kind_for_status(status: u16) -> LlmErrorKind {
    match status {
        401 | 403 => LlmErrorKind::Auth,
        400 | 402 | 404 | 413 | 422 => LlmErrorKind::InvalidRequest,
        408 => LlmErrorKind::Timeout,
        429 => LlmErrorKind::RateLimited,
        500..=599 => LlmErrorKind::Unavailable,
        _ => LlmErrorKind::Other,
    }
}

impl Provider {
    pub const fn named(name: &'static str) -> Self {
        Self {
            name: Cow::Borrowed(name),
        }
    }

    /// The error for a response with a failure status.
    pub fn status_error(&self, status: u16, headers: &Headers, body: &[u8]) -> LlmError {
        let mut error = self.error(kind_for_status(status), Some(status), body);
        if error.kind == LlmErrorKind::RateLimited {
            error.retry_after_ms = retry_after_ms(headers);
        }
        error
    }

    /// An error of a known kind. The message says what happened and what to
    /// do; the provider's own explanation stays in `body`, which the host
    /// shows beside it.
    pub fn error(&self, kind: LlmErrorKind, status: Option<u16>, body: &[u8]) -> LlmError {
        LlmError {
            kind,
            message: self.summary(kind, status),
            status,
            body: truncated(body),
            retry_after_ms: None,
        }
    }

    /// A response that could not be understood.
    pub fn bad_response(&self, why: &str, body: &[u8]) -> LlmError {
        LlmError {
            kind: LlmErrorKind::BadResponse,
            message: format!(
                "{} sent a response that could not be understood: {why}",
                self.name
            ),
            status: None,
            body: truncated(body),
            retry_after_ms: None,
        }
    }

    /// A request this adapter cannot express for the provider.
    pub fn invalid_request(&self, why: String) -> LlmError {
        LlmError::new(
            LlmErrorKind::InvalidRequest,
            format!("cannot send this request to {}: {why}", self.name),
        )
    }

    /// A reply context this adapter did not make: a host bug, not the
    /// provider's.
    pub fn bad_context(&self, why: &str) -> LlmError {
        LlmError::new(
            LlmErrorKind::Other,
            format!(
                "the reply context handed back to the {} adapter is not one it made: {why}",
                self.name
            ),
        )
    }

    fn summary(&self, kind: LlmErrorKind, status: Option<u16>) -> String {
        let name = &self.name;
        let code = status.map_or_else(String::new, |status| format!(" ({status})"));
        match kind {
            LlmErrorKind::Auth => {
                let how = if status == Some(403) {
                    "forbidden"
                } else {
                    "unauthorized"
                };
                format!("{name} rejected the request as {how}{code}")
            }
            LlmErrorKind::InvalidRequest if status == Some(402) => format!(
                "{name} refused the request for lack of credits{code}: add credits to the account"
            ),
            LlmErrorKind::InvalidRequest => format!("{name} rejected the request as invalid{code}"),
            LlmErrorKind::RateLimited => format!("{name} is rate limiting requests{code}"),
            LlmErrorKind::Unavailable => format!("{name} is unavailable{code}"),
            LlmErrorKind::Timeout => format!("{name} timed out{code}"),
            LlmErrorKind::BadResponse => {
                format!("{name} sent a response that could not be understood{code}")
            }
            LlmErrorKind::Other => format!("{name} answered with an error{code}"),
        }
    }
}

/// How long a rate-limited client should wait, from `retry-after-ms` or
/// `Retry-After` (seconds; an HTTP date is not worth a date parser here).
pub fn retry_after_ms(headers: &Headers) -> Option<u64> {
    let seconds = |text: &str| {
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
    };
    if let Some(ms) = headers.get("retry-after-ms").and_then(seconds) {
        return Some(ms.round() as u64);
    }
    headers
        .get("retry-after")
        .and_then(seconds)
        .map(|s| (s * 1000.0).round() as u64)
}

/// A body as kept in `llm-error.body`: lossy UTF-8, at most
/// [`MAX_ERROR_BODY`] bytes, `None` when empty.
pub fn truncated(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
    // A character cut in half at the limit becomes U+FFFD; drop it.
    let text = if body.len() > MAX_ERROR_BODY {
        text.trim_end_matches('\u{fffd}')
    } else {
        &text
    };
    Some(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI: Provider = Provider::named("OpenAI");

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn unauthorized_is_an_auth_error() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-bad.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let error = OPENAI.status_error(401, &headers(&[]), body);
        assert_eq!(error.kind, LlmErrorKind::Auth);
        assert_eq!(error.status, Some(401));
        assert_eq!(
            error.message,
            "OpenAI rejected the request as unauthorized (401)"
        );
        assert_eq!(
            error.body.as_deref(),
            Some(std::str::from_utf8(body).unwrap())
        );
        assert_eq!(error.retry_after_ms, None);
        let forbidden = OPENAI.status_error(403, &headers(&[]), b"");
        assert_eq!(forbidden.kind, LlmErrorKind::Auth);
        assert_eq!(forbidden.body, None);
    }

    #[test]
    fn statuses_map_to_kinds() {
        for (status, kind) in [
            (400, LlmErrorKind::InvalidRequest),
            (402, LlmErrorKind::InvalidRequest),
            (404, LlmErrorKind::InvalidRequest),
            (422, LlmErrorKind::InvalidRequest),
            (408, LlmErrorKind::Timeout),
            (429, LlmErrorKind::RateLimited),
            (500, LlmErrorKind::Unavailable),
            (503, LlmErrorKind::Unavailable),
            (529, LlmErrorKind::Unavailable),
            (418, LlmErrorKind::Other),
        ] {
            let error = OPENAI.status_error(status, &headers(&[]), b"oops");
            assert_eq!((status, error.kind), (status, kind));
            assert_eq!(error.status, Some(status));
            assert_eq!(error.body.as_deref(), Some("oops"));
        }
        let credits = OPENAI.status_error(402, &headers(&[]), b"");
        assert!(credits.message.contains("credits"), "{}", credits.message);
    }

    #[test]
    fn rate_limits_carry_the_delay() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#;
        let error = OPENAI.status_error(429, &headers(&[("Retry-After", "20")]), body);
        assert_eq!(error.kind, LlmErrorKind::RateLimited);
        assert_eq!(error.retry_after_ms, Some(20_000));
        assert_eq!(error.message, "OpenAI is rate limiting requests (429)");

        let precise = headers(&[("retry-after", "20"), ("retry-after-ms", "1500")]);
        assert_eq!(retry_after_ms(&precise), Some(1500));
        assert_eq!(
            retry_after_ms(&headers(&[("retry-after", "0.5")])),
            Some(500)
        );
        let date = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after_ms(&date), None);
        assert_eq!(retry_after_ms(&headers(&[])), None);
    }

    #[test]
    fn server_errors_are_unavailable() {
        let error = OPENAI.status_error(500, &headers(&[]), b"<html>Internal Server Error</html>");
        assert_eq!(error.kind, LlmErrorKind::Unavailable);
        assert_eq!(error.message, "OpenAI is unavailable (500)");
        assert_eq!(
            error.body.as_deref(),
            Some("<html>Internal Server Error</html>")
        );
    }

    #[test]
    fn bodies_are_truncated_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BODY);
        let kept = truncated(long.as_bytes()).unwrap();
        assert_eq!(kept.len(), MAX_ERROR_BODY);
        assert!(kept.chars().all(|c| c == 'é'));
        let odd = format!("x{long}");
        let kept = truncated(odd.as_bytes()).unwrap();
        assert_eq!(kept.len(), MAX_ERROR_BODY - 1);
    }

    #[test]
    fn bad_responses_keep_the_body() {
        let error = OPENAI.bad_response("expected value at line 1 column 1", b"not json");
        assert_eq!(error.kind, LlmErrorKind::BadResponse);
        assert_eq!(error.body.as_deref(), Some("not json"));
    }
}
