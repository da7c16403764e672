//! Live job events for SSE subscribers. Durable events (stage changes, metrics, the final
//! outcome) are also written to `job_events`; progress ticks are only broadcast.

use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub job_id: String,
    /// progress | stage | metric | log | done | failed | cancelled
    pub kind: &'static str,
    pub data: serde_json::Value,
}

impl JobEvent {
    /// Whether the stream ends after this event.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, "done" | "failed" | "cancelled")
    }
}

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<JobEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self { tx }
    }

    pub fn publish(&self, event: JobEvent) {
        // No subscribers is fine: events are also in the database.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.tx.subscribe()
    }
}
