//! Runs one claimed job: loading → quantizing → evaluating (when asked) → writing, with
//! progress throttled into the database and pushed to SSE, cancellation between tensors and
//! windows, an accuracy gate between evaluating and writing, and an outcome that is all or
//! nothing: the output model row, its blobs, metrics and the job's success are one transaction,
//! and a failed, gated or cancelled job leaves no model row and no files. An `eval` job runs
//! loading → evaluating and records its metrics against the model it scored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::calibrate::CalibrationSource;
use super::evaluation::{self, EvalReport};
use super::exports;
use super::hooks::JobHooks;
use super::pipeline::{self, PipelineError};
use super::spec::{JobSpec, MethodSpec};
use super::stage::{spawn_blocking_in_span, RunError};
use super::submit::quantization_plan;
use super::{calibrate, publish};
use super::{JobEvent, JobSystem};
use crate::catalog;
use crate::db::metrics::MetricRow;
use crate::db::{self, jobs::JobRow};
use crate::export::gguf_meta;
use crate::model::checkpoint::is_weights_file;
use crate::quant::Plan;
use crate::store::{Digest, HashingWriter, TempFile};

/// Runs `job` to its end state. Never panics on job errors; they become the job's `error`.
/// A job whose lease was lost (another worker took it) ends here without a trace: everything
/// it would write is fenced off anyway, and the job is the new worker's.
#[tracing::instrument(skip_all, fields(job_id = %job.id, model = %job.model_id, method = %job.method))]
pub async fn run_job(js: &JobSystem, job: JobRow) {
    info!(
        attempt = job.attempts,
        epoch = job.lease_epoch,
        "job started"
    );
    let cancel = js.cancel_flag(&job.id);
    let lease_lost = Arc::new(AtomicBool::new(false));
    let watcher = spawn_lease_keeper(js.clone(), job.lease(), cancel.clone(), lease_lost.clone());
    let outcome = execute(js, &job, cancel).await;
    watcher.abort();
    js.forget_cancel_flag(&job.id);
    let db = js.db();
    let lease = job.lease();
    let lost = lease_lost.load(Ordering::SeqCst);
    // The job's temp directory is empty by now; after a lost lease it is the new owner's.
    if !lost {
        if let Err(e) = js.store().clear_job_temps(&job.id) {
            warn!(error = %e, "could not remove the job's temp directory");
        }
    }
    let ended = match &outcome {
        Ok(_) => "succeeded",
        Err(_) if lost => "lease_lost",
        Err(RunError::Cancelled) if js.shutdown_token().is_cancelled() => "requeued",
        Err(RunError::Cancelled) => "cancelled",
        Err(RunError::Failed(_) | RunError::GateMissed { .. }) => "failed",
    };
    let result = match outcome {
        Ok(output) => {
            info!(output = %output, "job succeeded");
            Ok(())
        }
        Err(e) if lost => {
            warn!(error = %e, "job stopped: its lease expired and another worker may run it now; nothing published");
            Ok(())
        }
        Err(RunError::Cancelled) if js.shutdown_token().is_cancelled() => {
            info!("job interrupted by shutdown; back in the queue");
            db::jobs::requeue_interrupted(db, &lease).await
        }
        Err(RunError::Cancelled) => {
            info!("job cancelled");
            finish(js, &lease, "cancelled", None, None).await
        }
        Err(RunError::Failed(message)) => {
            warn!(error = %message, "job failed");
            finish(js, &lease, "failed", Some(&message), None).await
        }
        Err(RunError::GateMissed { message, report }) => {
            warn!(error = %message, "job failed its gate");
            finish(js, &lease, "failed", Some(&message), Some(&report)).await
        }
    };
    if let Err(e) = result {
        warn!(error = %e, "could not record the job's outcome");
    }
    js.metrics().job_ended(&job.id, &job.method, ended);
}

/// Records a terminal state and tells local subscribers, unless the lease is gone.
async fn finish(
    js: &JobSystem,
    lease: &db::jobs::Lease,
    status: &'static str,
    error: Option<&str>,
    report: Option<&serde_json::Value>,
) -> Result<(), sqlx::Error> {
    let data = json!({"status": status, "error": error});
    if !db::jobs::finish_unsuccessfully(js.db(), lease, status, error, report, &data).await? {
        warn!(
            status,
            "not recorded: this worker no longer holds the job's lease"
        );
        return Ok(());
    }
    js.events().publish(JobEvent {
        job_id: lease.job_id.clone(),
        kind: status,
        data,
    });
    Ok(())
}

/// Keeps the job's lease until the job ends (the caller aborts this): renews the lease every
/// third of its length, and sets the cancel flag when a cancel is recorded in the database (by
/// this or another replica), when the server shuts down, or when the lease is lost (then
/// `lost` too). A lease
/// counts as lost when the database refuses the renewal, and also when no renewal succeeded
/// for a whole lease (the database unreachable): by then another worker may have the job.
fn spawn_lease_keeper(
    js: JobSystem,
    lease: db::jobs::Lease,
    flag: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let lease_ms = js.settings().lease_ms();
    let renew_every = Duration::from_millis((lease_ms / 3).max(100) as u64);
    // Cancellation is looked up at each tick; a renewal at the first tick past its time.
    let tick = (renew_every / 2).min(Duration::from_millis(500));
    tokio::spawn(async move {
        let mut renewed_at = tokio::time::Instant::now();
        loop {
            let stopping = flag.load(Ordering::SeqCst);
            tokio::select! {
                _ = js.shutdown_token().cancelled(), if !stopping => flag.store(true, Ordering::SeqCst),
                _ = tokio::time::sleep(tick) => {}
            }
            if renewed_at.elapsed() >= renew_every {
                match db::jobs::renew(js.db(), &lease, lease_ms).await {
                    Ok(true) => renewed_at = tokio::time::Instant::now(),
                    Ok(false) => {
                        warn!(job_id = %lease.job_id, "lease lost: the job was re-queued or taken by another worker");
                        lost.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        warn!(job_id = %lease.job_id, error = %e, "could not renew the lease")
                    }
                }
                if renewed_at.elapsed() >= Duration::from_millis(lease_ms as u64) {
                    lost.store(true, Ordering::SeqCst);
                }
                if lost.load(Ordering::SeqCst) {
                    flag.store(true, Ordering::SeqCst);
                    return;
                }
            }
            // A stopping job keeps its lease until it has recorded how it ended.
            if !flag.load(Ordering::SeqCst)
                && db::jobs::cancel_requested(js.db(), &lease.job_id)
                    .await
                    .unwrap_or(false)
            {
                flag.store(true, Ordering::SeqCst);
            }
        }
    })
}

async fn stage(js: &JobSystem, job: &JobRow, stage: &'static str) -> Result<(), sqlx::Error> {
    let id = job.id.as_str();
    js.metrics().job_stage(id, &job.method, stage);
    let lease = job.lease();
    db::jobs::set_progress(js.db(), &lease, stage, 0, 0, "").await?;
    let data = json!({"stage": stage});
    db::jobs::add_worker_event(js.db(), &lease, "stage", &data).await?;
    js.events().publish(JobEvent {
        job_id: id.to_string(),
        kind: "stage",
        data,
    });
    Ok(())
}

async fn execute(
    js: &JobSystem,
    job: &JobRow,
    cancel: Arc<AtomicBool>,
) -> Result<String, RunError> {
    let spec: JobSpec = serde_json::from_str(&job.spec)
        .map_err(|e| RunError::Failed(format!("stored spec is unreadable: {e}")))?;
    if db::jobs::cancel_requested(js.db(), &job.id).await? {
        return Err(RunError::Cancelled);
    }
    // What an earlier attempt left (it was killed, or froze and lost its lease: either way it
    // can no longer publish) is garbage now.
    js.store().clear_job_temps(&job.id)?;
    check_model_revision(js, job).await?;
    stage(js, job, "loading").await?;
    let done = match &spec.method {
        MethodSpec::Eval(_) => evaluate_only(js, job, &spec, cancel).await?,
        _ => quantize_and_publish(js, job, &spec, cancel).await?,
    };
    js.events().publish(JobEvent {
        job_id: job.id.clone(),
        kind: "done",
        data: done.1,
    });
    Ok(done.0)
}

/// Fails a job whose model was deleted, or deleted and created again under its id, since the
/// job was planned: its plan describes the old model, so running it would make or measure
/// something nobody asked for.
async fn check_model_revision(js: &JobSystem, job: &JobRow) -> Result<(), RunError> {
    let Some(planned) = &job.model_revision else {
        return Ok(());
    };
    match db::models::get(js.db(), &job.model_id).await? {
        Some(m) if m.revision == *planned => Ok(()),
        Some(_) => Err(RunError::Failed(format!(
            "model {:?} was replaced by a new upload after this job was submitted; submit a new job",
            job.model_id
        ))),
        None => Err(RunError::Failed(format!(
            "model {:?} was deleted after this job was submitted",
            job.model_id
        ))),
    }
}

/// The eval stage and the gate after it; `Ok(None)` when the job has no eval.
async fn evaluate_and_gate(
    js: &JobSystem,
    job: &JobRow,
    spec: &JobSpec,
    target: evaluation::Target,
    cancel: Arc<AtomicBool>,
    report_so_far: serde_json::Value,
) -> Result<Option<EvalReport>, RunError> {
    let Some(params) = &spec.eval else {
        return Ok(None);
    };
    stage(js, job, "evaluating").await?;
    let report = evaluation::run(js, &job.lease(), spec, params, target, cancel.clone()).await?;
    if cancel.load(Ordering::SeqCst) {
        return Err(RunError::Cancelled);
    }
    let data = json!({"eval": report});
    db::jobs::add_worker_event(js.db(), &job.lease(), "metric", &data).await?;
    js.events().publish(JobEvent {
        job_id: job.id.clone(),
        kind: "metric",
        data,
    });
    if let Some(gate) = &spec.gate {
        let (kld, dppl, top1) = report.gate_inputs();
        let checks = gate.check(kld, dppl, top1);
        if let Some(message) = evaluation::gate_failure(&checks) {
            let mut full = report_so_far;
            full["eval"] = json!(report);
            full["gate"] = json!({"passed": false, "checks": checks});
            return Err(RunError::GateMissed {
                message,
                report: full,
            });
        }
    }
    Ok(Some(report))
}

async fn quantize_and_publish(
    js: &JobSystem,
    job: &JobRow,
    spec: &JobSpec,
    cancel: Arc<AtomicBool>,
) -> Result<(String, serde_json::Value), RunError> {
    let quantized = quantize(js, job, spec, cancel.clone()).await?;
    if cancel.load(Ordering::SeqCst) {
        return Err(RunError::Cancelled);
    }
    let target = evaluation::Target::File {
        name: "model.gguf".into(),
        path: quantized.temp.path().to_path_buf(),
    };
    let quant_report = serde_json::to_value(&quantized.report).expect("report serializes");
    let eval = evaluate_and_gate(js, job, spec, target, cancel.clone(), quant_report).await?;
    stage(js, job, "writing").await?;
    let (store, gguf, stem, outputs) = (
        js.store().for_job(&job.id)?,
        quantized.temp.path().to_path_buf(),
        publish::file_stem(&spec.output_name),
        spec.outputs.clone(),
    );
    let exported =
        spawn_blocking_in_span(move || exports::write_exports(&store, &gguf, &stem, &outputs))
            .await
            .map_err(|e| RunError::Failed(format!("export thread panicked: {e}")))?
            .map_err(|e| RunError::Failed(e.to_string()))?;
    if cancel.load(Ordering::SeqCst) {
        return Err(RunError::Cancelled);
    }
    let mut metrics = metric_rows(&quantized.report);
    if let Some(e) = &eval {
        metrics.extend(e.metric_rows(&job.id));
    }
    let output = publish::Output {
        spec,
        job_id: &job.id,
        lease: &job.lease(),
        temp: quantized.temp,
        digest: quantized.digest,
        size: quantized.size,
        plan: &quantized.plan,
        report: &quantized.report,
        eval: eval.as_ref(),
        params: quantized.params,
        gguf_type: quantized.plan.gguf_type,
        architecture: quantized.architecture,
        metrics,
        extra_files: quantized.imatrix_file.into_iter().chain(exported).collect(),
    };
    publish::publish(js, output).await
}

/// `method: "eval"`: scores a stored model; its metrics are recorded against that model.
async fn evaluate_only(
    js: &JobSystem,
    job: &JobRow,
    spec: &JobSpec,
    cancel: Arc<AtomicBool>,
) -> Result<(String, serde_json::Value), RunError> {
    let target = evaluation::Target::Model(spec.model.clone());
    let report = evaluate_and_gate(js, job, spec, target, cancel, json!({}))
        .await?
        .ok_or_else(|| RunError::Failed("an eval job needs an eval block".into()))?;
    let full = json!({"eval": report, "gate": spec.gate.as_ref().map(|_| json!({"passed": true}))});
    let rows = report.metric_rows(&job.id);
    let mut tx = js.db().begin().await?;
    db::metrics::insert_all(&mut tx, &job.id, Some(&spec.model), &rows).await?;
    if !db::jobs::complete(&mut tx, &job.lease(), None, &full).await? {
        return Err(RunError::Cancelled);
    }
    let done = json!({"status": "succeeded", "model": spec.model, "perplexity": report.summary.perplexity,
                      "kld_mean": report.summary.kld_mean});
    db::jobs::add_event_in(&mut tx, &job.id, "done", &done).await?;
    tx.commit().await?;
    Ok((spec.model.clone(), done))
}

/// What the quantizing stage hands to publishing.
struct Quantized {
    temp: TempFile,
    digest: Digest,
    size: u64,
    plan: Plan,
    report: pipeline::GgufReport,
    architecture: String,
    /// The method's parameters as recorded in the file and the manifest.
    params: serde_json::Value,
    /// The importance matrix the encoders used, in llama.cpp's format.
    imatrix_file: Option<publish::ExtraFile>,
}

/// Opens the base model, plans, and runs the pipeline on a blocking thread into a temp file.
async fn quantize(
    js: &JobSystem,
    job: &JobRow,
    spec: &JobSpec,
    cancel: Arc<AtomicBool>,
) -> Result<Quantized, RunError> {
    let ckpt =
        Arc::new(catalog::open_checkpoint(js.db(), js.store(), js.settings(), &spec.model).await?);
    let plan = quantization_plan(&spec.method, &ckpt, js.settings().job_threads())
        .map_err(|e| RunError::Failed(e.to_string()))?;
    let source_digest = db::models::files(js.db(), &spec.model)
        .await?
        .into_iter()
        .find(|f| is_weights_file(&f.name))
        .map(|f| f.digest);
    let params_json = spec.method.params_json();
    // Loading the tokenizer for the GGUF metadata is compute: keep it off the executor.
    let (ckpt_meta, name, ftype, quantized, job_id) = (
        ckpt.clone(),
        spec.output_name.clone(),
        plan.file_type,
        !plan.gguf_type.is_float(),
        job.id.clone(),
    );
    let params_for_meta = params_json.clone();
    let method_name = spec.method.name();
    let serving = spec.method.serving_metadata();
    let metadata = spawn_blocking_in_span(move || {
        let mut m = gguf_meta::model_metadata(&ckpt_meta, &name, ftype, quantized)?;
        m.extend(gguf_meta::provenance(
            method_name,
            &params_for_meta,
            source_digest.as_deref(),
            Some(&job_id),
        ));
        m.extend(serving);
        Ok::<_, crate::model::checkpoint::CheckpointError>(m)
    })
    .await
    .map_err(|e| RunError::Failed(format!("metadata thread panicked: {e}")))?
    .map_err(|e| RunError::Failed(e.to_string()))?;

    let (calibrated, calibration) = match &spec.calibration {
        Some(params) => {
            stage(js, job, "calibrating").await?;
            let text_path = match &params.dataset {
                Some(id) => {
                    let dataset = db::datasets::get(js.db(), id)
                        .await?
                        .ok_or_else(|| RunError::Failed(format!("dataset {id:?} was deleted")))?;
                    let digest = Digest::parse(&dataset.digest)
                        .map_err(|e| RunError::Failed(e.to_string()))?;
                    Some(js.store().local_path(&digest).await?)
                }
                None => None,
            };
            let hooks = JobHooks::new(js, &job.lease(), cancel.clone());
            let (ckpt_c, plan_c, method, params) = (
                ckpt.clone(),
                plan.clone(),
                spec.method.clone(),
                params.clone(),
            );
            let (tensors, report) = spawn_blocking_in_span(move || {
                let text = text_path.map(std::fs::read_to_string).transpose()?;
                let from = match (&text, &params.dataset) {
                    (Some(text), Some(name)) => CalibrationSource::Text { text, name },
                    _ => CalibrationSource::DataFree,
                };
                calibrate::calibrate(&ckpt_c, &method, &plan_c, from, &params, &hooks)
            })
            .await
            .map_err(|e| RunError::Failed(format!("calibration thread panicked: {e}")))?
            .map_err(pipeline_error)?;
            (tensors, Some(report))
        }
        None => Default::default(),
    };

    // An importance matrix is recorded in the GGUF as llama-quantize records it, and published
    // beside the model in llama.cpp's format.
    let mut metadata = metadata;
    let imatrix_file = match &calibrated.imatrix {
        Some(m) => {
            let name = format!("{}.imatrix.gguf", publish::file_stem(&spec.output_name));
            metadata.extend(m.provenance(Some(&name)));
            let temp = js.store().for_job(&job.id)?.temp_file("imatrix")?;
            let w = HashingWriter::create(temp.path())?;
            let (digest, size) = m
                .write_gguf(w)
                .map_err(|e| RunError::Failed(e.to_string()))?
                .finish()?;
            Some(publish::ExtraFile {
                name,
                temp,
                digest,
                size,
            })
        }
        None => None,
    };

    stage(js, job, "quantizing").await?;
    let temp = js.store().for_job(&job.id)?.temp_file("job")?;
    let hooks = JobHooks::new(js, &job.lease(), cancel);
    let pool = js.pool();
    let out_path = temp.path().to_path_buf();
    let (plan_for_run, ckpt_for_run) = (plan.clone(), ckpt.clone());
    let (digest, size, mut report) = spawn_blocking_in_span(move || {
        pipeline::quantize_gguf(
            &ckpt_for_run,
            &plan_for_run,
            calibrated,
            &metadata,
            &out_path,
            &pool,
            &hooks,
        )
    })
    .await
    .map_err(|e| RunError::Failed(format!("quantization thread panicked: {e}")))?
    .map_err(pipeline_error)?;
    report.calibration = calibration;
    let architecture = ckpt.config.architecture.name().to_string();
    Ok(Quantized {
        temp,
        digest,
        size,
        plan,
        report,
        architecture,
        params: params_json,
        imatrix_file,
    })
}

fn pipeline_error(e: PipelineError) -> RunError {
    match e {
        PipelineError::Cancelled => RunError::Cancelled,
        other => RunError::Failed(other.to_string()),
    }
}

fn metric_rows(report: &pipeline::GgufReport) -> Vec<MetricRow> {
    let mut rows = Vec::with_capacity(report.tensors.len() * 3 + 4);
    for t in &report.tensors {
        let label = Some(t.type_name.to_string());
        rows.push(MetricRow {
            subject: t.name.clone(),
            name: "rel_rmse".into(),
            value: Some(t.rel_rmse),
            label: label.clone(),
        });
        rows.push(MetricRow {
            subject: t.name.clone(),
            name: "snr_db".into(),
            value: t.snr_db,
            label: label.clone(),
        });
        rows.push(MetricRow {
            subject: t.name.clone(),
            name: "bytes".into(),
            value: Some(t.bytes as f64),
            label,
        });
    }
    for (name, value) in [
        ("file_bytes", report.file_bytes as f64),
        ("bits_per_weight", report.bits_per_weight),
        ("bits_per_weight_total", report.bits_per_weight_total),
        ("quantize_seconds", report.wall_seconds),
    ] {
        rows.push(MetricRow {
            subject: "model".into(),
            name: name.into(),
            value: Some(value),
            label: None,
        });
    }
    rows
}
