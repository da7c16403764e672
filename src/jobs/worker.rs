//! The worker pool: N tasks that claim the oldest queued job, run it, and sleep until woken
//! (a submit) or a poll interval passes (jobs queued by another process). Start-up recovery
//! re-queues jobs a dead process left `running` and sweeps files nothing refers to.

use std::collections::HashSet;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::runner::run_job;
use super::JobSystem;
use crate::db;

/// How often an idle worker looks at the queue without being woken.
const POLL: Duration = Duration::from_secs(2);

/// Re-queues (or fails) jobs left running by a dead process and removes orphan files. Must
/// run before workers start and before the server accepts uploads.
pub async fn recover(js: &JobSystem) -> Result<(), sqlx::Error> {
    let (requeued, failed) = db::jobs::recover_stale(js.db()).await?;
    for id in &requeued {
        info!(job_id = %id, "re-queued a job left running by a previous process");
        db::jobs::add_event(
            js.db(),
            id,
            "log",
            &serde_json::json!({"message": "re-queued after the previous process stopped"}),
        )
        .await?;
    }
    for id in &failed {
        warn!(job_id = %id, "failed a job that used up its attempts");
        db::jobs::add_event(
            js.db(),
            id,
            "failed",
            &serde_json::json!({"status": "failed", "error": "attempts exhausted"}),
        )
        .await?;
    }
    let known: HashSet<String> = db::blobs::all_digests(js.db()).await?.into_iter().collect();
    match js.store().sweep(&known) {
        Ok(0) => {}
        Ok(n) => info!(files = n, "removed leftover temp and orphan blob files"),
        Err(e) => warn!(error = %e, "could not sweep leftover files"),
    }
    Ok(())
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
    let task = tokio::spawn({
        let js = js.clone();
        async move { run_job(&js, job).await }
    });
    if let Err(e) = task.await {
        warn!(job_id = %id, error = %e, "job task panicked");
        let data = serde_json::json!({"status": "failed", "error": "internal error (panic); see the server log"});
        if let Err(e) = db::jobs::finish_unsuccessfully(
            js.db(),
            &id,
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
        match db::jobs::claim(js.db()).await {
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
