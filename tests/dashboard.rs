//! The dashboard in headless Chromium (Debian's, driven by scripts/interop/dashboard_browser.py
//! through Playwright): the overview loads with no console error and no failed request, its
//! trade-off charts hold one point per evaluated variant of the base, a running SmolLM2 job's
//! progress bar advances live over SSE to the end, and a job page draws one bar per quantized
//! tensor beside its log. Also, without a browser: keys gate the pages behind a sign-in whose
//! cookie can read but not write.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{tiny, TestApp};
use serde_json::{json, Value};

fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    assert!(
        path.exists(),
        "Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)"
    );
    path
}

async fn browse(app: &TestApp, args: &[String]) -> Value {
    let (python, script, url) = (
        common::python(),
        common::repo_root().join("scripts/interop/dashboard_browser.py"),
        app.addr.clone(),
    );
    let mut all = vec![
        script.display().to_string(),
        "--url".into(),
        url,
        "--chromium".into(),
        chromium().display().to_string(),
    ];
    all.extend_from_slice(args);
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(all).output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "browser script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn job(app: &TestApp, body: Value) -> String {
    let (status, job) = app.post_json("/v1/jobs", &body).await;
    assert_eq!(status, 202, "{body} → {job}");
    job["id"].as_str().unwrap().to_string()
}

fn strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_charts_every_evaluated_variant_and_follows_a_running_job() {
    let app = TestApp::spawn().await;
    tiny::upload(&app, "tiny").await;
    let ds = app
        .post_dataset(&common::corpus("eval-pride-and-prejudice.txt", 9000))
        .await;
    let eval = json!({"dataset": ds, "ctx": 64, "max_tokens": 124, "speed": false});
    let mut evaluated = Vec::new();
    for params in [
        json!({"method": "gguf", "params": {"type": "Q8_0"}}),
        json!({"method": "gguf", "params": {"type": "Q4_0"}}),
        json!({"method": "rtn", "params": {"bits": 4, "group_size": 32}}),
        json!({"method": "rtn", "params": {"bits": 3, "group_size": 32}}),
    ] {
        let mut body = params.clone();
        body["model"] = json!("tiny");
        body["eval"] = eval.clone();
        evaluated.push(job(&app, body).await);
    }
    // A variant with no evaluation is listed but has no point to draw.
    let plain = job(
        &app,
        json!({"model": "tiny", "method": "rtn", "params": {"bits": 8, "group_size": 32}}),
    )
    .await;
    let mut variant_ids = Vec::new();
    for id in evaluated.iter().chain([&plain]) {
        let j = app.wait_job(id, Duration::from_secs(120)).await;
        assert_eq!(j["status"], "succeeded", "{j}");
        variant_ids.push(j["output_model"].as_str().unwrap().to_string());
    }

    // A SmolLM2 evaluation long enough to watch: its progress counts scored windows.
    let (status, base) = app
        .upload(&common::fixture_files("hf-f16"), Some("smollm2"))
        .await;
    assert_eq!(status, 201, "{base}");
    let running = job(
        &app,
        json!({"model": "smollm2", "method": "eval", "params": {"reference": "smollm2"},
               "eval": {"dataset": ds, "ctx": 128, "max_tokens": 1536, "speed": false}}),
    )
    .await;

    let seen = browse(&app, &["--watch-job".into(), running.clone()]).await;
    assert_eq!(seen["console_errors"], json!([]), "{seen}");
    assert_eq!(seen["page_errors"], json!([]), "{seen}");
    assert_eq!(seen["bad_requests"], json!([]), "{seen}");
    assert_eq!(seen["title"], "dashboard · quantd");

    let bases = seen["bases"].as_array().unwrap();
    let tiny = bases
        .iter()
        .find(|b| b["base"] == "tiny")
        .expect("tiny's section");
    assert_eq!(tiny["charts"], 2, "KLD and Δppl against bits per weight");
    let mut expected: Vec<String> = variant_ids[..4].to_vec();
    expected.sort();
    for chart in tiny["points"].as_array().unwrap() {
        assert_eq!(strings(chart), expected, "one point per evaluated variant");
    }
    let mut listed = variant_ids.clone();
    listed.sort();
    assert_eq!(
        strings(&tiny["variants"]),
        listed,
        "every variant in the table"
    );

    // The running job: shown live, and its bar moved forward through at least three values
    // before the page saw it succeed.
    assert_eq!(seen["live"], true, "{seen}");
    let samples = seen["progress_samples"].as_array().unwrap();
    let values: Vec<f64> = samples
        .iter()
        .map(|s| s["value"].as_f64().unwrap())
        .collect();
    assert!(
        values.windows(2).all(|w| w[1] >= w[0]),
        "progress never goes back: {samples:?}"
    );
    let distinct = {
        let mut v = values.clone();
        v.dedup();
        v.len()
    };
    assert!(distinct >= 3, "progress advanced in steps: {samples:?}");
    eprintln!("progress the page showed: {values:?}");
    let last = samples.last().unwrap();
    assert_eq!(last["status"], "succeeded", "{samples:?}");
    assert_eq!(last["value"], last["max"], "{samples:?}");

    // A quantization job's page: one bar per tensor it quantized, and its log.
    let (_, q8) = app.get_json(&format!("/v1/jobs/{}", evaluated[0])).await;
    let page = browse(&app, &["--job-page".into(), evaluated[0].clone()]).await;
    assert_eq!(page["console_errors"], json!([]), "{page}");
    assert_eq!(page["bad_requests"], json!([]), "{page}");
    let reported = q8["metrics"]["tensors"]
        .as_array()
        .expect("per-tensor report")
        .len();
    let bars = page["job_page"]["bars"].as_u64().unwrap() as usize;
    assert!(reported > 0);
    assert_eq!(bars, reported, "one bar per tensor the job reported");
    let log = page["job_page"]["log"].as_str().unwrap();
    assert!(log.contains("stage") && log.contains("done"), "{log}");
    assert_eq!(page["job_page"]["status"], "succeeded");
    app.stop().await;
}

#[tokio::test]
async fn keys_put_the_pages_behind_a_sign_in_whose_cookie_only_reads() {
    const KEY: &str = "sk-dashboard-admin";
    let app = TestApp::spawn_with(|s| {
        s.auth.admin_keys = vec![KEY.into()];
        s.auth.infer_keys = vec!["sk-dashboard-infer".into()];
    })
    .await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("action=\"/ui/login\""));

    let wrong = plain
        .post(app.url("/ui/login"))
        .form(&[("key", "sk-dashboard-infer")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        wrong.status(),
        401,
        "an infer key does not open the dashboard"
    );
    assert!(wrong.headers().get("set-cookie").is_none());

    let ok = plain
        .post(app.url("/ui/login"))
        .form(&[("key", KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();

    let page = plain
        .get(app.url("/"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<h1>Models</h1>"));
    let read = plain
        .get(app.url("/v1/jobs"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(
        read.status(),
        200,
        "the page's event streams read with the cookie"
    );
    let write = plain
        .post(app.url("/v1/jobs"))
        .header("cookie", &pair)
        .json(&json!({"model": "x", "method": "rtn"}))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 401, "a cookie never authorizes a change");
    app.stop().await;
}
