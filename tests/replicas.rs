//! Several `quantd serve` processes on one PostgreSQL (a real server, see common::postgres) and
//! one shared data directory: API replicas and worker replicas, a worker killed with SIGKILL
//! (its job comes back when the lease expires and finishes on another worker), a worker frozen
//! with SIGSTOP past its lease (fenced: it publishes nothing when it wakes), a queue of 100
//! jobs drained by three workers exactly once, and a second process refused on a SQLite data
//! directory that one already uses.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::PgServer;
use common::process::{self, free_port, ServerProcess};
use common::{fixture, stored_files};
use serde_json::{json, Value};

/// Short leases, so an expired one is seen within seconds.
const LEASE_SECS: &str = "2";

struct Cluster {
    database_url: String,
    data: tempfile::TempDir,
    _pg: PgServer,
}

impl Cluster {
    fn new() -> Self {
        let pg = PgServer::get();
        Self {
            database_url: pg.create_database_blocking(),
            data: tempfile::tempdir().unwrap(),
            _pg: pg,
        }
    }

    /// A replica with `role`; its log goes to `log` (when given).
    fn start(&self, role: &str, log: Option<&Path>) -> ServerProcess {
        let out = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let env = [
            ("QUANTD_DATABASE_URL", self.database_url.as_str()),
            ("QUANTD_ROLE", role),
            ("QUANTD_JOBS__LEASE_SECS", LEASE_SECS),
            ("QUANTD_JOBS__WORKERS", "1"),
            ("QUANTD_JOBS__PROGRESS_INTERVAL_MS", "50"),
        ];
        process::start(self.data.path(), free_port(), &env, out, Stdio::null())
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn get(s: &ServerProcess, path: &str) -> Value {
    client()
        .get(format!("{}{path}", s.base))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn post(s: &ServerProcess, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.base))
        .json(body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

/// Uploads an HF folder with curl, the way users do.
fn curl_upload(s: &ServerProcess, dir: &Path, name: &str) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "-o", "/dev/null"])
        .arg("-F")
        .arg(format!("name={name}"));
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        cmd.arg("-F").arg(format!("{f}=@{}", dir.join(f).display()));
    }
    let status = cmd.arg(format!("{}/v1/models", s.base)).status().unwrap();
    assert!(status.success(), "curl upload of {name} failed");
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job(s: &ServerProcess, id: &str) -> Value {
    get(s, &format!("/v1/jobs/{id}"))
}

fn wait_terminal(s: &ServerProcess, id: &str, timeout: Duration) -> Value {
    wait_until(&format!("job {id} to end"), timeout, || {
        let j = job(s, id);
        matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    })
}

/// Waits until the job is quantizing with some tensors done.
fn wait_quantizing(s: &ServerProcess, id: &str) {
    wait_until("the job to be quantizing", Duration::from_secs(120), || {
        let j = job(s, id);
        (j["status"] == "running"
            && j["stage"] == "quantizing"
            && j["progress"]["done"].as_u64().unwrap_or(0) > 0)
            .then_some(j)
    });
}

/// The SSE stream of a finished job: (event kind, data) in order.
fn events(s: &ServerProcess, id: &str) -> Vec<(String, Value)> {
    let text = client()
        .get(format!("{}/v1/jobs/{id}/events", s.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let mut out = Vec::new();
    let mut kind = String::new();
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((kind.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

fn signal(p: &ServerProcess, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(p.child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

fn stop(mut p: ServerProcess) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// Digests (hex) of every file of every model.
fn referenced_digests(s: &ServerProcess) -> BTreeSet<String> {
    let mut referenced = BTreeSet::new();
    for m in get(s, "/v1/models")["data"].as_array().unwrap() {
        let detail = get(s, &format!("/v1/models/{}", m["id"].as_str().unwrap()));
        for f in detail["files"].as_array().unwrap() {
            let d = f["digest"].as_str().unwrap().trim_start_matches("sha256:");
            referenced.insert(d.to_string());
        }
    }
    referenced
}

fn blob_files(data: &Path) -> BTreeSet<String> {
    stored_files(data)
        .iter()
        .map(|p| {
            assert!(
                p.starts_with(data.join("blobs")),
                "leftover temp file {}",
                p.display()
            );
            p.file_name().unwrap().to_str().unwrap().to_string()
        })
        .collect()
}

/// Tensor names of a GGUF file, read by the reference `gguf` package.
fn gguf_tensor_names(path: &Path) -> BTreeSet<String> {
    let python = std::env::var("QUANTD_PYTHON").expect("QUANTD_PYTHON (scripts/test.sh sets it)");
    let out = Command::new(python)
        .args([
            "-c",
            "import sys, gguf\nfor t in gguf.GGUFReader(sys.argv[1]).tensors: print(t.name)",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf reader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn smol_dir() -> PathBuf {
    fixture().join("hf-f16")
}

#[test]
fn a_killed_worker_s_job_finishes_on_another_worker_and_any_api_replica_serves_it() {
    let cluster = Cluster::new();
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
        blob_files(cluster.data.path()),
        referenced_digests(&api1),
        "one set of files"
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
