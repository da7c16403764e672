//! Several `quantd serve` processes on one PostgreSQL (a real server, see common::postgres) and
//! one S3-compatible store (moto's server, see common::s3) or one shared data directory: API
//! replicas and worker replicas, a worker killed with SIGKILL
//! (its job comes back when the lease expires and finishes on another worker), a worker frozen
//! with SIGSTOP past its lease (fenced: it publishes nothing when it wakes), a queue of 100
//! jobs drained by three workers exactly once, and a second process refused on a SQLite data
//! directory that one already uses.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::fixture;
use common::process::{self, free_port, ServerProcess};
use serde_json::{json, Value};

#[test]
fn a_killed_worker_s_job_finishes_on_another_worker_and_any_api_replica_serves_it() {
    // PostgreSQL and an S3-compatible store; no disk shared between the replicas.
    let cluster = Cluster::on_s3();
    let api1 = cluster.start("api", None);
    let api2 = cluster.start("api", None);
    let worker1 = cluster.start("worker", None);
    // A worker answers only its probes.
    let r = client()
        .get(format!("{}/v1/models", worker1.base))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(get(&worker1, "/ready")["role"], "worker");
    assert_eq!(get(&api1, "/ready")["database_backend"], "postgres");

    curl_upload(&api1, &smol_dir(), "smol");
    let (status, submitted) = post(
        &api1,
        "/v1/jobs",
        &json!({"model": "smol", "method": "gguf", "params": {"type": "Q4_K_M"}}),
    );
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap().to_string();
    // A subscriber on the other API replica, following the job live from its start.
    let follower = std::thread::spawn({
        let (base, id) = (api2.base.clone(), id.clone());
        move || events_at(&base, &id)
    });
    wait_quantizing(&api2, &id);
    stop(worker1); // SIGKILL

    let worker2 = cluster.start("worker", None);
    let done = wait_terminal(&api2, &id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "the killed run counts as an attempt");

    // The other API replica has the whole history: the re-queue and one outcome.
    let history = events(&api2, &id);
    let kinds: Vec<&str> = history.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        history
            .iter()
            .any(|(k, d)| k == "log" && d["message"].as_str().unwrap_or("").contains("re-queued")),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "done").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"done"));

    // The live subscriber saw the same: both runs' stages, the re-queue, one outcome, last.
    let live = follower.join().unwrap();
    let live_kinds: Vec<&str> = live.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        live_kinds.iter().filter(|k| **k == "stage").count() >= 4,
        "{live_kinds:?}"
    );
    assert!(live_kinds.contains(&"log"), "{live_kinds:?}");
    assert_eq!(live_kinds.last(), Some(&"done"), "{live_kinds:?}");
    assert_eq!(live.last().unwrap().1["output_model"], done["output_model"]);

    // ... and serves the artifact: a GGUF the reference reader opens, with the base's tensors.
    let out = done["output_model"].as_str().unwrap();
    let bytes = client()
        .get(format!(
            "{}/v1/models/{out}/artifacts/{}.gguf",
            api2.base,
            out.replace(':', "-")
        ))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let file = cluster.data.path().join("downloaded.gguf");
    std::fs::write(&file, &bytes).unwrap();
    let names = gguf_tensor_names(&file);
    std::fs::remove_file(&file).unwrap();
    let expected = gguf_tensor_names(
        &fixture().join("gguf").join(
            std::fs::read_dir(fixture().join("gguf"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .find(|n| n.to_string_lossy().ends_with(".gguf"))
                .expect("the fixture has a GGUF"),
        ),
    );
    assert_eq!(names, expected);
    assert_eq!(
        cluster.objects(),
        referenced_digests(&api1),
        "the store holds exactly the models' files"
    );
    for p in [api1, api2, worker2] {
        stop(p);
    }
}

#[test]
fn a_frozen_worker_that_lost_its_lease_publishes_nothing_when_it_wakes() {
    let cluster = Cluster::new();
    let api = cluster.start("api", None);
    let frozen_log = cluster.data.path().join("frozen.log");
    let frozen = cluster.start("worker", Some(&frozen_log));
    curl_upload(&api, &smol_dir(), "smol");
    let (_, submitted) = post(
        &api,
        "/v1/jobs",
        &json!({"model": "smol", "method": "gguf", "params": {"type": "Q4_K_M"}}),
    );
    let id = submitted["id"].as_str().unwrap().to_string();
    wait_quantizing(&api, &id);
    signal(&frozen, "STOP");

    // Another worker takes the job once the lease has expired, and finishes it.
    let taker = cluster.start("worker", None);
    let done = wait_terminal(&api, &id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);

    // The frozen worker wakes up, finds its lease gone and stops without writing anything.
    signal(&frozen, "CONT");
    wait_until(
        "the woken worker to notice",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&frozen_log)
                .unwrap()
                .contains("lease lost")
                .then_some(Value::Null)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = job(&api, &id);
    assert_eq!(after["status"], "succeeded");
    assert_eq!(after["finished_at"], done["finished_at"]);
    assert_eq!(
        after["worker"],
        get(&taker, "/ready")["replica"],
        "the outcome is the taker's"
    );
    let history = events(&api, &id);
    let kinds: Vec<&str> = history.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "done").count(),
        1,
        "{kinds:?}"
    );
    let models: Vec<String> = get(&api, "/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, ["smol", "smol:q4_k_m"], "exactly one output model");
    assert_eq!(
        blob_files(cluster.data.path()),
        referenced_digests(&api),
        "exactly one set of files"
    );
    assert!(
        get(&frozen, "/ready")["status"] == "ready",
        "the woken worker lives on"
    );
    for p in [api, frozen, taker] {
        stop(p);
    }
}

/// Submits 100 small jobs through `api` and waits for them: every one succeeds on its first
/// attempt with its complete event history, and 100 models appear. Prints the throughput and
/// how the jobs spread over the workers (the README's queue numbers come from here).
fn drain_100_jobs(api: &ServerProcess, setup: &str) {
    let model = tempfile::tempdir().unwrap();
    common::tiny::write_model(model.path());
    curl_upload(api, model.path(), "tiny");
    let began = Instant::now();
    let ids: Vec<String> = (0..100)
        .map(|n| {
            let (status, j) = post(
                api,
                "/v1/jobs",
                &json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"},
                        "output_name": format!("tiny:n{n}")}),
            );
            assert_eq!(status, 202, "{j}");
            j["id"].as_str().unwrap().to_string()
        })
        .collect();
    let submitted = began.elapsed();
    let mut owners = BTreeMap::<String, usize>::new();
    for id in &ids {
        let j = wait_terminal(api, id, Duration::from_secs(600));
        assert_eq!(j["status"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1, "run once: {j}");
        *owners
            .entry(j["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let elapsed = began.elapsed();
    for id in &ids {
        let history = events(api, id);
        let kinds: Vec<&str> = history.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "stage").count(),
            3,
            "loading, quantizing, writing: {kinds:?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "done").count(),
            1,
            "{kinds:?}"
        );
        assert_eq!(kinds.last(), Some(&"done"));
    }
    println!(
        "queue of 100 jobs, {setup}: submitted in {:.2} s, drained in {:.2} s ({:.1} jobs/s); \
         jobs per replica: {:?}",
        submitted.as_secs_f64(),
        elapsed.as_secs_f64(),
        100.0 / elapsed.as_secs_f64(),
        owners.values().collect::<Vec<_>>()
    );
    let models = get(api, "/v1/models")["data"].as_array().unwrap().len();
    assert_eq!(models, 101, "every job published exactly one model");
}

#[test]
fn a_queue_of_100_jobs_drains_exactly_once_across_three_workers() {
    let cluster = Cluster::new();
    let api = cluster.start("api", None);
    let workers: Vec<ServerProcess> = (0..3).map(|_| cluster.start("worker", None)).collect();
    drain_100_jobs(&api, "PostgreSQL, 3 worker replicas");
    workers.into_iter().for_each(stop);
    stop(api);
}

/// The same queue with one worker on PostgreSQL, and on SQLite with one and three workers in
/// the one process SQLite allows: the side-by-side numbers.
#[test]
fn the_same_queue_drains_with_one_worker_on_postgres_and_on_sqlite() {
    let cluster = Cluster::new();
    let api = cluster.start("api", None);
    let worker = cluster.start("worker", None);
    drain_100_jobs(&api, "PostgreSQL, 1 worker replica");
    stop(worker);
    stop(api);
    for workers in ["1", "3"] {
        let data = tempfile::tempdir().unwrap();
        let env = [
            ("QUANTD_JOBS__WORKERS", workers),
            ("QUANTD_JOBS__PROGRESS_INTERVAL_MS", "50"),
        ];
        let single = process::start(data.path(), free_port(), &env, Stdio::null(), Stdio::null());
        drain_100_jobs(
            &single,
            &format!("SQLite, one process with {workers} worker(s)"),
        );
        stop(single);
    }
}

#[test]
fn a_second_process_on_one_sqlite_data_directory_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let first = process::start(data.path(), free_port(), &[], Stdio::null(), Stdio::null());
    let model = tempfile::tempdir().unwrap();
    common::tiny::write_model(model.path());
    curl_upload(&first, model.path(), "tiny");
    let (_, queued) = post(
        &first,
        "/v1/jobs",
        &json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}}),
    );

    let second = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("serve")
        .env("QUANTD_DATA_DIR", data.path())
        .env("QUANTD_SERVER__PORT", free_port().to_string())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another quantd process")
            && stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );

    // The first one keeps its jobs.
    let id = queued["id"].as_str().unwrap();
    let j = wait_terminal(&first, id, Duration::from_secs(120));
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 1);
    stop(first);
}
