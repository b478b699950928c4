//! What a task's plugins reach through the WIT interface `memory`: each
//! call checked against `[memory]`, keyed by its step, site and number, and
//! performed once through the store (`Store::memory_call`), which journals
//! its answer with its effect.

use std::sync::Arc;

use crate::memory::{
    DEFAULT_NAMESPACE, MemoryCalls, MemoryConfig, MemoryFailure, MemoryHandle, MemoryKey, MemoryOp,
    MemoryReply, NewMemory, NewMemoryText, Site,
};
use crate::store::{Fence, MemoryCall, Store, StoreError};

/// One run's memory scope: its tenant and namespace, under its claim.
pub(super) struct RunMemory {
    store: Arc<dyn Store>,
    fence: Fence,
    tenant: String,
    namespace: String,
    config: MemoryConfig,
}

impl RunMemory {
    pub fn new(
        store: Arc<dyn Store>,
        fence: Fence,
        tenant: &str,
        namespace: Option<&str>,
        config: &MemoryConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            fence,
            tenant: tenant.to_owned(),
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            config: config.clone(),
        })
    }

    /// Where the memory calls of `site`, for step `step`, go.
    pub fn for_step(self: &Arc<Self>, step: u32, site: Site) -> MemoryHandle {
        MemoryHandle::new(Arc::new(StepMemory {
            run: self.clone(),
            step,
            site,
        }))
    }
}

struct StepMemory {
    run: Arc<RunMemory>,
    step: u32,
    site: Site,
}

#[async_trait::async_trait]
impl MemoryCalls for StepMemory {
    async fn call(&self, seq: u32, op: MemoryOp) -> Result<MemoryReply, MemoryFailure> {
        let run = &self.run;
        let op = match op {
            MemoryOp::Remember(memory) => {
                let checked = NewMemory {
                    tenant: run.tenant.clone(),
                    namespace: run.namespace.clone(),
                    text: memory.text,
                    metadata: memory.metadata,
                    task_id: None,
                }
                .validated(&run.config)
                .map_err(MemoryFailure::Invalid)?;
                MemoryOp::Remember(NewMemoryText {
                    text: checked.text,
                    metadata: checked.metadata,
                })
            }
            MemoryOp::Recall { terms, limit } => MemoryOp::Recall {
                terms,
                limit: limit.clamp(1, run.config.max_recall.max(1)),
            },
            // No memory has an id that is not a UUID (nor one holding a
            // NUL, which Postgres would refuse to compare).
            MemoryOp::Forget { id } if uuid::Uuid::try_parse(&id).is_err() => {
                return Ok(MemoryReply::Forgot { existed: false });
            }
            forget @ MemoryOp::Forget { .. } => forget,
        };
        let call = MemoryCall {
            key: MemoryKey {
                task_id: run.fence.task_id.clone(),
                step: self.step,
                site: self.site,
                seq,
            },
            tenant: run.tenant.clone(),
            namespace: run.namespace.clone(),
            op,
            config: run.config.clone(),
        };
        run.store
            .memory_call(&run.fence, &call)
            .await
            .map_err(|error| match error {
                StoreError::MemoryFull(message) => MemoryFailure::Full(message),
                other => MemoryFailure::Unavailable(format!("the memory store failed: {other}")),
            })
    }
}
