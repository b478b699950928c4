//! Bearer tokens, tenants and per-token rate limits.
//!
//! Tokens are configured by their SHA-256 only (`opspawn token new` makes
//! one), so the configuration never holds a usable secret. When no tokens are
//! configured, authentication is off and every request acts for the tenant
//! `default`; that is meant for local use.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::errors::Code;

/// The tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

pub const DEFAULT_TENANT: &str = "default";

/// Who made a request, for the record (an approval's `decided_by`): the
/// token's `name`, or `tenant:<tenant>` for a token with none, or
/// `anonymous` when tokens are off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
    /// Requests per minute per token; unlimited if unset.
    pub requests_per_minute: Option<u32>,
    /// Queued plus running tasks per tenant; unlimited if unset.
    pub max_active_tasks: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub tenant: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// A label for logs, such as "ci".
    #[serde(default)]
    pub name: Option<String>,
}

/// Hex SHA-256 of a token, as configured.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: 256 bits from the operating system, hex-encoded.
pub fn new_token() -> String {
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    format!("ops_{}", hex::encode(bytes))
}

/// Checks tokens and rate limits; cheap when authentication is off.
pub struct Gate {
    config: AuthConfig,
    tenants_by_hash: HashMap<String, String>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Gate {
    pub fn new(config: AuthConfig) -> Self {
        let tenants_by_hash = config
            .tokens
            .iter()
            .map(|t| (t.sha256.to_ascii_lowercase(), t.tenant.clone()))
            .collect();
        Self {
            config,
            tenants_by_hash,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.config.tokens.is_empty()
    }

    pub fn max_active_tasks(&self) -> Option<u64> {
        self.config.max_active_tasks
    }

    fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<(Tenant, String), ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::new(
                Code::Unauthorized,
                "this server requires a token: send `Authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(bearer_token)
            .unwrap_or_default();
        let hash = token_hash(token);
        match self.tenants_by_hash.get(&hash) {
            Some(tenant) => Ok((Tenant(tenant.clone()), hash)),
            None => Err(ApiError::new(
                Code::InvalidToken,
                "the token is not valid for this server",
            )),
        }
    }

    /// Who holds the token with hash `key` ([`Principal`]).
    fn principal(&self, key: &str, tenant: &Tenant) -> Principal {
        let name = self
            .config
            .tokens
            .iter()
            .find(|t| t.sha256.eq_ignore_ascii_case(key))
            .and_then(|t| t.name.clone());
        Principal(name.unwrap_or_else(|| format!("tenant:{}", tenant.0)))
    }

    /// Takes one request from the token's bucket; the wait if it is empty.
    fn take(&self, key: &str) -> Result<(), f64> {
        let Some(per_minute) = self.config.requests_per_minute else {
            return Ok(());
        };
        let capacity = f64::from(per_minute.max(1));
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("bucket lock");
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            refilled: Instant::now(),
        });
        let now = Instant::now();
        let earned = now.duration_since(bucket.refilled).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + earned).min(capacity);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - bucket.tokens) / per_second)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 section 2.1), so `bearer` is `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Middleware: resolves the tenant (401 without a valid token when tokens
/// are configured) and applies the per-token rate limit (429).
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let gate = &state.gate;
    let (tenant, key, principal) = if gate.enabled() {
        match gate.authenticate(request.headers().get(header::AUTHORIZATION)) {
            Ok((tenant, key)) => {
                let principal = gate.principal(&key, &tenant);
                (tenant, key, principal)
            }
            Err(error) => return error.into_response(),
        }
    } else {
        (
            Tenant(DEFAULT_TENANT.to_owned()),
            DEFAULT_TENANT.to_owned(),
            Principal("anonymous".to_owned()),
        )
    };
    if let Err(wait) = gate.take(&key) {
        let seconds = wait.ceil().max(1.0) as u64;
        let mut response = ApiError::new(
            Code::RateLimited,
            format!("too many requests for this token; retry in {seconds} s"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return response;
    }
    request.extensions_mut().insert(tenant);
    request.extensions_mut().insert(principal);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(per_minute: Option<u32>) -> Gate {
        Gate::new(AuthConfig {
            tokens: vec![TokenConfig {
                tenant: "acme".into(),
                sha256: token_hash("secret"),
                name: None,
            }],
            requests_per_minute: per_minute,
            max_active_tasks: None,
        })
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let gate = gate(None);
        let good = HeaderValue::from_static("Bearer secret");
        assert_eq!(
            gate.authenticate(Some(&good)).unwrap().0,
            Tenant("acme".into())
        );
        let bad = HeaderValue::from_static("Bearer guess");
        assert_eq!(
            gate.authenticate(Some(&bad)).unwrap_err().code,
            Code::InvalidToken
        );
        assert_eq!(
            gate.authenticate(None).unwrap_err().code,
            Code::Unauthorized
        );
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let value = HeaderValue::from_str(&format!("{scheme} secret")).unwrap();
            assert_eq!(
                gate.authenticate(Some(&value)).unwrap().0,
                Tenant("acme".into()),
                "the scheme {scheme:?} is Bearer in another case"
            );
        }
        for wrong in ["Basic secret", "Bearersecret", "secret"] {
            let value = HeaderValue::from_static(wrong);
            assert_eq!(
                gate.authenticate(Some(&value)).unwrap_err().code,
                Code::InvalidToken,
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn the_bucket_empties_and_says_how_long_to_wait() {
        let gate = gate(Some(3));
        for _ in 0..3 {
            assert!(gate.take("k").is_ok());
        }
        let wait = gate.take("k").unwrap_err();
        assert!(wait > 0.0 && wait <= 20.0, "{wait}");
        assert!(gate.take("other").is_ok(), "buckets are per token");
    }

    #[test]
    fn new_tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
    }
}
