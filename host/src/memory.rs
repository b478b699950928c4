//! Long-term memory: notes that outlive a task, kept per tenant and per
//! memory namespace, found again by full-text search.
//!
//! Plugins reach it through the WIT interface `memory` (remember, recall,
//! forget) when their manifest asks for it; clients through
//! `/v1/memories`. A plugin's every call is journaled with the step that
//! made it ([`MemoryKey`]): when the step runs again, after a crash or a
//! retry, the same calls in the same order get the first run's answers
//! instead of acting twice. The stores keep the memories, their full-text
//! index (SQLite FTS5; Postgres `tsvector` with a GIN index), the journal,
//! and each tenant's usage against [`MemoryConfig`]'s caps.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::Millis;

/// The namespace of a task that names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;
/// The most words of a query that are searched for; the rest are ignored.
pub const MAX_QUERY_TERMS: usize = 32;

/// `[memory]`: what each tenant may keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// The longest text of one memory, in bytes.
    pub max_text_bytes: usize,
    /// The longest metadata of one memory (a JSON object), in bytes.
    pub max_metadata_bytes: usize,
    /// The most memories a tenant keeps, over all its namespaces.
    pub max_memories_per_tenant: u64,
    /// The most bytes (text and metadata) a tenant keeps.
    pub max_bytes_per_tenant: u64,
    /// The most memories one recall or search answers.
    pub max_recall: u32,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_text_bytes: 16 * 1024,
            max_metadata_bytes: 4 * 1024,
            max_memories_per_tenant: 10_000,
            max_bytes_per_tenant: 64 * 1024 * 1024,
            max_recall: 50,
        }
    }
}

/// Why a namespace is refused, or `None` when it is a good one: 1 to 64
/// bytes of ASCII letters, digits, `-`, `_`, `.` and `:`.
pub fn invalid_namespace(namespace: &str) -> Option<String> {
    let good = !namespace.is_empty()
        && namespace.len() <= MAX_NAMESPACE_BYTES
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    (!good).then(|| {
        format!(
            "a memory namespace is 1 to {MAX_NAMESPACE_BYTES} characters: ASCII letters, \
             digits, '-', '_', '.' and ':'"
        )
    })
}

/// A memory about to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    pub tenant: String,
    pub namespace: String,
    pub text: String,
    /// A JSON object, as text (`{}` for none).
    pub metadata: String,
    /// The task whose plugin stored it; `None` when a client did.
    pub task_id: Option<String>,
}

impl NewMemory {
    /// What it counts against its tenant's byte cap.
    pub fn bytes(&self) -> u64 {
        (self.text.len() + self.metadata.len()) as u64
    }

    /// Checks the text and metadata against `config`'s sizes, and makes
    /// empty metadata `{}`.
    pub fn validated(mut self, config: &MemoryConfig) -> Result<Self, String> {
        if self.text.trim().is_empty() {
            return Err("a memory's text is empty".into());
        }
        if self.text.contains('\0') {
            return Err("a memory's text holds a NUL character".into());
        }
        if self.text.len() > config.max_text_bytes {
            return Err(format!(
                "a memory's text is at most {} bytes; this one is {}",
                config.max_text_bytes,
                self.text.len()
            ));
        }
        if self.metadata.trim().is_empty() {
            self.metadata = "{}".into();
        }
        if self.metadata.len() > config.max_metadata_bytes {
            return Err(format!(
                "a memory's metadata is at most {} bytes; this one is {}",
                config.max_metadata_bytes,
                self.metadata.len()
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&self.metadata) {
            Ok(serde_json::Value::Object(_)) => Ok(self),
            _ => Err("a memory's metadata is a JSON object".into()),
        }
    }
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRecord {
    pub id: String,
    pub namespace: String,
    pub text: String,
    /// A JSON object, as text.
    pub metadata: String,
    pub created_at: Millis,
    pub task_id: Option<String>,
    /// Relevance to the query it was found by (higher is better); 0 when
    /// listed without one.
    pub score: f64,
}

/// Which memories to list or search.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryQuery {
    pub tenant: String,
    /// One namespace, or all of the tenant's.
    pub namespace: Option<String>,
    /// Words to search for; none lists the newest first.
    pub terms: Vec<String>,
    pub limit: u32,
    /// Without terms: only memories stored before this one (an id), for
    /// the next page.
    pub before: Option<String>,
}

/// One step's place in the memory journal: the `seq`th memory call that
/// `site` (the planner deciding step `step`, or the tool running it) made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryKey {
    pub task_id: String,
    pub step: u32,
    pub site: Site,
    pub seq: u32,
}

/// Which plugin call of a step made a memory call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The planner, deciding the step.
    Planner,
    /// The tool the step runs.
    Tool,
}

impl Site {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planner => "planner",
            Self::Tool => "tool",
        }
    }
}

/// A plugin's memory call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MemoryOp {
    Remember(NewMemoryText),
    Recall { terms: Vec<String>, limit: u32 },
    Forget { id: String },
}

/// What `remember` was asked to store (its scope is the call's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMemoryText {
    pub text: String,
    pub metadata: String,
}

impl MemoryOp {
    /// A digest of the call, journaled with its answer: a step that runs
    /// again with a different call in the same place acts anew instead of
    /// being handed an answer to another question. FNV-1a over the call's
    /// JSON: stable across builds, unlike `std`'s hasher.
    pub fn digest(&self) -> i64 {
        let text = serde_json::to_string(self).expect("a memory call is always JSON");
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash as i64
    }
}

/// What a plugin's memory call answered, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum MemoryReply {
    Remembered { id: String },
    Recalled { memories: Vec<MemoryRecord> },
    Forgot { existed: bool },
}

/// Why a plugin's memory call was not performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryFailure {
    /// The text or metadata is unusable.
    Invalid(String),
    /// A cap of the tenant's would be passed.
    Full(String),
    /// The store failed, or the call came outside a task's step.
    Unavailable(String),
}

/// Performs the memory calls of one plugin call: the scheduler's, for a
/// step of a task, over the store. The plugin runtime numbers the calls.
#[async_trait::async_trait]
pub trait MemoryCalls: Send + Sync {
    /// Performs `op`, the `seq`th memory call of this plugin call (from 0).
    async fn call(&self, seq: u32, op: MemoryOp) -> Result<MemoryReply, MemoryFailure>;
}

/// Where a plugin call's memory calls go: nowhere outside a task's step.
#[derive(Clone, Default)]
pub struct MemoryHandle(pub Option<Arc<dyn MemoryCalls>>);

impl MemoryHandle {
    pub fn new(calls: Arc<dyn MemoryCalls>) -> Self {
        Self(Some(calls))
    }
}

impl std::fmt::Debug for MemoryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "MemoryHandle(step)"
        } else {
            "MemoryHandle(none)"
        })
    }
}

/// Handles compare equal: a call's identity is its task and step.
impl PartialEq for MemoryHandle {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for MemoryHandle {}

/// The words of a search query: runs of letters and digits, lowercased,
/// the first [`MAX_QUERY_TERMS`] of them, each at most 64 bytes. Each
/// engine's query is built from these alone, so no query text reaches
/// FTS5's or `to_tsquery`'s syntax.
pub fn search_terms(query: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for word in query.split(|c: char| !c.is_alphanumeric()) {
        if word.is_empty() {
            continue;
        }
        let mut term = word.to_lowercase();
        if term.len() > 64 {
            let mut end = 64;
            while !term.is_char_boundary(end) {
                end -= 1;
            }
            term.truncate(end);
        }
        if !terms.contains(&term) {
            terms.push(term);
        }
        if terms.len() == MAX_QUERY_TERMS {
            break;
        }
    }
    terms
}

/// An FTS5 `MATCH` expression: any of the terms, each quoted.
pub fn fts5_match(terms: &[String]) -> String {
    terms
        .iter()
        .map(|term| format!("\"{term}\""))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// A `to_tsquery` expression: any of the terms.
pub fn tsquery(terms: &[String]) -> String {
    terms.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_becomes_plain_words() {
        assert_eq!(
            search_terms(r#"Ada's "name" OR NEAR(x) * -- café"#),
            ["ada", "s", "name", "or", "near", "x", "café"]
        );
        assert!(search_terms("  ,;'\" ").is_empty());
        let many = (0..100)
            .map(|n| format!("w{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(search_terms(&many).len(), MAX_QUERY_TERMS);
        assert_eq!(search_terms("a A a").len(), 1);
        assert_eq!(
            fts5_match(&search_terms("near OR x")),
            r#""near" OR "or" OR "x""#
        );
        assert_eq!(tsquery(&search_terms("one two")), "one | two");
    }

    #[test]
    fn namespaces_are_short_plain_names() {
        assert_eq!(invalid_namespace("default"), None);
        assert_eq!(invalid_namespace("user:42.notes_v-1"), None);
        assert!(invalid_namespace("").is_some());
        assert!(invalid_namespace("a b").is_some());
        assert!(invalid_namespace(&"x".repeat(65)).is_some());
    }

    #[test]
    fn a_memorys_text_and_metadata_are_checked() {
        let config = MemoryConfig {
            max_text_bytes: 10,
            max_metadata_bytes: 12,
            ..MemoryConfig::default()
        };
        let memory = |text: &str, metadata: &str| NewMemory {
            tenant: "t".into(),
            namespace: "default".into(),
            text: text.into(),
            metadata: metadata.into(),
            task_id: None,
        };
        let ok = memory("hello", "").validated(&config).unwrap();
        assert_eq!(ok.metadata, "{}");
        assert!(memory(" ", "").validated(&config).is_err());
        assert!(memory("a\0b", "").validated(&config).is_err());
        assert!(memory("hello world!", "").validated(&config).is_err());
        assert!(memory("hi", "[1]").validated(&config).is_err());
        assert!(
            memory("hi", r#"{"k": "too long"}"#)
                .validated(&config)
                .is_err()
        );
    }

    #[test]
    fn a_calls_digest_tells_calls_apart() {
        let recall = |query: &str| MemoryOp::Recall {
            terms: search_terms(query),
            limit: 5,
        };
        assert_eq!(recall("a b").digest(), recall("a b").digest());
        assert_ne!(recall("a b").digest(), recall("a c").digest());
    }
}
