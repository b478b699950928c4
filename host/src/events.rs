//! Live task events inside one host: what the scheduler journaled, plus
//! streamed LLM text that is never journaled. Subscribers that fall behind
//! catch up from the store, which holds every journaled event.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::broadcast;

use crate::store::{EventRecord, event_kind, now_millis};

/// How many live events are buffered for slow subscribers.
const CAPACITY: usize = 8192;

#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// An event that is also in the store.
    Journaled(Arc<EventRecord>),
    /// Text an LLM adapter streamed while step `step` ran.
    Delta {
        task_id: Arc<str>,
        step: u32,
        text: String,
    },
}

impl LiveEvent {
    pub fn task_id(&self) -> &str {
        match self {
            Self::Journaled(event) => &event.task_id,
            Self::Delta { task_id, .. } => task_id,
        }
    }

    /// The event in the same shape as a journaled one (deltas have seq 0).
    pub fn to_record(&self) -> EventRecord {
        match self {
            Self::Journaled(event) => (**event).clone(),
            Self::Delta {
                task_id,
                step,
                text,
            } => EventRecord {
                task_id: task_id.to_string(),
                seq: 0,
                kind: event_kind::LLM_DELTA.to_owned(),
                data: json!({"step": step, "text": text}),
                at: now_millis(),
            },
        }
    }
}

#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<LiveEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl EventBus {
    pub fn publish(&self, event: LiveEvent) {
        // No subscribers is the common case, not an error.
        let _ = self.sender.send(event);
    }

    pub fn journaled(&self, event: EventRecord) {
        self.publish(LiveEvent::Journaled(Arc::new(event)));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }
}
