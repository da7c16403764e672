//! The last stage of a job: the output file and its manifest move into the blob store, and the
//! output model row, its file rows, the metrics and the job's success are written in one
//! transaction. If that transaction fails, the blobs this job added are removed again, so a job
//! either produces a complete model or nothing.

use serde_json::json;

use super::evaluation::EvalReport;
use super::pipeline::GgufReport;
use super::spec::JobSpec;
use super::stage::RunError;
use super::JobSystem;
use crate::db;
use crate::db::metrics::MetricRow;
use crate::db::models::{ModelFileRow, ModelRow};
use crate::export::manifest::{Manifest, ManifestFile};
use crate::quant::{GgufType, Plan};
use crate::store::{Digest, HashingWriter, TempFile};

/// The stem of a variant's file names: its id, with the `:` that file systems and URLs treat
/// specially replaced (`smol:q4_k_m` → `smol-q4_k_m.gguf`).
pub(super) fn file_stem(output_name: &str) -> String {
    output_name.replace(':', "-")
}

/// A file published beside the model (the importance matrix a job collected).
pub(super) struct ExtraFile {
    pub name: String,
    pub temp: TempFile,
    pub digest: Digest,
    pub size: u64,
}

/// Everything publishing needs from the earlier stages.
pub(super) struct Output<'a> {
    pub spec: &'a JobSpec,
    pub job_id: &'a str,
    pub lease: &'a db::jobs::Lease,
    pub temp: TempFile,
    pub digest: Digest,
    pub size: u64,
    pub plan: &'a Plan,
    pub report: &'a GgufReport,
    pub eval: Option<&'a EvalReport>,
    pub params: serde_json::Value,
    pub gguf_type: GgufType,
    pub architecture: String,
    pub metrics: Vec<MetricRow>,
    pub extra_files: Vec<ExtraFile>,
}

/// Writes `manifest.json` to a temp file; returns it with its digest and size.
fn write_manifest(
    js: &JobSystem,
    o: &Output<'_>,
    gguf_name: &str,
) -> std::io::Result<(TempFile, Digest, u64)> {
    let manifest = Manifest {
        model: o.spec.output_name.clone(),
        base_model: o.spec.model.clone(),
        format: "gguf",
        method: o.spec.method.name().into(),
        params: o.params.clone(),
        tool: format!("quantd {}", env!("CARGO_PKG_VERSION")),
        job_id: Some(o.job_id.to_string()),
        files: std::iter::once(ManifestFile {
            name: gguf_name.to_string(),
            sha256: o.digest.hex().to_string(),
            size: o.size,
        })
        .chain(o.extra_files.iter().map(|f| ManifestFile {
            name: f.name.clone(),
            sha256: f.digest.hex().to_string(),
            size: f.size,
        }))
        .collect(),
        metrics: json!({"bits_per_weight": o.plan.bits_per_weight, "bits_per_weight_total": o.plan.bits_per_weight_total,
                        "file_bytes": o.size, "type_counts": o.plan.type_counts, "quantize_seconds": o.report.wall_seconds,
                        "eval": o.eval}),
    };
    let temp = js.store().for_job(o.job_id)?.temp_file("manifest")?;
    let mut w = HashingWriter::create(temp.path())?;
    std::io::Write::write_all(&mut w, &manifest.to_bytes())?;
    let (digest, size) = w.finish()?;
    Ok((temp, digest, size))
}

/// Commits the output; returns the new model id and the `done` event's data.
pub(super) async fn publish(
    js: &JobSystem,
    o: Output<'_>,
) -> Result<(String, serde_json::Value), RunError> {
    let gguf_name = format!("{}.gguf", file_stem(&o.spec.output_name));
    let (manifest_temp, manifest_digest, manifest_size) = write_manifest(js, &o, &gguf_name)?;
    let mut files = vec![
        ModelFileRow {
            name: gguf_name,
            digest: o.digest.to_string(),
            size: o.size as i64,
        },
        ModelFileRow {
            name: "manifest.json".into(),
            digest: manifest_digest.to_string(),
            size: manifest_size as i64,
        },
    ];
    files.extend(o.extra_files.iter().map(|f| ModelFileRow {
        name: f.name.clone(),
        digest: f.digest.to_string(),
        size: f.size as i64,
    }));
    let mut fresh = Vec::new();
    for d in [&o.digest, &manifest_digest]
        .into_iter()
        .chain(o.extra_files.iter().map(|f| &f.digest))
    {
        if !js.store().contains(d).await? {
            fresh.push(d.clone());
        }
    }
    js.store().commit(o.temp, &o.digest).await?;
    js.store().commit(manifest_temp, &manifest_digest).await?;
    for f in o.extra_files {
        js.store().commit(f.temp, &f.digest).await?;
    }
    let row = ModelRow {
        id: o.spec.output_name.clone(),
        kind: "quantized".into(),
        format: "gguf".into(),
        architecture: o.architecture,
        parameters: o.plan.parameters as i64,
        size_bytes: o.size as i64,
        bits_per_weight: Some(o.plan.bits_per_weight),
        base_model: Some(o.spec.model.clone()),
        job_id: Some(o.job_id.to_string()),
        summary: json!({"method": o.spec.method.name(), "type": o.gguf_type, "type_counts": o.plan.type_counts,
                        "bits_per_weight_total": o.plan.bits_per_weight_total})
        .to_string(),
        created_at: db::now(),
        revision: db::models::new_revision(),
    };
    let mut report = serde_json::to_value(o.report).expect("report serializes");
    if let Some(e) = o.eval {
        report["eval"] = json!(e);
        if o.spec.gate.is_some() {
            report["gate"] = json!({"passed": true});
        }
    }
    let committed = async {
        let mut tx = js.db().begin().await?;
        for f in &files {
            db::blobs::insert_in(&mut tx, &f.digest, f.size as u64).await?;
        }
        db::models::insert(&mut tx, &row, &files).await?;
        db::metrics::insert_all(&mut tx, o.job_id, Some(&row.id), &o.metrics).await?;
        if !db::jobs::complete(&mut tx, o.lease, Some(&row.id), &report).await? {
            // Cancelled while the files were being written, or the lease was lost (another
            // worker runs the job now): the transaction rolls back.
            return Ok(None);
        }
        let done = json!({"status": "succeeded", "output_model": row.id, "file_bytes": o.size});
        db::jobs::add_event_in(&mut tx, o.job_id, "done", &done).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(Some(done))
    }
    .await;
    match committed {
        Ok(Some(done)) => Ok((row.id, done)),
        outcome => {
            remove_unreferenced(js, fresh).await;
            match outcome {
                Err(e) => Err(e.into()),
                _ => Err(RunError::Cancelled),
            }
        }
    }
}

/// Removes blobs a failed step added, unless a row refers to them by now (another upload or
/// job with the same bytes may have committed meanwhile).
pub(crate) async fn remove_unreferenced(js: &JobSystem, fresh: Vec<Digest>) {
    for d in fresh {
        if matches!(db::blobs::exists(js.db(), d.as_str()).await, Ok(None)) {
            let _ = js.store().remove(&d).await;
        }
    }
}
