//! Shared test helpers: a server on port 0 with its own data directory, the SmolLM2 fixture,
//! tiny random Llama checkpoints made on the spot, and raw safetensors writing for malformed
//! inputs.
#![allow(dead_code)]

pub mod cluster;
pub mod models;
pub mod postgres;
pub mod process;
pub mod s3;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quantd::config::Settings;
use quantd::startup::Application;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: String,
    pub data_dir: tempfile::TempDir,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The PostgreSQL server under a `QUANTD_TEST_BACKEND=postgres` run.
    pub postgres: Option<postgres::PgServer>,
}

/// Whether this run puts the tests' servers on PostgreSQL (`QUANTD_TEST_BACKEND=postgres`;
/// `scripts/test.sh` runs the database and job tests once more that way) instead of SQLite.
pub fn on_postgres() -> bool {
    std::env::var("QUANTD_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

impl TestApp {
    /// Starts a server on 127.0.0.1:0 with defaults adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::defaults();
        settings.data_dir = data_dir.path().to_path_buf();
        settings.server.port = 0;
        settings.jobs.progress_interval_ms = 100;
        let postgres = on_postgres().then(postgres::PgServer::get);
        if let Some(pg) = &postgres {
            settings.database_url = pg.create_database().await;
        }
        tweak(&mut settings);
        let app = Application::build(settings)
            .await
            .expect("application builds");
        if postgres.is_some() {
            assert_eq!(
                app.state().jobs.db().backend(),
                quantd::db::Backend::Postgres
            );
        }
        let addr = format!("http://{}", app.local_addr());
        let shutdown = app.shutdown_token();
        let handle = tokio::spawn(app.run_until_stopped());
        Self {
            addr,
            data_dir,
            client: reqwest::Client::new(),
            shutdown,
            handle,
            postgres,
        }
    }

    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Makes the test client send `key` as a bearer token on every request, so the helpers
    /// below work against a server with keys configured.
    pub fn with_key(mut self, key: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}")
                .parse()
                .expect("a key is a header value"),
        );
        self.client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client builds");
        self
    }

    /// A handle that only knows the address (for blocking helpers such as curl).
    pub fn url_only(addr: &str) -> UrlOnly {
        UrlOnly(addr.to_string())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.addr)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        answer(self.client.get(self.url(path))).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(self.client.post(self.url(path)).json(body)).await
    }

    /// POST a raw body with a content type (datasets); returns status and JSON body.
    pub async fn post_body(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        answer(
            self.client
                .post(self.url(path))
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// Uploads `text` as a text/plain dataset; returns its id.
    pub async fn post_dataset(&self, text: &str) -> String {
        let (status, ds) = self
            .post_body("/v1/datasets", "text/plain", text.as_bytes().to_vec())
            .await;
        assert!(status == 201 || status == 200, "{ds}");
        ds["id"].as_str().unwrap().to_string()
    }

    /// PUT a blob; returns status and JSON body.
    pub async fn put_blob(&self, digest: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        answer(
            self.client
                .put(self.url(&format!("/v1/blobs/{digest}")))
                .body(body),
        )
        .await
    }

    /// GET a path and return the body as bytes (artifacts, SSE streams of finished jobs).
    pub async fn get_bytes(&self, path: &str) -> bytes::Bytes {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .bytes()
            .await
            .expect("body")
    }

    /// Uploads files as multipart fields named after them, with an optional `name` field.
    pub async fn upload(&self, paths: &[PathBuf], name: Option<&str>) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new();
        if let Some(n) = name {
            form = form.text("name", n.to_string());
        }
        for p in paths {
            let file = p.file_name().unwrap().to_str().unwrap().to_string();
            let part =
                reqwest::multipart::Part::bytes(std::fs::read(p).unwrap()).file_name(file.clone());
            form = form.part(file, part);
        }
        let r = self
            .client
            .post(self.url("/v1/models"))
            .multipart(form)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Submits a job (which must be accepted, 202) and waits for its end (see `wait_job`).
    pub async fn run_job(&self, body: &Value, timeout: Duration) -> Value {
        let (status, job) = self.post_json("/v1/jobs", body).await;
        assert_eq!(status, 202, "{body} → {job}");
        self.wait_job(job["id"].as_str().unwrap(), timeout).await
    }

    /// DELETE a path; returns the status.
    pub async fn delete(&self, path: &str) -> u16 {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    /// Polls a job until it reaches a terminal status (or panics after `timeout`).
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, job) = self.get_json(&format!("/v1/jobs/{id}")).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id} did not finish in {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every file under blobs/ and tmp/ of the data directory.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        stored_files(self.data_dir.path())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// Just the base address of a running server.
pub struct UrlOnly(String);

impl UrlOnly {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.0)
    }
}

/// Sends a request; returns the status and the JSON body (Null when the body is not JSON).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub fn stored_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![data_dir.join("blobs"), data_dir.join("tmp")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The SmolLM2 fixture laid out by scripts/fixtures/fetch-smollm2.sh (scripts/test.sh runs
/// it). Tests that need it fail loudly rather than pass without it.
pub fn fixture() -> PathBuf {
    let root = std::env::var_os("QUANTD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/quantd-fixtures")
        });
    let dir = root.join("smollm2-135m");
    assert!(
        dir.join(".complete").exists(),
        "SmolLM2 fixture missing at {}: run `bash scripts/test.sh` (it fetches it) or scripts/fixtures/fetch-smollm2.sh",
        dir.display()
    );
    dir
}

/// The files of one of the fixture's folders (`hf-f32`, `hf-f16`), sorted.
pub fn fixture_files(folder: &str) -> Vec<PathBuf> {
    let dir = fixture().join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// The Python with llama-cpp-python: QUANTD_PEER_PYTHON, or the venv scripts/test.sh makes.
pub fn peer_python() -> PathBuf {
    if let Some(p) = std::env::var_os("QUANTD_PEER_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = PathBuf::from(home).join(".cache/quantd-peers/venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with llama-cpp-python: set QUANTD_PEER_PYTHON or run scripts/test.sh"
    );
    venv
}

/// Python with `gguf`, `numpy` and `safetensors` (the fixture's venv unless QUANTD_PYTHON says).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("QUANTD_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = fixture().parent().unwrap().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with gguf: set QUANTD_PYTHON or run scripts/test.sh"
    );
    venv
}

/// The first `chars` characters of a text in tests/corpus (`usize::MAX`: all of it).
pub fn corpus(file: &str, chars: usize) -> String {
    let path = repo_root().join("tests/corpus").join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .chars()
        .take(chars)
        .collect()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a safetensors file from (name, dtype, shape, bytes).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}
