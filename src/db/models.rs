//! Queries on `models` and `model_files`.

use super::{Db, Tx};
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct ModelRow {
    pub id: String,
    pub kind: String,
    pub format: String,
    pub architecture: String,
    pub parameters: i64,
    pub size_bytes: i64,
    pub bits_per_weight: Option<f64>,
    pub base_model: Option<String>,
    pub job_id: Option<String>,
    pub summary: String,
    pub created_at: i64,
    /// This incarnation of the id (see `new_revision`).
    pub revision: String,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct ModelFileRow {
    pub name: String,
    pub digest: String,
    pub size: i64,
}

pub async fn get(db: &Db, id: &str) -> Result<Option<ModelRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM models WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
}

pub async fn list(db: &Db) -> Result<Vec<ModelRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM models ORDER BY created_at, id")
        .fetch_all(db.pool())
        .await
}

pub async fn files(db: &Db, id: &str) -> Result<Vec<ModelFileRow>, sqlx::Error> {
    sqlx::query_as("SELECT name, digest, size FROM model_files WHERE model_id = $1 ORDER BY name")
        .bind(id)
        .fetch_all(db.pool())
        .await
}

/// Inserts a model and its file rows inside the caller's transaction (blobs must exist).
pub async fn insert(
    tx: &mut Tx,
    row: &ModelRow,
    files: &[ModelFileRow],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO models (id, kind, format, architecture, parameters, size_bytes, \
         bits_per_weight, base_model, job_id, summary, created_at, revision) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&row.id)
    .bind(&row.kind)
    .bind(&row.format)
    .bind(&row.architecture)
    .bind(row.parameters)
    .bind(row.size_bytes)
    .bind(row.bits_per_weight)
    .bind(&row.base_model)
    .bind(&row.job_id)
    .bind(&row.summary)
    .bind(row.created_at)
    .bind(&row.revision)
    .execute(&mut **tx)
    .await?;
    for f in files {
        sqlx::query(
            "INSERT INTO model_files (model_id, name, digest, size) VALUES ($1, $2, $3, $4)",
        )
        .bind(&row.id)
        .bind(&f.name)
        .bind(&f.digest)
        .bind(f.size)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A fresh revision for a model row: 128 random bits, so no two incarnations of an id share one.
pub fn new_revision() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What `delete` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted; these digests are referred to by no model any more (their blob rows are gone
    /// too, so the caller can remove the files).
    Deleted {
        orphans: Vec<String>,
    },
    NotFound,
    /// A queued or running job reads or writes the model.
    InUse,
}

/// Deletes a model unless a queued or running job needs it. The check and the delete share one
/// write transaction, so a job submitted meanwhile either is seen here or sees no model.
pub async fn delete(db: &Db, id: &str) -> Result<Deletion, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    // PostgreSQL: hold the model row, so a job inserted meanwhile (its insert reads the row)
    // either committed before this check or waits and then finds no model.
    sqlx::query(&format!(
        "SELECT id FROM models WHERE id = $1{}",
        db.for_update()
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if in_use_by_job(db, &mut *tx, id).await? {
        return Ok(Deletion::InUse);
    }
    let digests: Vec<String> =
        sqlx::query_scalar("SELECT digest FROM model_files WHERE model_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    let deleted = sqlx::query("DELETE FROM models WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Ok(Deletion::NotFound);
    }
    // Its measurements go with it, so a later model of the same id starts clean (its cached
    // eval baselines and dataset token counts go by foreign key).
    sqlx::query("DELETE FROM metrics WHERE model_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let mut orphans = Vec::new();
    for digest in digests {
        if !super::blobs::referenced(&mut tx, &digest).await? {
            sqlx::query("DELETE FROM blobs WHERE digest = $1")
                .bind(&digest)
                .execute(&mut *tx)
                .await?;
            orphans.push(digest);
        }
    }
    tx.commit().await?;
    Ok(Deletion::Deleted { orphans })
}

/// True while a queued or running job reads this model or will write it.
pub async fn in_use_by_job<'e>(
    db: &Db,
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    id: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM jobs WHERE (model_id = $1 OR output_name = $1 OR {} = $1) \
         AND status IN ('queued', 'running')",
        db.json_text("spec", &["params", "reference"])
    ))
    .bind(id)
    .fetch_one(exec)
    .await?;
    Ok(n > 0)
}

/// Variants made from a base model.
pub async fn variants(db: &Db, base: &str) -> Result<Vec<ModelRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM models WHERE base_model = $1 ORDER BY size_bytes")
        .bind(base)
        .fetch_all(db.pool())
        .await
}
