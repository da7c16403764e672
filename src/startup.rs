//! Building and running the server: data directory (and its lock, on SQLite), database, blob
//! store, start-up recovery, the auth rule for non-loopback binds, the worker pool and lease
//! reaper as the role asks, and graceful shutdown driven by one cancellation token. Tests build
//! an `Application` on port 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::http::{router, AppState, Keys};
use crate::jobs::{worker, JobSystem};
use crate::store::BlobStore;

pub struct Application {
    /// Held for the process's life on SQLite: one process per data directory.
    _data_dir_lock: Option<DataDirLock>,
    listener: TcpListener,
    state: AppState,
    workers: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Application {
    /// Prepares everything and binds, but serves nothing until [`run_until_stopped`].
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let addr = settings.bind_addr();
        if !addr.ip().is_loopback()
            && !settings.has_keys()
            && !settings.server.allow_unauthenticated
        {
            anyhow::bail!(
                "refusing to listen on {addr} without API keys: set auth.admin_keys (QUANTD_AUTH__ADMIN_KEYS) \
                 or pass --allow-unauthenticated"
            );
        }
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data_dir {}", settings.data_dir.display()))?;
        let data_dir_lock = if settings.database_url.is_empty() {
            Some(DataDirLock::acquire(&settings.data_dir)?)
        } else {
            None
        };
        let store = open_store(&settings)?;
        let db = crate::db::connect(&settings.database_url, &settings.data_dir)
            .await
            .context("opening the database")?;
        let shutdown = CancellationToken::new();
        let jobs = JobSystem::new(db, store, settings.clone(), shutdown.clone());
        worker::recover(&jobs).await.context("recovering jobs")?;
        worker::spawn_lease_reaper(&jobs);
        let worker_count = if settings.role.runs_jobs() {
            settings.worker_count()
        } else {
            0
        };
        let workers = worker::spawn_workers(&jobs, worker_count);
        if worker_count > 0 && !settings.database_url.is_empty() {
            worker::spawn_queue_listener(&jobs, &settings.database_url);
        }
        info!(role = ?settings.role, replica = %jobs.replica_id(), workers = worker_count,
              database = ?jobs.db().backend(), "replica started");
        let keys = Arc::new(Keys::new(
            &settings.auth.admin_keys,
            &settings.auth.infer_keys,
        ));
        let state = AppState {
            engine: crate::engine::Engine::new(settings.engine.clone()),
            jobs,
            keys,
            ready: Arc::new(AtomicBool::new(false)),
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        state.ready.store(true, Ordering::SeqCst);
        Ok(Self {
            _data_dir_lock: data_dir_lock,
            listener,
            state,
            workers,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Cancel this to stop the server (tests; signals in `serve`).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token fires, then gives running jobs the grace period to
    /// reach a tensor boundary (they go back to the queue) before returning.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.state.settings().server.shutdown_grace_secs);
        info!(addr = %self.local_addr(), "quantd listening");
        let token = self.shutdown.clone();
        let app = router(self.state.clone());
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .context("serving HTTP")?;
        self.state.ready.store(false, Ordering::SeqCst);
        let drained = tokio::time::timeout(grace, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("workers did not stop within the grace period; their jobs are re-queued at next start");
        }
        info!("quantd stopped");
        Ok(())
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        info!("shutdown signal received");
        token.cancel();
    });
}

/// The blob store `storage_url` names: `data_dir` itself, or an object store with its local
/// cache in `cache_dir` (or `data_dir`).
fn open_store(settings: &Settings) -> anyhow::Result<BlobStore> {
    if settings.storage_url.is_empty() {
        return BlobStore::open(&settings.data_dir).context("opening the blob store");
    }
    let cache = if settings.cache_dir.as_os_str().is_empty() {
        &settings.data_dir
    } else {
        &settings.cache_dir
    };
    let remote = crate::store::RemoteStore::open(&settings.storage_url)
        .with_context(|| format!("storage_url {}", settings.storage_url))?;
    Ok(BlobStore::open(cache)
        .with_context(|| format!("opening the cache in {}", cache.display()))?
        .with_remote(remote, settings.cache_max_bytes))
}

/// An exclusive lock on `data_dir/quantd.lock`, released when the process exits (however it
/// exits: the kernel drops the lock with the file descriptor). SQLite and the local blob store
/// serve one process: a second one would re-queue the first one's running jobs at start-up and
/// sweep its files.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = data_dir.join("quantd.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            anyhow::bail!(
                "data directory {} is in use by another quantd process{holder}: {} is locked ({e}). \
                 One SQLite data directory serves one process; stop the other one, choose another \
                 data_dir, or set database_url to a PostgreSQL database to run several replicas",
                data_dir.display(),
                path.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(Self { _file: file })
    }
}
