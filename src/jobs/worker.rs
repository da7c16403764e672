//! The worker pool: N tasks that claim the oldest queued job (taking its lease), run it, and
//! sleep until woken (a submit) or a poll interval passes (jobs queued by another replica).
//! The lease reaper re-queues jobs whose lease expired, whichever replica ran them. Start-up
//! recovery on SQLite re-queues every job a dead process left `running` at once (the data
//! directory lock says no other process can be running them) and sweeps files nothing refers
//! to.

use std::collections::HashSet;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::runner::run_job;
use super::JobSystem;
use crate::db::{self, Backend};

/// How often an idle worker looks at the queue without being woken.
const POLL: Duration = Duration::from_secs(2);

/// Start-up recovery: on SQLite, re-queues (or fails) every job a previous process left
/// running and removes orphan files; on PostgreSQL, only jobs whose lease has expired (the
/// others belong to live replicas) and orphans old enough that no replica can still be
/// committing them. Must run before workers start and before the server accepts uploads.
pub async fn recover(js: &JobSystem) -> Result<(), sqlx::Error> {
    let exclusive = js.db().backend() == Backend::Sqlite;
    let ended = if exclusive {
        db::jobs::recover_stale(js.db()).await?
    } else {
        db::jobs::expire_leases(js.db()).await?
    };
    record_ended(js, ended).await?;
    let known: HashSet<String> = db::blobs::all_digests(js.db()).await?.into_iter().collect();
    let min_age = if exclusive {
        Duration::ZERO
    } else {
        SHARED_SWEEP_MIN_AGE
    };
    match js.store().sweep(&known, min_age) {
        Ok(0) => {}
        Ok(n) => info!(files = n, "removed leftover temp and orphan blob files"),
        Err(e) => warn!(error = %e, "could not sweep leftover files"),
    }
    Ok(())
}

/// Files in a store shared by replicas are left alone this long: younger temp files may be a
/// running job's output, younger orphan blobs a commit whose row is on its way.
const SHARED_SWEEP_MIN_AGE: Duration = Duration::from_secs(24 * 3600);

/// Events for jobs whose lease ended without their worker: re-queued or failed.
async fn record_ended(
    js: &JobSystem,
    (requeued, failed): (Vec<String>, Vec<String>),
) -> Result<(), sqlx::Error> {
    for id in &requeued {
        info!(job_id = %id, "re-queued a job whose worker stopped (process died or lease expired)");
        db::jobs::add_event(
            js.db(),
            id,
            "log",
            &serde_json::json!({"message": "re-queued: the worker running it stopped (its process died or its lease expired)"}),
        )
        .await?;
    }
    for id in &failed {
        warn!(job_id = %id, "failed a job that used up its attempts");
        let data = serde_json::json!({"status": "failed", "error": "attempts exhausted"});
        db::jobs::add_event(js.db(), id, "failed", &data).await?;
        js.events().publish(super::JobEvent {
            job_id: id.clone(),
            kind: "failed",
            data,
        });
    }
    if !requeued.is_empty() {
        js.wake();
    }
    Ok(())
}

/// Re-queues jobs whose lease expired, every half lease, until shutdown. Every replica runs
/// one (API replicas too), so a dead worker's job comes back even when no worker is idle.
pub fn spawn_lease_reaper(js: &JobSystem) -> tokio::task::JoinHandle<()> {
    let js = js.clone();
    let every = Duration::from_millis((js.settings().lease_ms() / 2).clamp(250, 10_000) as u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = js.shutdown_token().cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let ended = match db::jobs::expire_leases(js.db()).await {
                Ok(ended) => ended,
                Err(e) => {
                    warn!(error = %e, "could not look for expired leases");
                    continue;
                }
            };
            if let Err(e) = record_ended(&js, ended).await {
                warn!(error = %e, "could not record re-queued jobs");
            }
        }
    })
}

/// Wakes this process's idle workers whenever any replica queues a job (PostgreSQL's
/// `LISTEN`), so a job waits for no poll interval. The listener reconnects by itself; the poll
/// still catches what a reconnect missed.
pub fn spawn_queue_listener(js: &JobSystem, database_url: &str) {
    let (js, url) = (js.clone(), database_url.to_string());
    tokio::spawn(async move {
        let mut listener = loop {
            match db::jobs::QueuedListener::connect(&url).await {
                Ok(l) => break l,
                Err(e) => warn!(error = %e, "could not listen for queued jobs"),
            }
            tokio::select! {
                _ = js.shutdown_token().cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        };
        loop {
            tokio::select! {
                _ = js.shutdown_token().cancelled() => return,
                received = listener.next() => match received {
                    Ok(_) => js.wake_local(),
                    Err(e) => {
                        warn!(error = %e, "listening for queued jobs");
                        tokio::time::sleep(POLL).await;
                    }
                },
            }
        }
    });
}

/// Starts `count` workers; they stop claiming when the shutdown token fires and finish (or
/// re-queue) what they run.
pub fn spawn_workers(js: &JobSystem, count: usize) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for n in 0..count {
        let js = js.clone();
        set.spawn(async move { worker_loop(js, n).await });
    }
    set
}

/// Runs a job on its own task so that a panic fails that job instead of killing the worker
/// and leaving the job `running` until the next restart.
async fn run_isolated(js: &JobSystem, job: crate::db::jobs::JobRow) {
    let id = job.id.clone();
    let lease = job.lease();
    let task = tokio::spawn({
        let js = js.clone();
        async move { run_job(&js, job).await }
    });
    if let Err(e) = task.await {
        warn!(job_id = %id, error = %e, "job task panicked");
        let data = serde_json::json!({"status": "failed", "error": "internal error (panic); see the server log"});
        if let Err(e) = db::jobs::finish_unsuccessfully(
            js.db(),
            &lease,
            "failed",
            Some("internal error (panic); see the server log"),
            None,
            &data,
        )
        .await
        {
            warn!(job_id = %id, error = %e, "could not record the panicked job");
        }
        js.events().publish(super::JobEvent {
            job_id: id,
            kind: "failed",
            data,
        });
    }
}

async fn worker_loop(js: JobSystem, n: usize) {
    info!(worker = n, "job worker started");
    while !js.shutdown_token().is_cancelled() {
        match db::jobs::claim(js.db(), js.replica_id(), js.settings().lease_ms()).await {
            Ok(Some(job)) => run_isolated(&js, job).await,
            Ok(None) => {
                tokio::select! {
                    _ = js.woken() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = js.shutdown_token().cancelled() => {}
                }
            }
            Err(e) => {
                warn!(worker = n, error = %e, "could not claim a job");
                tokio::time::sleep(POLL).await;
            }
        }
    }
    info!(worker = n, "job worker stopped");
}
