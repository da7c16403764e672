//! `GET /metrics`: the exposition parses with the official Prometheus client's parser
//! (scripts/interop/parse_metrics.py), and its numbers follow what the server did: requests by
//! route template and status, a job by method and status with its stage durations, tokens and
//! token latencies of a completion, and the loaded model.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{tiny, TestApp};
use serde_json::{json, Value};

/// The samples of an exposition, as the reference parser reads them.
fn parse(exposition: &str) -> Vec<Value> {
    let script = common::repo_root().join("scripts/interop/parse_metrics.py");
    let mut child = Command::new(common::python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{exposition}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Value], name: &str, labels: Value) -> f64 {
    let matching: Vec<&Value> = samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| {
            labels
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| &s["labels"][k] == v)
        })
        .collect();
    assert_eq!(matching.len(), 1, "{name} {labels}: {matching:?}");
    matching[0]["value"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_requests_jobs_and_generation() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;

    let (status, job) = app
        .post_json(
            "/v1/jobs",
            &json!({"model": "tiny", "method": "rtn", "params": {"bits": 4, "group_size": 32}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let done = app.wait_job(id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for _ in 0..2 {
        let (status, _) = app.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200);
    }
    let (status, _) = app.get_json("/no/such/route").await;
    assert_eq!(status, 404);

    let max_tokens = 6;
    let (status, r) = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "hello world", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let prompt_tokens = r["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(r["usage"]["completion_tokens"], max_tokens);

    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    assert!(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .all(|l| l.starts_with("quantd_")),
        "every metric carries the quantd_ prefix:\n{text}"
    );
    let s = parse(&text);

    // Requests by route template (one series for every job id) and status.
    let jobs_route = json!({"route": "/v1/jobs/{id}", "method": "GET", "status": "200"});
    assert!(value(&s, "quantd_http_requests_total", jobs_route) >= 2.0);
    let posted = json!({"route": "/v1/jobs", "method": "POST", "status": "202"});
    assert_eq!(value(&s, "quantd_http_requests_total", posted), 1.0);
    let missing = json!({"route": "unmatched", "status": "404"});
    assert_eq!(value(&s, "quantd_http_requests_total", missing), 1.0);
    let completions = json!({"route": "/v1/completions", "method": "POST"});
    assert_eq!(
        value(
            &s,
            "quantd_http_request_duration_seconds_count",
            completions
        ),
        1.0
    );

    // The job, by method and status, and the time its stages took.
    let rtn = json!({"method": "rtn", "status": "succeeded"});
    assert_eq!(value(&s, "quantd_jobs", rtn.clone()), 1.0);
    assert_eq!(value(&s, "quantd_jobs_finished_total", rtn), 1.0);
    assert_eq!(value(&s, "quantd_job_queue_depth", json!({})), 0.0);
    for stage in ["loading", "quantizing", "writing"] {
        let labels = json!({"method": "rtn", "stage": stage});
        assert_eq!(
            value(
                &s,
                "quantd_job_stage_duration_seconds_count",
                labels.clone()
            ),
            1.0,
            "{stage}"
        );
        let mut inf = labels.clone();
        inf["le"] = json!("+Inf");
        assert_eq!(
            value(&s, "quantd_job_stage_duration_seconds_bucket", inf),
            1.0
        );
        assert!(value(&s, "quantd_job_stage_duration_seconds_sum", labels) >= 0.0);
    }

    // Tokens and latencies of the one completion: a first token, then max_tokens − 1 gaps.
    let model = |extra: Value| {
        let mut l = json!({"model": "tiny"});
        l.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        l
    };
    assert_eq!(
        value(&s, "quantd_tokens_total", model(json!({"direction": "in"}))),
        prompt_tokens
    );
    assert_eq!(
        value(
            &s,
            "quantd_tokens_total",
            model(json!({"direction": "out"}))
        ),
        max_tokens as f64
    );
    assert_eq!(
        value(
            &s,
            "quantd_time_to_first_token_seconds_count",
            model(json!({}))
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "quantd_inter_token_latency_seconds_count",
            model(json!({}))
        ),
        (max_tokens - 1) as f64
    );
    assert_eq!(value(&s, "quantd_models_loaded", json!({})), 1.0);
    assert!(value(&s, "quantd_model_weight_bytes", model(json!({}))) > 0.0);
    assert_eq!(
        value(&s, "quantd_model_running_sequences", model(json!({}))),
        0.0
    );
}
