//! Queries on `datasets`: content-addressed texts that calibration and evaluation refer to.

use serde::Serialize;

use super::{now, Db};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DatasetRow {
    pub id: String,
    pub digest: String,
    pub format: String,
    pub bytes: i64,
    pub documents: i64,
    pub created_at: i64,
}

/// Records the blob and the dataset in one transaction; `false` when the dataset existed.
pub async fn insert(
    db: &Db,
    id: &str,
    digest: &str,
    format: &str,
    bytes: u64,
    documents: u64,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    super::blobs::insert_in(&mut tx, digest, bytes).await?;
    let inserted = sqlx::query(
        "INSERT INTO datasets (id, digest, format, bytes, documents, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(digest)
    .bind(format)
    .bind(bytes as i64)
    .bind(documents as i64)
    .bind(now())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(inserted == 1)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<DatasetRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM datasets WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
}

pub async fn list(db: &Db) -> Result<Vec<DatasetRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM datasets ORDER BY created_at DESC, id")
        .fetch_all(db.pool())
        .await
}

/// Deletes a dataset; returns its digest when nothing refers to the blob any more (the blob
/// row is deleted too, so the caller removes the file). `None` when there was no dataset.
pub async fn delete(db: &Db, id: &str) -> Result<Option<Option<String>>, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let Some(digest): Option<String> = sqlx::query_scalar(&format!(
        "SELECT digest FROM datasets WHERE id = $1{}",
        db.for_update()
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    sqlx::query("DELETE FROM datasets WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let orphan = if super::blobs::referenced(&mut tx, &digest).await? {
        None
    } else {
        sqlx::query("DELETE FROM blobs WHERE digest = $1")
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        Some(digest)
    };
    tx.commit().await?;
    Ok(Some(orphan))
}

/// Whether a queued or running job evaluates or calibrates on the dataset.
pub async fn in_use_by_job(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') \
         AND ({} = $1 OR {} = $1)",
        db.json_text("spec", &["eval", "dataset"]),
        db.json_text("spec", &["calibration", "dataset"]),
    ))
    .bind(id)
    .fetch_one(db.pool())
    .await?;
    Ok(n > 0)
}
