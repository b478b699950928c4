//! The host side of the WIT interface `memory`: a plugin's calls, checked
//! against its grant, numbered, and handed to the step's [`MemoryHandle`]
//! (the scheduler's, which journals each one). The runtime itself keeps
//! nothing: a call outside a task's step has no memory to reach.

use super::bindings::v0_2::memory::{Host, MemoryError, MemoryErrorKind, Recalled};
use super::state::CallState;
use crate::memory::{MemoryFailure, MemoryOp, MemoryReply, NewMemoryText, search_terms};
use crate::rfc3339;

impl CallState {
    /// Performs one memory call of this plugin call, if it may make it.
    async fn memory_call(&mut self, op: MemoryOp) -> Result<MemoryReply, MemoryError> {
        if !self.memory_granted {
            return Err(MemoryError {
                kind: MemoryErrorKind::NotGranted,
                message: "this plugin may not use memory: its manifest must ask for it \
                          ([capabilities] memory = true), and the operator's [policy] must \
                          not refuse it"
                    .into(),
            });
        }
        let Some(calls) = self.memory.0.clone() else {
            return Err(MemoryError {
                kind: MemoryErrorKind::Unavailable,
                message: "memory is reachable only while a task's step runs".into(),
            });
        };
        let seq = self.memory_calls;
        self.memory_calls += 1;
        calls.call(seq, op).await.map_err(|failure| match failure {
            MemoryFailure::Invalid(message) => MemoryError {
                kind: MemoryErrorKind::Invalid,
                message,
            },
            MemoryFailure::Full(message) => MemoryError {
                kind: MemoryErrorKind::Full,
                message,
            },
            MemoryFailure::Unavailable(message) => MemoryError {
                kind: MemoryErrorKind::Unavailable,
                message,
            },
        })
    }
}

fn unexpected(reply: MemoryReply) -> MemoryError {
    MemoryError {
        kind: MemoryErrorKind::Unavailable,
        message: format!("the store answered a different call: {reply:?}"),
    }
}

impl Host for CallState {
    async fn remember(&mut self, text: String, metadata: String) -> Result<String, MemoryError> {
        match self
            .memory_call(MemoryOp::Remember(NewMemoryText { text, metadata }))
            .await?
        {
            MemoryReply::Remembered { id } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    async fn recall(&mut self, query: String, limit: u32) -> Result<Vec<Recalled>, MemoryError> {
        let op = MemoryOp::Recall {
            terms: search_terms(&query),
            limit,
        };
        match self.memory_call(op).await? {
            MemoryReply::Recalled { memories } => Ok(memories
                .into_iter()
                .map(|memory| Recalled {
                    id: memory.id,
                    text: memory.text,
                    metadata: memory.metadata,
                    created_at: rfc3339::format(memory.created_at),
                    score: memory.score,
                })
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    async fn forget(&mut self, id: String) -> Result<bool, MemoryError> {
        match self.memory_call(MemoryOp::Forget { id }).await? {
            MemoryReply::Forgot { existed } => Ok(existed),
            other => Err(unexpected(other)),
        }
    }
}
