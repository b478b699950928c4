//! Live task events inside one host: what the scheduler journaled,
//! streamed LLM text included (`llm.delta`, coalesced and capped per step,
//! see [`EventsConfig`]). Subscribers that fall behind, reconnect or come
//! after a restart catch up from the store, which holds every one.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::EventRecord;

/// How many live events are buffered for slow subscribers.
const CAPACITY: usize = 8192;

/// `[events]`: how streamed LLM text is journaled. Text a provider streams
/// is gathered for `delta_interval` (or until 4 KiB) and journaled as one
/// `llm.delta` event, so a subscriber that reconnects (`Last-Event-ID`), or
/// comes after a restart, gets it again with the same ids; past
/// `delta_bytes_per_step` of a step's text, the rest is in the step's reply
/// only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// The most streamed text journaled per LLM step (each try of it).
    pub delta_bytes_per_step: usize,
    /// How long streamed text is gathered before it is journaled.
    #[serde(with = "humantime_serde")]
    pub delta_interval: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            delta_bytes_per_step: 64 * 1024,
            delta_interval: Duration::from_millis(50),
        }
    }
}

/// An event as this host's subscribers get it: journaled first.
pub type LiveEvent = Arc<EventRecord>;

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
    /// Tells this host's subscribers of an event the store now holds.
    pub fn journaled(&self, event: EventRecord) {
        // No subscribers is the common case, not an error.
        let _ = self.sender.send(Arc::new(event));
    }

    /// Whether anyone is subscribed: what is built only for subscribers
    /// (a step's input in its `step.started` event) can be skipped when not.
    /// One who subscribes later reads the store first, which has the event.
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }
}
