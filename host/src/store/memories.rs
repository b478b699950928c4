//! What the store keeps of long-term memory (docs/architecture.md,
//! "Long-term memory"): the memories, each tenant's usage against its caps,
//! and the journal of plugins' memory calls. The statements both engines
//! run are written once, with `$n` parameters (SQLite reads them as `?n`,
//! see [`super::approvals::sqlite`]); the searches differ, FTS5 against
//! `tsvector`, and live with each engine.

use crate::memory::{MemoryConfig, MemoryKey, MemoryOp, MemoryRecord, MemoryReply, NewMemory};

use super::{Result, StoreError};

/// A plugin's memory call, in the scope of the task that made it.
#[derive(Debug, Clone)]
pub struct MemoryCall {
    pub key: MemoryKey,
    pub tenant: String,
    pub namespace: String,
    pub op: MemoryOp,
    pub config: MemoryConfig,
}

impl MemoryCall {
    /// The memory `remember` stores.
    pub fn new_memory(&self) -> Option<NewMemory> {
        match &self.op {
            MemoryOp::Remember(memory) => Some(NewMemory {
                tenant: self.tenant.clone(),
                namespace: self.namespace.clone(),
                text: memory.text.clone(),
                metadata: memory.metadata.clone(),
                task_id: Some(self.key.task_id.clone()),
            }),
            _ => None,
        }
    }
}

/// The columns every read of a memory selects, `score` last.
pub const COLUMNS: &str = "id, namespace, text, metadata, created_at, task_id";

/// `$1` tenant: what it keeps now.
pub const USAGE: &str = "SELECT memories, bytes FROM memory_usage WHERE tenant = $1";

/// `$1` tenant, `$2` bytes: one memory more.
pub const COUNT_IN: &str = "INSERT INTO memory_usage (tenant, memories, bytes) VALUES ($1, 1, $2)
    ON CONFLICT (tenant) DO UPDATE
       SET memories = memory_usage.memories + 1, bytes = memory_usage.bytes + $2";

/// `$1` tenant, `$2` bytes: one memory fewer.
pub const COUNT_OUT: &str = "UPDATE memory_usage
    SET memories = memories - 1, bytes = bytes - $2 WHERE tenant = $1";

/// `$1` id, `$2` tenant, `$3` namespace, `$4` text, `$5` metadata,
/// `$6` bytes, `$7` task id, `$8` created at.
pub const INSERT: &str = "INSERT INTO memories
    (id, tenant, namespace, text, metadata, bytes, task_id, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// `$1` id, `$2` tenant, `$3` namespace or NULL for any: the bytes it held.
pub const DELETE: &str = "DELETE FROM memories
    WHERE id = $1 AND tenant = $2 AND ($3 IS NULL OR namespace = $3)
    RETURNING bytes";

/// `$1` task, `$2` step, `$3` site, `$4` seq: a journaled call's digest
/// and answer.
pub const JOURNALED: &str = "SELECT digest, reply FROM memory_journal
    WHERE task_id = $1 AND step = $2 AND site = $3 AND seq = $4";

/// `$1` task, `$2` step, `$3` site, `$4` seq, `$5` digest, `$6` reply: a
/// call's answer, in place of any other call journaled there before.
pub const JOURNAL: &str = "INSERT INTO memory_journal (task_id, step, site, seq, digest, reply)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (task_id, step, site, seq) DO UPDATE
       SET digest = excluded.digest, reply = excluded.reply";

/// Refuses a memory that would take its tenant past a cap; `usage` is what
/// the tenant keeps now (memories, bytes).
pub fn check_room(usage: (i64, i64), memory: &NewMemory, config: &MemoryConfig) -> Result<()> {
    let (memories, bytes) = usage;
    if memories as u64 >= config.max_memories_per_tenant {
        return Err(StoreError::MemoryFull(format!(
            "the tenant keeps {memories} memories, the most it may ({}); forget some first",
            config.max_memories_per_tenant
        )));
    }
    if bytes as u64 + memory.bytes() > config.max_bytes_per_tenant {
        return Err(StoreError::MemoryFull(format!(
            "the tenant's memories hold {bytes} bytes; {} more would pass its cap of {}; \
             forget some first",
            memory.bytes(),
            config.max_bytes_per_tenant
        )));
    }
    Ok(())
}

/// A journaled answer, if the call journaled under the same key is this
/// one.
pub fn replay(journaled: Option<(i64, String)>, op: &MemoryOp) -> Result<Option<MemoryReply>> {
    match journaled {
        Some((digest, reply)) if digest == op.digest() => {
            let reply = serde_json::from_str(&reply).map_err(|source| StoreError::Corrupt {
                what: "memory journal reply",
                source,
            })?;
            Ok(Some(reply))
        }
        _ => Ok(None),
    }
}

/// The columns of a memory row, as either engine reads them.
pub struct MemoryColumns {
    pub id: String,
    pub namespace: String,
    pub text: String,
    pub metadata: String,
    pub created_at: i64,
    pub task_id: Option<String>,
    pub score: f64,
}

impl From<MemoryColumns> for MemoryRecord {
    fn from(row: MemoryColumns) -> Self {
        MemoryRecord {
            id: row.id,
            namespace: row.namespace,
            text: row.text,
            metadata: row.metadata,
            created_at: row.created_at,
            task_id: row.task_id,
            score: row.score,
        }
    }
}

/// A memory just stored, as reads would give it.
pub fn stored(id: String, memory: NewMemory, created_at: i64) -> MemoryRecord {
    MemoryRecord {
        id,
        namespace: memory.namespace,
        text: memory.text,
        metadata: memory.metadata,
        created_at,
        task_id: memory.task_id,
        score: 0.0,
    }
}
