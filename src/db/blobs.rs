//! Queries on `blobs`: which content-addressed files exist and who still refers to them.

use sqlx::{Executor, Sqlite};

use super::{now, Db};

pub async fn exists(db: &Db, digest: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT size FROM blobs WHERE digest = ?")
        .bind(digest)
        .fetch_optional(db)
        .await
}

/// Records a blob; re-recording an existing one is a no-op (uploads are idempotent).
pub async fn insert<'e, E: Executor<'e, Database = Sqlite>>(
    exec: E,
    digest: &str,
    size: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT OR IGNORE INTO blobs (digest, size, created_at) VALUES (?, ?, ?)")
        .bind(digest)
        .bind(size as i64)
        .bind(now())
        .execute(exec)
        .await?;
    Ok(())
}

/// Whether a model file or a dataset still uses this blob.
pub async fn referenced(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    digest: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM model_files WHERE digest = ?1) \
              + (SELECT COUNT(*) FROM datasets WHERE digest = ?1)",
    )
    .bind(digest)
    .fetch_one(&mut **tx)
    .await?;
    Ok(n > 0)
}

pub async fn all_digests(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT digest FROM blobs")
        .fetch_all(db)
        .await
}
