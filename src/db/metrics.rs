//! Queries on `metrics`: numbers a job measured, per tensor or per model.

use super::{Db, Tx};
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow, Serialize, PartialEq)]
pub struct MetricRow {
    pub subject: String,
    pub name: String,
    pub value: Option<f64>,
    pub label: Option<String>,
}

pub async fn insert_all(
    tx: &mut Tx,
    job_id: &str,
    model_id: Option<&str>,
    rows: &[MetricRow],
) -> Result<(), sqlx::Error> {
    for r in rows {
        sqlx::query(
            "INSERT INTO metrics (job_id, model_id, subject, name, value, label) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(job_id)
        .bind(model_id)
        .bind(&r.subject)
        .bind(&r.name)
        .bind(r.value)
        .bind(&r.label)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub async fn for_job(db: &Db, job_id: &str) -> Result<Vec<MetricRow>, sqlx::Error> {
    sqlx::query_as("SELECT subject, name, value, label FROM metrics WHERE job_id = $1 ORDER BY id")
        .bind(job_id)
        .fetch_all(db.pool())
        .await
}

pub async fn for_model(db: &Db, model_id: &str) -> Result<Vec<MetricRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subject, name, value, label FROM metrics WHERE model_id = $1 AND subject = 'model' \
         ORDER BY id",
    )
    .bind(model_id)
    .fetch_all(db.pool())
    .await
}
