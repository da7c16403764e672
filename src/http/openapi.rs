//! The OpenAPI 3.1 description of the API, generated from the handlers' `#[utoipa::path]`
//! annotations and the wire types' `ToSchema` derives, served at `GET /openapi.json` and
//! committed as `openapi.json` (a test fails when the two drift). A leaf: handlers take their
//! shared wire types from `wire`, never from here.

use axum::Json;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{blobs, datasets, health, inference, jobs, metrics, models};
use crate::jobs::spec;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "quantd",
        description = "Quantize language-model checkpoints, measure what each variant lost, \
            and serve the variants through an OpenAI-compatible API. Every route under /v1 \
            needs `Authorization: Bearer <key>` when keys are configured; errors carry \
            `{\"error\": {message, type, param, code}}`, with `param` naming the field at fault."
    ),
    paths(
        health::health,
        health::ready,
        metrics::metrics,
        serve_openapi,
        blobs::head_blob,
        blobs::put_blob,
        models::create_model,
        models::list_models,
        models::get_model,
        models::delete_model,
        models::list_variants,
        models::list_artifacts,
        models::download_artifact,
        jobs::create_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::cancel_job,
        jobs::retry_job,
        jobs::job_events,
        datasets::create_dataset,
        datasets::list_datasets,
        datasets::get_dataset,
        datasets::delete_dataset,
        inference::completions::completions,
        inference::chat::chat_completions,
        inference::manage::load_model,
        inference::manage::unload_model,
        inference::manage::engine_stats,
    ),
    // The per-method parameter schemas `JobRequest.params` refers to (by `method`).
    components(schemas(
        spec::GgufParams,
        spec::RtnParams,
        spec::GptqParams,
        spec::AwqParams,
        spec::Int8DynamicParams,
        spec::LlmInt8Params,
        spec::Bnb4Params,
        spec::EvalMethodParams,
    )),
    modifiers(&BearerKeys, &Links),
    security(("bearer" = [])),
    tags(
        (name = "models", description = "Uploads, the catalog, variants and their files"),
        (name = "jobs", description = "Quantization and evaluation jobs, with live progress"),
        (name = "datasets", description = "Texts for calibration and evaluation"),
        (name = "inference", description = "OpenAI-compatible completions, and the engine"),
        (name = "service", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

/// Declares the bearer-key scheme the document's `security` refers to, and adds the answers
/// of the key check (401 without a valid key, 403 for an `infer` key on an admin route) to
/// every operation that needs a key.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let refused = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in api.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.head,
            ]
            .into_iter()
            .flatten()
            {
                // Public operations override the document's security (with `[{}]`).
                if op.security.is_some() {
                    continue;
                }
                let responses = &mut op.responses.responses;
                responses.entry("401".into()).or_insert_with(|| {
                    refused("no key, or an unknown one (when keys are configured)").into()
                });
                responses.entry("403".into()).or_insert_with(|| {
                    refused("an `infer` key on a route that needs `admin`").into()
                });
            }
        }
    }
}

/// OpenAPI links from each operation that creates something to the operations that take its
/// id, so clients (and schemathesis' stateful phase) can follow a real id from one call to the
/// next: a new job to its get, cancel, retry and events; a dataset to get and delete; a model
/// to get, artifacts and variants; a blob to its HEAD.
struct Links;

impl Modify for Links {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::link::LinkBuilder;
        use utoipa::openapi::RefOr;

        let created: [(&str, &str, &str, &[&str]); 4] = [
            (
                "/v1/jobs",
                "202",
                "id",
                &["get_job", "cancel_job", "retry_job", "job_events"],
            ),
            (
                "/v1/datasets",
                "201",
                "id",
                &["get_dataset", "delete_dataset"],
            ),
            (
                "/v1/models",
                "201",
                "id",
                &["get_model", "list_artifacts", "list_variants"],
            ),
            ("/v1/blobs/{digest}", "201", "digest", &["head_blob"]),
        ];
        for (path, status, field, targets) in created {
            let Some(item) = api.paths.paths.get_mut(path) else {
                continue;
            };
            let op = if path.starts_with("/v1/blobs") {
                item.put.as_mut()
            } else {
                item.post.as_mut()
            };
            let Some(RefOr::T(response)) = op.and_then(|op| op.responses.responses.get_mut(status))
            else {
                continue;
            };
            for target in targets {
                let link = LinkBuilder::new()
                    .operation_id(*target)
                    .parameter(field, format!("$response.body#/{field}"))
                    .build();
                response.links.insert(target.to_string(), link.into());
            }
        }
    }
}

/// The document, with the running version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut api = ApiDoc::openapi();
    api.info.version = env!("CARGO_PKG_VERSION").to_string();
    api
}

/// The document as JSON, as served and committed. utoipa 5.5 writes a link's fields in snake
/// case (`operation_id`), which no OpenAPI reader knows, so they get OpenAPI's names here.
pub fn document_value() -> Value {
    let mut doc = serde_json::to_value(document()).expect("the OpenAPI document serializes");
    name_link_fields(&mut doc);
    doc
}

fn name_link_fields(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Object(links)) = map.get_mut("links") {
                for link in links.values_mut().filter_map(Value::as_object_mut) {
                    for (from, to) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                        ("request_body", "requestBody"),
                    ] {
                        if let Some(x) = link.remove(from) {
                            link.insert(to.into(), x);
                        }
                    }
                }
            }
            map.values_mut().for_each(name_link_fields);
        }
        Value::Array(items) => items.iter_mut().for_each(name_link_fields),
        _ => {}
    }
}

/// The document as the committed `openapi.json` holds it (pretty, newline-terminated).
pub fn document_json() -> String {
    let mut text =
        serde_json::to_string_pretty(&document_value()).expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)))]
pub async fn serve_openapi() -> Json<Value> {
    Json(document_value())
}
