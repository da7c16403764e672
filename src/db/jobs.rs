//! Queries on `jobs` and `job_events`: the durable queue. A claim is one
//! `UPDATE ... RETURNING` inside `BEGIN IMMEDIATE`, so two workers (or two processes) never
//! take the same job, and `attempts` counts at claim time, so a job that kills its process is
//! not retried forever.

use serde::Serialize;

use super::{now, Db};

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
/// statement, so a delete or re-upload of the model cannot slip in between). Returns whether
/// the job was inserted.
pub async fn insert(db: &Db, job: &NewJob<'_>) -> Result<bool, sqlx::Error> {
    let t = now();
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, model_id, method, output_name, spec, spec_hash, plan, status, \
         max_attempts, idempotency_key, created_at, updated_at, model_revision) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?10, ?10, ?11 \
         WHERE EXISTS (SELECT 1 FROM models WHERE id = ?2 AND revision = ?11)",
    )
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
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn by_idempotency_key(db: &Db, key: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = ?")
        .bind(key)
        .fetch_optional(db)
        .await
}

/// A queued or running job that will write `output_name`, if any.
pub async fn active_for_output(db: &Db, output_name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE output_name = ? AND status IN ('queued', 'running') LIMIT 1",
    )
    .bind(output_name)
    .fetch_optional(db)
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
        "SELECT * FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR model_id = ?2) \
         AND (?3 IS NULL OR (created_at, id) > (SELECT created_at, id FROM jobs WHERE id = ?3)) \
         ORDER BY created_at, id LIMIT ?4",
    )
    .bind(f.status)
    .bind(f.model)
    .bind(f.after)
    .bind(f.limit as i64)
    .fetch_all(db)
    .await
}

/// The newest jobs first (the dashboard's list).
pub async fn recent(db: &Db, limit: u32) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?")
        .bind(limit as i64)
        .fetch_all(db)
        .await
}

/// Takes the oldest queued job, marks it running and counts the attempt, atomically.
pub async fn claim(db: &Db) -> Result<Option<JobRow>, sqlx::Error> {
    let mut conn = db.acquire().await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let t = now();
    let claimed: Result<Option<JobRow>, sqlx::Error> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?1, \
         updated_at = ?1, stage = 'loading', error = NULL \
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1) \
         RETURNING *",
    )
    .bind(t)
    .fetch_optional(&mut *conn)
    .await;
    match claimed {
        Ok(row) => match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(row),
            Err(e) => {
                // Never hand a connection that still holds the write lock back to the pool.
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                Err(e)
            }
        },
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Err(e)
        }
    }
}

/// Jobs left `running` by a process that died: back to the queue, or failed once they have
/// used up their attempts. Returns (requeued, failed) ids.
pub async fn recover_stale(db: &Db) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let t = now();
    let failed: Vec<String> = sqlx::query_scalar(
        "UPDATE jobs SET status = 'failed', finished_at = ?1, updated_at = ?1, \
         error = 'the process running this job died ' || attempts || ' times (max_attempts ' || max_attempts || ')' \
         WHERE status = 'running' AND attempts >= max_attempts RETURNING id",
    )
    .bind(t)
    .fetch_all(db)
    .await?;
    let requeued: Vec<String> = sqlx::query_scalar(
        "UPDATE jobs SET status = 'queued', stage = NULL, progress_done = 0, updated_at = ?1 \
         WHERE status = 'running' RETURNING id",
    )
    .bind(t)
    .fetch_all(db)
    .await?;
    Ok((requeued, failed))
}

pub async fn set_progress(
    db: &Db,
    id: &str,
    stage: &str,
    done: u64,
    total: u64,
    unit: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET stage = ?, progress_done = ?, progress_total = ?, progress_unit = ?, \
         updated_at = ? WHERE id = ? AND status = 'running'",
    )
    .bind(stage)
    .bind(done as i64)
    .bind(total as i64)
    .bind(unit)
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Ends a running job in a terminal state other than success, with its final event, at once.
pub async fn finish_unsuccessfully(
    db: &Db,
    id: &str,
    status: &str,
    error: Option<&str>,
    report: Option<&serde_json::Value>,
    event: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let t = now();
    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "UPDATE jobs SET status = ?, error = ?, report = ?, finished_at = ?, updated_at = ? \
         WHERE id = ?",
    )
    .bind(status)
    .bind(error)
    .bind(report.map(|r| r.to_string()))
    .bind(t)
    .bind(t)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    add_event(&mut *tx, id, status, event).await?;
    tx.commit().await
}

/// Puts a running job back in the queue without counting the attempt (graceful shutdown).
pub async fn requeue_interrupted(db: &Db, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', stage = NULL, progress_done = 0, \
         attempts = MAX(attempts - 1, 0), updated_at = ? WHERE id = ? AND status = 'running'",
    )
    .bind(now())
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Cancels a queued job at once; for a running one, records the request (the worker stops at
/// the next tensor). Returns the status the job had, or None when it does not exist.
pub async fn request_cancel(db: &Db, id: &str) -> Result<Option<String>, sqlx::Error> {
    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let t = now();
    match status.as_deref() {
        Some("queued") => {
            sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
            )
            .bind(t)
            .bind(t)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        Some("running") => {
            sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?")
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
    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if matches!(status.as_deref(), Some("failed") | Some("cancelled")) {
        sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = 0, cancel_requested = 0, error = NULL, \
             stage = NULL, progress_done = 0, started_at = NULL, finished_at = NULL, \
             updated_at = ? WHERE id = ?",
        )
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // SSE replays history: this marks where the new run's events begin.
        add_event(
            &mut *tx,
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
    .fetch_all(db)
    .await
}

pub async fn cancel_requested(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
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

pub async fn add_event<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(
    exec: E,
    job_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<i64, sqlx::Error> {
    let id = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, kind, data, created_at) VALUES (?, ?, ?, ?) RETURNING id",
    )
    .bind(job_id)
    .bind(kind)
    .bind(data.to_string())
    .bind(now())
    .fetch_one(exec)
    .await?;
    Ok(id)
}

pub async fn events(db: &Db, job_id: &str) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as("SELECT id, kind, data, created_at FROM job_events WHERE job_id = ? ORDER BY id")
        .bind(job_id)
        .fetch_all(db)
        .await
}

/// Marks a job succeeded inside the transaction that also created its output model. Returns
/// false (and changes nothing) when the job was cancelled meanwhile: the caller rolls back.
pub async fn complete(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
    output_model: Option<&str>,
    report: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let t = now();
    let updated = sqlx::query(
        "UPDATE jobs SET status = 'succeeded', stage = NULL, output_model = ?, report = ?, \
         progress_done = progress_total, finished_at = ?, updated_at = ? \
         WHERE id = ? AND status = 'running' AND cancel_requested = 0",
    )
    .bind(output_model)
    .bind(report.to_string())
    .bind(t)
    .bind(t)
    .bind(id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(updated == 1)
}
