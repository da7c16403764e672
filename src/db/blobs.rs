//! Queries on `blobs`: which content-addressed files exist and who still refers to them.

use sqlx::{Any, Executor};

use super::{now, Db, Tx};

pub async fn exists(db: &Db, digest: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT size FROM blobs WHERE digest = $1")
        .bind(digest)
        .fetch_optional(db.pool())
        .await
}

/// Records a blob; re-recording an existing one is a no-op (uploads are idempotent).
pub async fn insert(db: &Db, digest: &str, size: u64) -> Result<(), sqlx::Error> {
    insert_with(db.pool(), digest, size).await
}

/// [`insert`] inside the caller's transaction.
pub async fn insert_in(tx: &mut Tx, digest: &str, size: u64) -> Result<(), sqlx::Error> {
    insert_with(&mut **tx, digest, size).await
}

async fn insert_with<'e, E: Executor<'e, Database = Any>>(
    exec: E,
    digest: &str,
    size: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (digest) DO NOTHING",
    )
    .bind(digest)
    .bind(size as i64)
    .bind(now())
    .execute(exec)
    .await?;
    Ok(())
}

/// Whether a model file or a dataset still uses this blob.
pub async fn referenced(tx: &mut Tx, digest: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM model_files WHERE digest = $1) \
              + (SELECT COUNT(*) FROM datasets WHERE digest = $1)",
    )
    .bind(digest)
    .fetch_one(&mut **tx)
    .await?;
    Ok(n > 0)
}

pub async fn all_digests(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT digest FROM blobs")
        .fetch_all(db.pool())
        .await
}
