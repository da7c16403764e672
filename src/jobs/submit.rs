//! Accepting a job: the model must exist, the output id must be free, the parameters must
//! compile, and a plan is computed from the checkpoint before anything is queued. A repeated
//! idempotency key returns the job it first created.

use sha2::Digest as _;

use super::spec::{is_valid_model_id, JobSpec, MethodSpec};
use super::JobSystem;
use crate::catalog::{self, CatalogError};
use crate::db;
use crate::db::jobs::{JobRow, NewJob};
use crate::model::checkpoint::Checkpoint;
use crate::quant::Plan;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    #[error("{param}: {message}")]
    NotFound { param: String, message: String },
    #[error("{param}: {message}")]
    Conflict { param: String, message: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

pub enum Submitted {
    /// A new job was queued.
    Queued(JobRow),
    /// The idempotency key matched an earlier identical request.
    Existing(JobRow),
    /// `dry_run`: the plan only.
    Plan(serde_json::Value),
}

/// Computes the plan of `spec` for an opened checkpoint.
pub fn plan_for(spec: &JobSpec, ckpt: &Checkpoint, threads: usize) -> Result<Plan, SubmitError> {
    let tensors = ckpt.tensor_shapes();
    match &spec.method {
        MethodSpec::Gguf(p) => {
            let overrides = p.compiled_overrides().map_err(|e| SubmitError::Invalid {
                param: e.param,
                message: e.message,
            })?;
            Ok(Plan::gguf(
                &ckpt.config,
                &tensors,
                p.gguf_type,
                &overrides,
                threads,
            ))
        }
    }
}

pub async fn submit(
    js: &JobSystem,
    spec: JobSpec,
    idempotency_key: Option<String>,
    dry_run: bool,
) -> Result<Submitted, SubmitError> {
    let db = js.db();
    if db::models::get(db, &spec.model).await?.is_none() {
        return Err(SubmitError::NotFound {
            param: "model".into(),
            message: format!("model {:?} does not exist", spec.model),
        });
    }
    if !is_valid_model_id(&spec.output_name) {
        return Err(SubmitError::Invalid {
            param: "output_name".into(),
            message: format!(
                "{:?} is not a valid model id ([a-z0-9][a-z0-9._:-]{{0,127}})",
                spec.output_name
            ),
        });
    }
    let spec_json = serde_json::to_value(&spec).expect("spec serializes");
    let spec_hash = hex::encode(sha2::Sha256::digest(spec_json.to_string().as_bytes()));
    if let Some(key) = &idempotency_key {
        if let Some(existing) = db::jobs::by_idempotency_key(db, key).await? {
            if existing.spec_hash == spec_hash {
                return Ok(Submitted::Existing(existing));
            }
            return Err(SubmitError::Conflict {
                param: "idempotency_key".into(),
                message: format!(
                    "key {key:?} was used for a different request (job {})",
                    existing.id
                ),
            });
        }
    }
    let ckpt = catalog::open_checkpoint(db, js.store(), js.settings(), &spec.model).await?;
    let plan = plan_for(&spec, &ckpt, js.settings().job_threads())?;
    let plan_json = serde_json::to_value(&plan).expect("plan serializes");
    if dry_run {
        return Ok(Submitted::Plan(plan_json));
    }
    if db::models::get(db, &spec.output_name).await?.is_some() {
        return Err(SubmitError::Conflict {
            param: "output_name".into(),
            message: format!("a model named {:?} already exists", spec.output_name),
        });
    }
    if let Some(other) = db::jobs::active_for_output(db, &spec.output_name).await? {
        return Err(SubmitError::Conflict {
            param: "output_name".into(),
            message: format!("job {other} is already producing {:?}", spec.output_name),
        });
    }
    let id = format!("job_{}", uuid::Uuid::new_v4().simple());
    let inserted = db::jobs::insert(
        db,
        &NewJob {
            id: &id,
            model_id: &spec.model,
            method: spec.method.name(),
            output_name: &spec.output_name,
            spec: &spec_json.to_string(),
            spec_hash: &spec_hash,
            plan: &plan_json.to_string(),
            max_attempts: js.settings().jobs.max_attempts,
            idempotency_key: idempotency_key.as_deref(),
        },
    )
    .await;
    if let Err(sqlx::Error::Database(e)) = &inserted {
        if e.is_unique_violation() {
            // Two requests raced: the same idempotency key, or the same output name.
            if let Some(key) = &idempotency_key {
                if let Some(existing) = db::jobs::by_idempotency_key(db, key).await? {
                    return Ok(Submitted::Existing(existing));
                }
            }
            return Err(SubmitError::Conflict {
                param: "output_name".into(),
                message: format!("another job is already producing {:?}", spec.output_name),
            });
        }
    }
    inserted?;
    let row = db::jobs::get(db, &id)
        .await?
        .expect("job was just inserted");
    js.wake();
    Ok(Submitted::Queued(row))
}
