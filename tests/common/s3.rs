//! An S3-compatible server for tests: moto's server (PyPI `moto[server]`, installed by
//! `scripts/test.sh` into `QUANTD_PYTHON`'s venv) in its own process on a free port, with one
//! bucket, killed on drop. A test that needs it fails when it cannot start; it never passes
//! without one.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    pub fn start() -> Self {
        let python = std::env::var("QUANTD_PYTHON")
            .expect("QUANTD_PYTHON: a Python with moto[server] (scripts/test.sh sets it up)");
        let port = super::process::free_port();
        let child = Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto server starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        let bucket = "quantd-test".to_string();
        let client = reqwest::blocking::Client::new();
        let began = Instant::now();
        // Creating the bucket is also the readiness probe.
        while !client
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "moto server did not start (is moto[server] installed in QUANTD_PYTHON?)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            endpoint,
            bucket,
        }
    }

    /// The `AWS_*` variables a quantd process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Keys of the objects in the bucket (ListObjectsV2, first 1000).
    pub fn keys(&self) -> Vec<String> {
        let body = reqwest::blocking::get(format!("{}/{}?list-type=2", self.endpoint, self.bucket))
            .unwrap()
            .text()
            .unwrap();
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
