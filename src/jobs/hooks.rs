//! What a job's blocking work reports back: progress goes to the event bus at once and to the
//! database at most every `progress_interval_ms`; cancellation is a flag the work polls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::warn;

use super::pipeline::Hooks;
use super::{JobEvent, JobSystem};
use crate::db;

/// Bridges the blocking pipeline to the async world: progress goes to the event bus at once
/// and to the database at most every `interval`.
pub(super) struct JobHooks {
    js: JobSystem,
    lease: db::jobs::Lease,
    cancel: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
    last_write: Mutex<Option<Instant>>,
    interval: Duration,
}

impl JobHooks {
    /// Hooks for the job `lease` runs; call from within the runtime.
    pub(super) fn new(js: &JobSystem, lease: &db::jobs::Lease, cancel: Arc<AtomicBool>) -> Self {
        Self {
            js: js.clone(),
            lease: lease.clone(),
            cancel,
            runtime: tokio::runtime::Handle::current(),
            last_write: Mutex::new(None),
            interval: Duration::from_millis(js.settings().jobs.progress_interval_ms),
        }
    }
}

impl Hooks for JobHooks {
    fn progress(&self, stage: &'static str, done: u64, total: u64, unit: &'static str) {
        self.js.events().publish(JobEvent {
            job_id: self.lease.job_id.clone(),
            kind: "progress",
            data: json!({"stage": stage, "done": done, "total": total, "unit": unit}),
        });
        let mut last = self.last_write.lock().expect("progress lock");
        let due = last.is_none_or(|t| t.elapsed() >= self.interval) || done == total;
        if due {
            *last = Some(Instant::now());
            let (db, lease) = (self.js.db().clone(), self.lease.clone());
            self.runtime.spawn(async move {
                if let Err(e) = db::jobs::set_progress(&db, &lease, stage, done, total, unit).await
                {
                    warn!(job_id = %lease.job_id, error = %e, "could not record progress");
                }
            });
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}
