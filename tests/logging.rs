//! The server's log as an operator reads it: written to a file it holds no ANSI colour codes,
//! and with `log_format = "json"` every line is one JSON object, the lines of a request carry
//! its `request_id` and the lines of a job its `job_id`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::process::{self, free_port, ServerProcess};
use serde_json::{json, Value};

/// Stops the child when a test ends, passing or not.
struct Server(ServerProcess);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// `quantd serve` with stdout and stderr sent to `log`, so stdout is not a terminal.
fn start_server(data_dir: &Path, log: &Path, format: &str) -> Server {
    let out = std::fs::File::create(log).unwrap();
    let env = [("QUANTD_LOG_FORMAT", format)];
    let stdout = Stdio::from(out.try_clone().unwrap());
    Server(process::start(
        data_dir,
        free_port(),
        &env,
        stdout,
        Stdio::from(out),
    ))
}

/// Uploads a tiny random model and runs a Q8_0 job on it to the end; returns the job id.
fn upload_and_quantize(server: &Server, work: &Path) -> String {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let dir = work.join("tiny");
    common::tiny::write_model(&dir);
    let mut form = reqwest::blocking::multipart::Form::new().text("name", "tiny");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        form = form.file(name, &path).unwrap();
    }
    let r = client
        .post(format!("{}/v1/models", server.0.base))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    let job: Value = client
        .post(format!("{}/v1/jobs", server.0.base))
        .json(&json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = job["id"].as_str().expect("job id").to_string();
    let began = Instant::now();
    loop {
        let j: Value = client
            .get(format!("{}/v1/jobs/{id}", server.0.base))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if j["status"] == "succeeded" {
            return id;
        }
        assert!(
            !matches!(j["status"].as_str(), Some("failed" | "cancelled")),
            "{j}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "job did not end: {j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the server and gives back what it wrote.
fn stop_and_read(server: Server, log: &Path) -> Vec<u8> {
    drop(server);
    std::fs::read(log).unwrap()
}

#[test]
fn a_log_written_to_a_file_has_no_colour_codes() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("quantd.log");
    let server = start_server(&data.path().join("data"), &log, "text");
    upload_and_quantize(&server, data.path());
    let bytes = stop_and_read(server, &log);
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("job succeeded"), "{text}");
    assert!(
        !bytes.contains(&0x1b),
        "ESC bytes in a log written to a file:\n{text}"
    );
}

/// The value of `field` in the innermost span of a JSON log line that has it.
fn span_field<'a>(line: &'a Value, field: &str) -> Option<&'a str> {
    line["spans"]
        .as_array()?
        .iter()
        .rev()
        .find_map(|span| span[field].as_str())
}

#[test]
fn json_lines_carry_the_request_and_job_they_belong_to() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("quantd.log");
    let server = start_server(&data.path().join("data"), &log, "json");
    let job_id = upload_and_quantize(&server, data.path());
    let bytes = stop_and_read(server, &log);
    let text = String::from_utf8(bytes).expect("UTF-8 log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["timestamp"].is_string() && l["level"].is_string()));

    // Every access line is inside a request span with an id (a UUID unless the client sent one).
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "finished processing request")
        .collect();
    assert!(requests.len() >= 3, "access lines: {text}");
    for line in &requests {
        let id = span_field(line, "request_id").unwrap_or_else(|| panic!("no request_id: {line}"));
        assert_eq!(id.len(), 36, "{line}");
    }

    // The job's own lines (start, end) carry its id.
    for message in ["job started", "job succeeded"] {
        let line = lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line: {text}"));
        assert_eq!(span_field(line, "job_id"), Some(job_id.as_str()), "{line}");
    }
}
