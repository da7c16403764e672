//! Queries on `jobs` and `job_events`: the durable queue. A claim is one
//! `UPDATE ... RETURNING` that takes the oldest queued job (inside `BEGIN IMMEDIATE` on SQLite,
//! with `FOR UPDATE SKIP LOCKED` on PostgreSQL), so two workers never take the same job, and
//! `attempts` counts at claim time, so a job that kills its process is not retried forever.
//!
//! A claim is also a lease: the job names its owner (a replica id) and when the lease expires,
//! and the claim bumps `lease_epoch`. Everything a worker writes afterwards (progress, events,
//! the outcome, the publish) is conditional on that owner and epoch, so once a lease has
//! expired and another worker took the job, the first one can change nothing (fencing).

use serde::Serialize;
use sqlx::{Any, Executor};

use super::{now, now_ms, Backend, Db, Tx};

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobRow {
    pub id: String,
    pub model_id: String,
    pub method: String,
    pub output_name: String,
    pub spec: String,
    pub spec_hash: String,
    pub plan: String,
    pub status: String,
    pub stage: Option<String>,
    pub progress_done: i64,
    pub progress_total: i64,
    pub progress_unit: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub cancel_requested: i64,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub output_model: Option<String>,
    pub report: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    /// The revision of `model_id` the job was planned for (NULL for jobs older than revisions).
    pub model_revision: Option<String>,
    /// The replica whose worker holds the lease (running) or last held it (ended); NULL while
    /// queued.
    pub owner: Option<String>,
    /// Claims so far; a worker's writes name the epoch it claimed with.
    pub lease_epoch: i64,
    /// When the running job's lease ends unless renewed (Unix milliseconds).
    pub lease_expires_ms: Option<i64>,
}

impl JobRow {
    /// The lease this row was claimed with.
    pub fn lease(&self) -> Lease {
        Lease {
            job_id: self.id.clone(),
            owner: self.owner.clone().unwrap_or_default(),
            epoch: self.lease_epoch,
        }
    }
}

/// A worker's right to run one job: what its writes are conditional on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub owner: String,
    pub epoch: i64,
}

/// What a new job row needs; the rest starts at its default.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub model_id: &'a str,
    pub method: &'a str,
    pub output_name: &'a str,
    pub spec: &'a str,
    pub spec_hash: &'a str,
    pub plan: &'a str,
    pub max_attempts: u32,
    pub idempotency_key: Option<&'a str>,
    /// The revision of `model_id` the plan was computed from.
    pub model_revision: &'a str,
}

/// Queues a job, only while its model still has the revision it was planned for (one
/// statement, so a delete or re-upload of the model cannot slip in between; on PostgreSQL the
/// model row is share-locked, so a delete in progress is waited for and then seen). Returns
/// whether the job was inserted.
pub async fn insert(db: &Db, job: &NewJob<'_>) -> Result<bool, sqlx::Error> {
    let t = now();
    let share = db.for_share();
    let inserted = sqlx::query(&format!(
        "INSERT INTO jobs (id, model_id, method, output_name, spec, spec_hash, plan, status, \
         max_attempts, idempotency_key, created_at, updated_at, model_revision) \
         SELECT $1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, $10, $11 \
         WHERE EXISTS (SELECT 1 FROM models WHERE id = $2 AND revision = $11{share})"
    ))
    .bind(job.id)
    .bind(job.model_id)
    .bind(job.method)
    .bind(job.output_name)
    .bind(job.spec)
    .bind(job.spec_hash)
    .bind(job.plan)
    .bind(job.max_attempts as i64)
    .bind(job.idempotency_key)
    .bind(t)
    .bind(job.model_revision)
    .execute(db.pool())
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
}

pub async fn by_idempotency_key(db: &Db, key: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(db.pool())
        .await
}

/// A queued or running job that will write `output_name`, if any.
pub async fn active_for_output(db: &Db, output_name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE output_name = $1 AND status IN ('queued', 'running') LIMIT 1",
    )
    .bind(output_name)
    .fetch_optional(db.pool())
    .await
}

pub struct ListFilter<'a> {
    pub status: Option<&'a str>,
    pub model: Option<&'a str>,
    /// Keyset pagination: jobs created after this job id, in (created_at, id) order.
    pub after: Option<&'a str>,
    pub limit: u32,
}

pub async fn list(db: &Db, f: &ListFilter<'_>) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM jobs WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR model_id = $2) \
         AND ($3 IS NULL OR (created_at, id) > (SELECT created_at, id FROM jobs WHERE id = $3)) \
         ORDER BY created_at, id LIMIT $4",
    )
    .bind(f.status)
    .bind(f.model)
    .bind(f.after)
    .bind(f.limit as i64)
    .fetch_all(db.pool())
    .await
}

/// The newest jobs first (the dashboard's list).
pub async fn recent(db: &Db, limit: u32) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1")
        .bind(limit as i64)
        .fetch_all(db.pool())
        .await
}

/// Takes the oldest queued job for `owner`: marks it running, counts the attempt, starts a
/// lease of `lease_ms` and bumps its epoch, atomically. Workers on other replicas skip the row
/// this one is taking instead of waiting for it.
pub async fn claim(db: &Db, owner: &str, lease_ms: i64) -> Result<Option<JobRow>, sqlx::Error> {
    let skip_locked = db.for_update_skip_locked();
    let mut tx = db.begin_write().await?;
    let t = now_ms();
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = $1, \
         updated_at = $1, stage = 'loading', error = NULL, owner = $2, \
         lease_epoch = lease_epoch + 1, lease_expires_ms = $3 \
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id \
                     LIMIT 1{skip_locked}) \
         RETURNING *"
    ))
    .bind(t / 1000)
    .bind(owner)
    .bind(t + lease_ms)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The PostgreSQL channel a replica notifies when it queued a job.
pub const QUEUED_CHANNEL: &str = "quantd_job_queued";

/// Tells every replica listening on [`QUEUED_CHANNEL`] that a job was queued (PostgreSQL only:
/// a SQLite database has one process, whose workers are woken in memory).
pub async fn notify_queued(db: &Db) -> Result<(), sqlx::Error> {
    if db.backend() == Backend::Postgres {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(QUEUED_CHANNEL)
            .execute(db.pool())
            .await?;
    }
    Ok(())
}

/// Notifications of queued jobs from every replica (PostgreSQL `LISTEN`), on a connection of
/// its own; it reconnects by itself when the connection drops.
pub struct QueuedListener(sqlx::postgres::PgListener);

impl QueuedListener {
    pub async fn connect(database_url: &str) -> Result<Self, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect(database_url).await?;
        listener.listen(QUEUED_CHANNEL).await?;
        Ok(Self(listener))
    }

    /// Waits for the next notification.
    pub async fn next(&mut self) -> Result<(), sqlx::Error> {
        self.0.recv().await.map(|_| ())
    }
}

/// Extends a lease by `lease_ms` from now. False when the lease is gone: it expired and the
/// job was re-queued or taken by another worker, or the job ended.
pub async fn renew(db: &Db, lease: &Lease, lease_ms: i64) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE jobs SET lease_expires_ms = $1 \
         WHERE id = $2 AND owner = $3 AND lease_epoch = $4 AND status = 'running'",
    )
    .bind(now_ms() + lease_ms)
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .execute(db.pool())
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Running jobs whose lease expired (their worker died, froze or lost the database): back to
/// the queue, or failed once they have used up their attempts. Returns (requeued, failed).
/// Safe to run from every replica at once: each row changes once, and only its changer
/// reports it.
pub async fn expire_leases(db: &Db) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    end_running(db, now_ms()).await
}

/// Every job left `running`, whatever its lease: for a process that holds the only claim on
/// its database (SQLite's data directory lock), which at start-up means a previous process
/// died with them. Returns (requeued, failed).
pub async fn recover_stale(db: &Db) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    end_running(db, i64::MAX).await
}

/// Ends every running job whose lease expires before `at_ms` (a job without one counts as
/// expired).
async fn end_running(db: &Db, at_ms: i64) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    const EXPIRED: &str = "status = 'running' AND COALESCE(lease_expires_ms, 0) < $2";
    let t = now();
    let failed: Vec<String> = sqlx::query_scalar(&format!(
        "UPDATE jobs SET status = 'failed', finished_at = $1, updated_at = $1, \
         lease_expires_ms = NULL, \
         error = 'the process running this job died or stopped renewing its lease ' || attempts \
                 || ' times (max_attempts ' || max_attempts || ')' \
         WHERE {EXPIRED} AND attempts >= max_attempts RETURNING id"
    ))
    .bind(t)
    .bind(at_ms)
    .fetch_all(db.pool())
    .await?;
    let requeued: Vec<String> = sqlx::query_scalar(&format!(
        "UPDATE jobs SET status = 'queued', stage = NULL, progress_done = 0, updated_at = $1, \
         owner = NULL, lease_expires_ms = NULL \
         WHERE {EXPIRED} RETURNING id"
    ))
    .bind(t)
    .bind(at_ms)
    .fetch_all(db.pool())
    .await?;
    Ok((requeued, failed))
}

/// The WHERE clause that fences a worker's write: the job is still running under its lease.
const HELD: &str = "id = $1 AND owner = $2 AND lease_epoch = $3 AND status = 'running'";

pub async fn set_progress(
    db: &Db,
    lease: &Lease,
    stage: &str,
    done: u64,
    total: u64,
    unit: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE jobs SET stage = $4, progress_done = $5, progress_total = $6, \
         progress_unit = $7, updated_at = $8 WHERE {HELD}"
    ))
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .bind(stage)
    .bind(done as i64)
    .bind(total as i64)
    .bind(unit)
    .bind(now())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Ends a running job in a terminal state other than success, with its final event, at once.
/// False (nothing written) when the worker no longer holds the lease.
pub async fn finish_unsuccessfully(
    db: &Db,
    lease: &Lease,
    status: &str,
    error: Option<&str>,
    report: Option<&serde_json::Value>,
    event: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let t = now();
    let mut tx = db.begin_write().await?;
    let ended = sqlx::query(&format!(
        "UPDATE jobs SET status = $4, error = $5, report = $6, finished_at = $7, \
         updated_at = $7, lease_expires_ms = NULL WHERE {HELD}"
    ))
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .bind(status)
    .bind(error)
    .bind(report.map(|r| r.to_string()))
    .bind(t)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if ended != 1 {
        return Ok(false);
    }
    add_event_in(&mut tx, &lease.job_id, status, event).await?;
    tx.commit().await?;
    Ok(true)
}

/// Puts a running job back in the queue without counting the attempt (graceful shutdown).
pub async fn requeue_interrupted(db: &Db, lease: &Lease) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE jobs SET status = 'queued', stage = NULL, progress_done = 0, \
         attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, updated_at = $4, \
         owner = NULL, lease_expires_ms = NULL WHERE {HELD}"
    ))
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .bind(now())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// A job's status, its row locked until `tx` ends (the caller changes it by what it read).
async fn locked_status(db: &Db, tx: &mut Tx, id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT status FROM jobs WHERE id = $1{}",
        db.for_update()
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// Cancels a queued job at once; for a running one, records the request (the worker stops at
/// the next tensor). Returns the status the job had, or None when it does not exist.
pub async fn request_cancel(db: &Db, id: &str) -> Result<Option<String>, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let status = locked_status(db, &mut tx, id).await?;
    let t = now();
    match status.as_deref() {
        Some("queued") => {
            sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = $1, updated_at = $1 WHERE id = $2",
            )
            .bind(t)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        Some("running") => {
            sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_at = $1 WHERE id = $2")
                .bind(t)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        _ => {}
    }
    tx.commit().await?;
    Ok(status)
}

/// Failed or cancelled back to queued with a fresh attempt budget. Returns the prior status.
pub async fn retry(db: &Db, id: &str) -> Result<Option<String>, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let status = locked_status(db, &mut tx, id).await?;
    if matches!(status.as_deref(), Some("failed") | Some("cancelled")) {
        sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = 0, cancel_requested = 0, error = NULL, \
             stage = NULL, progress_done = 0, started_at = NULL, finished_at = NULL, \
             updated_at = $1 WHERE id = $2",
        )
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // SSE replays history: this marks where the new run's events begin.
        add_event_in(
            &mut tx,
            id,
            "retried",
            &serde_json::json!({"status": "queued"}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(status)
}

/// (method, status, jobs) over the whole table, for the metrics scrape.
pub async fn counts(db: &Db) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT method, status, COUNT(*) FROM jobs GROUP BY method, status ORDER BY 1, 2",
    )
    .fetch_all(db.pool())
    .await
}

pub async fn cancel_requested(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    Ok(v.unwrap_or(0) != 0)
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub data: String,
    pub created_at: i64,
}

/// Records an event (submit, cancel, retry, recovery: writes that need no lease).
pub async fn add_event(
    db: &Db,
    job_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<i64, sqlx::Error> {
    insert_event(db.pool(), job_id, kind, data).await
}

/// [`add_event`] inside the caller's transaction.
pub async fn add_event_in(
    tx: &mut Tx,
    job_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<i64, sqlx::Error> {
    insert_event(&mut **tx, job_id, kind, data).await
}

async fn insert_event<'e, E: Executor<'e, Database = Any>>(
    exec: E,
    job_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<i64, sqlx::Error> {
    let id = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, kind, data, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(job_id)
    .bind(kind)
    .bind(data.to_string())
    .bind(now())
    .fetch_one(exec)
    .await?;
    Ok(id)
}

/// A job's events with ids above `after`, in order (SSE followers on any replica tail the
/// table with this cursor).
pub async fn events_after(db: &Db, job_id: &str, after: i64) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kind, data, created_at FROM job_events WHERE job_id = $1 AND id > $2 ORDER BY id",
    )
    .bind(job_id)
    .bind(after)
    .fetch_all(db.pool())
    .await
}

pub async fn events(db: &Db, job_id: &str) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kind, data, created_at FROM job_events WHERE job_id = $1 ORDER BY id",
    )
    .bind(job_id)
    .fetch_all(db.pool())
    .await
}

/// Records an event of a running job for its worker, only while that worker holds the lease
/// (one statement: a worker that lost the job adds nothing to its history). Returns whether
/// it was recorded.
pub async fn add_worker_event(
    db: &Db,
    lease: &Lease,
    kind: &str,
    data: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let added = sqlx::query(&format!(
        "INSERT INTO job_events (job_id, kind, data, created_at) \
         SELECT $1, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM jobs WHERE {HELD})"
    ))
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .bind(kind)
    .bind(data.to_string())
    .bind(now())
    .execute(db.pool())
    .await?;
    Ok(added.rows_affected() == 1)
}

/// Marks a job succeeded inside the transaction that also created its output model. Returns
/// false (and changes nothing) when the job was cancelled meanwhile or the worker no longer
/// holds its lease: the caller rolls back.
pub async fn complete(
    tx: &mut Tx,
    lease: &Lease,
    output_model: Option<&str>,
    report: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let t = now();
    let updated = sqlx::query(&format!(
        "UPDATE jobs SET status = 'succeeded', stage = NULL, output_model = $4, report = $5, \
         progress_done = progress_total, finished_at = $6, updated_at = $6, \
         lease_expires_ms = NULL WHERE {HELD} AND cancel_requested = 0"
    ))
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(lease.epoch)
    .bind(output_model)
    .bind(report.to_string())
    .bind(t)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(updated == 1)
}
