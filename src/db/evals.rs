//! Queries on `eval_baselines` (a reference model's evaluation, cached per model, dataset,
//! ctx and max_tokens) and `dataset_tokens` (a dataset's length for a model's tokenizer).

use super::{now, Db};

/// What identifies a cached reference evaluation.
pub struct BaselineKey<'a> {
    pub model_id: &'a str,
    pub dataset_id: &'a str,
    pub ctx: usize,
    pub max_tokens: usize,
}

pub async fn baseline(db: &Db, k: &BaselineKey<'_>) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT results FROM eval_baselines \
         WHERE model_id = $1 AND dataset_id = $2 AND ctx = $3 AND max_tokens = $4",
    )
    .bind(k.model_id)
    .bind(k.dataset_id)
    .bind(k.ctx as i64)
    .bind(k.max_tokens as i64)
    .fetch_optional(db.pool())
    .await
}

/// Records a reference evaluation. An existing row stays (the first measurement is the one
/// every variant compares with), unless it lacks the speed this one brings.
pub async fn put_baseline(
    db: &Db,
    k: &BaselineKey<'_>,
    results: &serde_json::Value,
    job_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO eval_baselines \
         (model_id, dataset_id, ctx, max_tokens, results, job_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (model_id, dataset_id, ctx, max_tokens) DO UPDATE \
         SET results = excluded.results, job_id = excluded.job_id \
         WHERE {} IS NULL AND {} IS NOT NULL",
        db.json_text("eval_baselines.results", &["speed"]),
        db.json_text("excluded.results", &["speed"]),
    ))
    .bind(k.model_id)
    .bind(k.dataset_id)
    .bind(k.ctx as i64)
    .bind(k.max_tokens as i64)
    .bind(results.to_string())
    .bind(job_id)
    .bind(now())
    .execute(db.pool())
    .await?;
    Ok(())
}

pub async fn put_dataset_tokens(
    db: &Db,
    dataset_id: &str,
    model_id: &str,
    tokens: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dataset_tokens (dataset_id, model_id, tokens) VALUES ($1, $2, $3) \
         ON CONFLICT (dataset_id, model_id) DO UPDATE SET tokens = excluded.tokens",
    )
    .bind(dataset_id)
    .bind(model_id)
    .bind(tokens as i64)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Token counts of a dataset by model id.
pub async fn dataset_tokens(db: &Db, dataset_id: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT model_id, tokens FROM dataset_tokens WHERE dataset_id = $1 ORDER BY model_id",
    )
    .bind(dataset_id)
    .fetch_all(db.pool())
    .await
}
