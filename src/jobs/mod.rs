//! Durable jobs: submission (validation and plan), the worker pool that claims and leases jobs
//! from the database queue, the runner that executes one job stage by stage, live events for SSE, and
//! cancellation. The queue's truth is the `jobs` table; in-memory state only speeds things up.

pub mod calibrate;
pub mod evaluation;
pub mod events;
mod exports;
mod hooks;
pub mod pipeline;
mod publish;
pub mod runner;
pub mod spec;
mod stage;
pub mod submit;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;
use crate::store::BlobStore;

pub use events::{EventBus, JobEvent};

/// Shared handle to everything jobs need; cheap to clone.
#[derive(Clone)]
pub struct JobSystem {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    replica_id: String,
    store: BlobStore,
    settings: Settings,
    events: EventBus,
    wake: Notify,
    cancel_flags: Mutex<HashMap<String, Arc<AtomicBool>>>,
    pool: Arc<rayon::ThreadPool>,
    shutdown: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
}

impl JobSystem {
    pub fn new(db: Db, store: BlobStore, settings: Settings, shutdown: CancellationToken) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.job_threads())
            .thread_name(|i| format!("quantd-job-{i}"))
            .build()
            .expect("rayon pool builds");
        Self {
            inner: Arc::new(Inner {
                db,
                replica_id: new_replica_id(),
                store,
                settings,
                events: EventBus::new(),
                wake: Notify::new(),
                cancel_flags: Mutex::new(HashMap::new()),
                pool: Arc::new(pool),
                shutdown,
                metrics: Arc::new(crate::metrics::Metrics::new()),
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// This process's name as a job owner (in leases and logs).
    pub fn replica_id(&self) -> &str {
        &self.inner.replica_id
    }

    /// The process's Prometheus metrics (jobs record stages here; HTTP and inference too).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    pub fn pool(&self) -> Arc<rayon::ThreadPool> {
        self.inner.pool.clone()
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Wakes an idle worker (a job was queued): one of this process's, and on PostgreSQL the
    /// workers of every replica too (through `NOTIFY`; see [`worker::spawn_queue_listener`]).
    pub fn wake(&self) {
        self.wake_local();
        if self.db().backend() == crate::db::Backend::Postgres {
            let db = self.db().clone();
            tokio::spawn(async move {
                if let Err(e) = crate::db::jobs::notify_queued(&db).await {
                    tracing::warn!(error = %e, "could not notify the other replicas of a queued job");
                }
            });
        }
    }

    /// Wakes an idle worker of this process only.
    fn wake_local(&self) {
        self.inner.wake.notify_one();
    }

    async fn woken(&self) {
        self.inner.wake.notified().await
    }

    /// The flag a running job polls between tensors.
    fn cancel_flag(&self, job_id: &str) -> Arc<AtomicBool> {
        let mut flags = self.inner.cancel_flags.lock().expect("cancel flags lock");
        flags.entry(job_id.to_string()).or_default().clone()
    }

    fn forget_cancel_flag(&self, job_id: &str) {
        self.inner
            .cancel_flags
            .lock()
            .expect("cancel flags lock")
            .remove(job_id);
    }

    /// Signals a running job in this process to stop at its next tensor boundary.
    pub fn signal_cancel(&self, job_id: &str) {
        if let Some(flag) = self
            .inner
            .cancel_flags
            .lock()
            .expect("cancel flags lock")
            .get(job_id)
        {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// `host-pid-random`: tells replicas apart in leases and logs, and never repeats, so a restarted
/// process cannot mistake a lease of its predecessor for its own.
fn new_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "quantd".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}
