//! Helpers for tests with several `quantd serve` processes (tests/replicas.rs,
//! tests/object_store.rs): a PostgreSQL database and a data directory or an S3-compatible
//! store they share, requests,
//! waiting for jobs, reading SSE histories, signals, and what is stored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::postgres::PgServer;
use super::process::{self, free_port, ServerProcess};
use super::s3::S3Server;
use super::{fixture, stored_files};

/// Short leases, so an expired one is seen within seconds.
pub const LEASE_SECS: &str = "2";

pub struct Cluster {
    pub database_url: String,
    /// The shared data directory, or (with `s3`) the parent of each replica's own cache.
    pub data: tempfile::TempDir,
    /// With an object store: the blobs live there and no disk is shared.
    pub s3: Option<S3Server>,
    replicas: AtomicUsize,
    _pg: PgServer,
}

impl Cluster {
    /// Replicas on one PostgreSQL database and one data directory.
    pub fn new() -> Self {
        let pg = PgServer::get();
        Self {
            database_url: pg.create_database_blocking(),
            data: tempfile::tempdir().unwrap(),
            s3: None,
            replicas: AtomicUsize::new(0),
            _pg: pg,
        }
    }

    /// Replicas on one PostgreSQL database and one S3-compatible store, each with its own
    /// local directory.
    pub fn on_s3() -> Self {
        Self {
            s3: Some(S3Server::start()),
            ..Self::new()
        }
    }

    /// The `storage_url` replicas use with `s3`.
    pub fn storage_url(&self) -> Option<String> {
        self.s3
            .as_ref()
            .map(|s3| format!("s3://{}/deploy-a", s3.bucket))
    }

    /// Blobs in the object store (digests, hex), from its listing.
    pub fn objects(&self) -> BTreeSet<String> {
        let s3 = self.s3.as_ref().expect("a cluster on S3");
        s3.keys()
            .into_iter()
            .map(|k| {
                k.strip_prefix("deploy-a/blobs/sha256/")
                    .unwrap_or_else(|| panic!("object outside the prefix: {k}"))
                    .to_string()
            })
            .collect()
    }

    /// A replica with `role`; its log goes to `log` (when given).
    pub fn start(&self, role: &str, log: Option<&Path>) -> ServerProcess {
        self.start_with(role, log, &[])
    }

    /// [`Cluster::start`] with more `QUANTD_*` settings.
    pub fn start_with(
        &self,
        role: &str,
        log: Option<&Path>,
        extra: &[(&str, &str)],
    ) -> ServerProcess {
        let out = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let mut env: Vec<(&str, &str)> = vec![
            ("QUANTD_DATABASE_URL", self.database_url.as_str()),
            ("QUANTD_ROLE", role),
            ("QUANTD_JOBS__LEASE_SECS", LEASE_SECS),
            ("QUANTD_JOBS__WORKERS", "1"),
            ("QUANTD_JOBS__PROGRESS_INTERVAL_MS", "50"),
        ];
        let storage_url = self.storage_url();
        let aws = self.s3.as_ref().map(S3Server::env).unwrap_or_default();
        let dir = match &storage_url {
            Some(url) => {
                env.push(("QUANTD_STORAGE_URL", url));
                env.extend(aws.iter().map(|(k, v)| (*k, v.as_str())));
                let n = self.replicas.fetch_add(1, Ordering::SeqCst);
                let own = self.data.path().join(format!("replica-{n}"));
                std::fs::create_dir_all(&own).unwrap();
                own
            }
            None => self.data.path().to_path_buf(),
        };
        env.extend_from_slice(extra);
        process::start(&dir, free_port(), &env, out, Stdio::null())
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

pub fn get(s: &ServerProcess, path: &str) -> Value {
    client()
        .get(format!("{}{path}", s.base))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

pub fn post(s: &ServerProcess, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.base))
        .json(body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

/// Uploads an HF folder with curl, the way users do.
pub fn curl_upload(s: &ServerProcess, dir: &Path, name: &str) {
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

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn job(s: &ServerProcess, id: &str) -> Value {
    get(s, &format!("/v1/jobs/{id}"))
}

pub fn wait_terminal(s: &ServerProcess, id: &str, timeout: Duration) -> Value {
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
pub fn wait_quantizing(s: &ServerProcess, id: &str) {
    wait_until("the job to be quantizing", Duration::from_secs(120), || {
        let j = job(s, id);
        (j["status"] == "running"
            && j["stage"] == "quantizing"
            && j["progress"]["done"].as_u64().unwrap_or(0) > 0)
            .then_some(j)
    });
}

/// The SSE stream of a finished job: (event kind, data) in order.
pub fn events(s: &ServerProcess, id: &str) -> Vec<(String, Value)> {
    events_at(&s.base, id)
}

/// [`events`] from the replica at `base`: for a job still running, the stream (and so this
/// call) ends with the job.
pub fn events_at(base: &str, id: &str) -> Vec<(String, Value)> {
    let text = client()
        .get(format!("{base}/v1/jobs/{id}/events"))
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

pub fn signal(p: &ServerProcess, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(p.child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

pub fn stop(mut p: ServerProcess) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// Digests (hex) of every file of every model.
pub fn referenced_digests(s: &ServerProcess) -> BTreeSet<String> {
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

pub fn blob_files(data: &Path) -> BTreeSet<String> {
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
pub fn gguf_tensor_names(path: &Path) -> BTreeSet<String> {
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

pub fn smol_dir() -> PathBuf {
    fixture().join("hf-f16")
}
