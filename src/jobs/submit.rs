//! Accepting a job: the model (and an eval's reference and dataset) must exist, the output id
//! must be free, the parameters must compile and fit the model, and a plan is computed from
//! the checkpoint before anything is queued. A repeated idempotency key returns the job it
//! first created.

use sha2::Digest as _;

use serde_json::json;

use super::spec::{ExportFormat, HeadMode, JobSpec, MethodSpec};
use super::JobSystem;
use crate::catalog::is_valid_model_id;
use crate::catalog::{self, CatalogError};
use crate::db;
use crate::db::jobs::{JobRow, NewJob};
use crate::eval::EvalSpec;
use crate::formats::int8_rows::WeightScale;
use crate::model::checkpoint::Checkpoint;
use crate::quant::plan::OwnForm;
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

/// Computes the quantization plan of a job that makes a model, for an opened checkpoint.
pub fn quantization_plan(
    method: &MethodSpec,
    ckpt: &Checkpoint,
    threads: usize,
) -> Result<Plan, SubmitError> {
    match method {
        MethodSpec::Gguf(p) => {
            let overrides = p.compiled_overrides().map_err(|e| SubmitError::Invalid {
                param: e.param,
                message: e.message,
            })?;
            Ok(Plan::gguf(
                &ckpt.config,
                &ckpt.tensor_shapes(),
                p.gguf_type,
                &overrides,
                p.imatrix,
                threads,
            ))
        }
        MethodSpec::Rtn(p) => Ok(Plan::grouped(
            "rtn",
            &ckpt.tensor_shapes(),
            p.format(),
            threads,
        )),
        MethodSpec::Gptq(p) => Ok(Plan::grouped(
            "gptq",
            &ckpt.tensor_shapes(),
            p.format(),
            threads,
        )),
        MethodSpec::Awq(p) => Ok(Plan::grouped(
            "awq",
            &ckpt.tensor_shapes(),
            p.format(),
            threads,
        )),
        MethodSpec::Int8Dynamic(p) => Ok(Plan::own_form(
            method.name(),
            &ckpt.tensor_shapes(),
            OwnForm::Int8Rows(p.weight_scale()),
            p.head_mode() == HeadMode::Int8,
            threads,
        )),
        MethodSpec::LlmInt8(_) => Ok(Plan::own_form(
            method.name(),
            &ckpt.tensor_shapes(),
            OwnForm::Int8Rows(WeightScale::PerChannel),
            false,
            threads,
        )),
        MethodSpec::Nf4(p) | MethodSpec::Fp4(p) => Ok(Plan::own_form(
            method.name(),
            &ckpt.tensor_shapes(),
            OwnForm::Bnb4(p.format(method.bnb4_kind().expect("nf4 or fp4"))),
            false,
            threads,
        )),
        MethodSpec::Eval(_) => Err(invalid(
            "method",
            "method \"eval\" makes no model to plan".into(),
        )),
    }
}

fn invalid(param: &str, message: String) -> SubmitError {
    SubmitError::Invalid {
        param: param.into(),
        message,
    }
}

/// Fills in an eval job's default reference (the model's base) and checks that the reference
/// exists and differs in nothing evaluation needs: the vocabulary, and a context that holds
/// `eval.ctx`. Returns the plan's eval part.
async fn check_eval(
    js: &JobSystem,
    spec: &mut JobSpec,
    model: &Checkpoint,
) -> Result<Option<serde_json::Value>, SubmitError> {
    let db = js.db();
    if let MethodSpec::Eval(p) = &mut spec.method {
        if p.reference.is_none() {
            let base = db::models::get(db, &spec.model)
                .await?
                .and_then(|m| m.base_model);
            p.reference = Some(base.ok_or_else(|| {
                invalid(
                    "params.reference",
                    format!(
                        "model {:?} has no base model; name the reference to compare with",
                        spec.model
                    ),
                )
            })?);
        }
    }
    let Some(e) = &spec.eval else {
        return Ok(None);
    };
    if db::datasets::get(db, &e.dataset).await?.is_none() {
        return Err(SubmitError::NotFound {
            param: "eval.dataset".into(),
            message: format!("dataset {:?} does not exist", e.dataset),
        });
    }
    let reference_id = spec.reference().to_string();
    let opened;
    let reference = if reference_id == spec.model {
        model
    } else {
        opened = match catalog::open_checkpoint(db, js.store(), js.settings(), &reference_id).await
        {
            Err(CatalogError::NotFound(_)) => {
                return Err(SubmitError::NotFound {
                    param: "params.reference".into(),
                    message: format!("model {reference_id:?} does not exist"),
                })
            }
            other => other?,
        };
        &opened
    };
    if reference.config.vocab_size != model.config.vocab_size {
        return Err(invalid(
            "params.reference",
            format!(
                "{reference_id:?} has a vocabulary of {} tokens, {:?} {}: KL divergence needs one tokenizer",
                reference.config.vocab_size, spec.model, model.config.vocab_size
            ),
        ));
    }
    let context = reference
        .config
        .max_position_embeddings
        .min(model.config.max_position_embeddings);
    if e.ctx > context {
        return Err(invalid(
            "eval.ctx",
            format!(
                "{} exceeds the models' context of {context} positions",
                e.ctx
            ),
        ));
    }
    let spec_for_windows = EvalSpec {
        ctx: e.ctx,
        max_scored: Some(e.max_tokens),
        bos: None,
    };
    Ok(Some(json!({
        "reference": reference_id,
        "dataset": e.dataset,
        "ctx": e.ctx,
        "max_tokens": e.max_tokens,
        "windows_at_most": e.max_tokens.div_ceil(spec_for_windows.scored_per_window()),
        "speed": e.speed,
    })))
}

pub async fn submit(
    js: &JobSystem,
    mut spec: JobSpec,
    idempotency_key: Option<String>,
    dry_run: bool,
) -> Result<Submitted, SubmitError> {
    let db = js.db();
    let Some(model) = db::models::get(db, &spec.model).await? else {
        return Err(SubmitError::NotFound {
            param: "model".into(),
            message: format!("model {:?} does not exist", spec.model),
        });
    };
    if spec.method.makes_model() && !is_valid_model_id(&spec.output_name) {
        return Err(SubmitError::Invalid {
            param: "output_name".into(),
            message: format!(
                "{:?} is not a valid model id ([a-z0-9][a-z0-9._:-]{{0,127}})",
                spec.output_name
            ),
        });
    }
    // The hash is of the request as given, before defaults are resolved.
    let spec_hash = hex::encode(sha2::Sha256::digest(
        serde_json::to_value(&spec)
            .expect("spec serializes")
            .to_string()
            .as_bytes(),
    ));
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
    let eval_plan = check_eval(js, &mut spec, &ckpt).await?;
    if let Some(dataset) = spec.calibration.as_ref().and_then(|c| c.dataset.as_ref()) {
        if db::datasets::get(db, dataset).await?.is_none() {
            return Err(SubmitError::NotFound {
                param: "calibration.dataset".into(),
                message: format!("dataset {dataset:?} does not exist"),
            });
        }
    }
    if spec.outputs.contains(&ExportFormat::AwqSafetensors) {
        let group_size = spec.method.group_format().and_then(|f| f.group_size);
        if let Some(problem) = crate::export::gptq::awq_group_problem(&ckpt, group_size) {
            return Err(SubmitError::Invalid {
                param: "outputs".into(),
                message: problem,
            });
        }
    }
    let mut plan_json = match &spec.method {
        MethodSpec::Eval(_) => json!({"method": "eval", "model": spec.model}),
        method => serde_json::to_value(quantization_plan(
            method,
            &ckpt,
            js.settings().job_threads(),
        )?)
        .expect("plan serializes"),
    };
    if let Some(e) = eval_plan {
        plan_json["eval"] = e;
    }
    if let Some(c) = &spec.calibration {
        plan_json["calibration"] = json!({"dataset": c.dataset, "data_free": c.dataset.is_none(),
                                          "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
                                          "tokens": c.samples * c.seq_len});
    }
    if dry_run {
        return Ok(Submitted::Plan(plan_json));
    }
    let id = format!("job_{}", uuid::Uuid::new_v4().simple());
    if spec.method.makes_model() {
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
    } else {
        spec.output_name = id.clone();
    }
    let spec_json = serde_json::to_value(&spec).expect("spec serializes");
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
            model_revision: &model.revision,
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
    if !inserted? {
        return Err(SubmitError::Conflict {
            param: "model".into(),
            message: format!(
                "model {:?} was deleted or replaced while the job was being planned; submit it again",
                spec.model
            ),
        });
    }
    let row = db::jobs::get(db, &id)
        .await?
        .expect("job was just inserted");
    js.wake();
    Ok(Submitted::Queued(row))
}
