//! The CLI client against a live server: `upload` (blobs, then the model; a rerun resends
//! nothing), `models`, `jobs submit --watch`, `jobs list`, `jobs watch`, `jobs cancel`, `chat`
//! from piped input, with keys from the environment, and refusals that exit non-zero with the
//! server's message and field.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{tiny, TestApp};
use serde_json::Value;

const KEY: &str = "sk-cli-test";

/// Runs `quantd ARGS` against `url` with the key in QUANTD_API_KEY, feeding `stdin`.
async fn quantd(url: &str, args: &[&str], stdin: &str) -> Output {
    let (url, args, stdin) = (
        url.to_string(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        stdin.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quantd"))
            .args(&args)
            .env("QUANTD_URL", &url)
            .env("QUANTD_API_KEY", KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
}

fn json(o: &Output) -> Value {
    serde_json::from_str(ok(o).trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_uploads_runs_jobs_and_chats_against_a_live_server() {
    let app = TestApp::spawn_with(|s| s.auth.admin_keys = vec![KEY.into()]).await;
    let url = app.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path());
    let folder = dir.path().to_str().unwrap();

    let model = json(&quantd(&url, &["upload", folder, "--name", "tiny", "--json"], "").await);
    assert_eq!(model["id"], "tiny", "{model}");
    // Every blob is on the server now: a second upload under another name sends no file.
    let again = quantd(&url, &["upload", folder, "--name", "tiny2"], "").await;
    assert!(ok(&again).contains("created tiny2"));
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("uploading"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let table = ok(&quantd(&url, &["models"], "").await);
    assert!(table.starts_with("MODEL"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("tiny2 ")), "{table}");
    let list = json(&quantd(&url, &["models", "--json"], "").await);
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");

    // Submit and follow to the end; the exit status says it succeeded.
    let args = [
        "jobs",
        "submit",
        "--model",
        "tiny",
        "--method",
        "rtn",
        "--params",
        r#"{"bits": 4, "group_size": 32}"#,
        "--watch",
    ];
    let watched = ok(&quantd(&url, &args, "").await);
    assert!(
        watched.contains("succeeded: tiny:rtn-4bit-g32"),
        "{watched}"
    );
    let jobs = json(&quantd(&url, &["jobs", "list", "--json"], "").await);
    let job = &jobs["data"][0];
    assert_eq!(job["status"], "succeeded", "{jobs}");
    let id = job["id"].as_str().unwrap();
    let table = ok(&quantd(&url, &["jobs", "list"], "").await);
    assert!(table.lines().nth(1).unwrap().starts_with(id), "{table}");

    // Watching a finished job replays its events as JSON lines, ending with `done`.
    let events = ok(&quantd(&url, &["jobs", "watch", id, "--json"], "").await);
    let last: Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{events}");
    assert!(events.lines().any(|l| l.contains("\"stage\"")), "{events}");

    // Cancelling a finished job is refused with the server's reason, non-zero.
    let refused = quantd(&url, &["jobs", "cancel", id], "").await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("409"), "{err}");

    // A bad parameter names the field.
    let bad = quantd(
        &url,
        &[
            "jobs",
            "submit",
            "--model",
            "tiny",
            "--method",
            "rtn",
            "--params",
            r#"{"bits": 9}"#,
        ],
        "",
    )
    .await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("params.bits"), "{err}");

    // Turns from piped input carry the conversation; `/exit` ends it. --json prints whole
    // responses, one line each.
    let turns = ok(&quantd(
        &url,
        &[
            "chat",
            "tiny",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        ],
        "hello\nand again\n/exit\nnot sent\n",
    )
    .await);
    let answers: Vec<Value> = turns
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{turns}");
    assert_eq!(answers[0]["usage"]["completion_tokens"], 5);
    let prompt = |i: usize| answers[i]["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt(1) > prompt(0) + 5,
        "the second turn sees the first: {turns}"
    );
    // Streamed, the greedy answer is the same text, then a newline.
    let streamed = ok(&quantd(
        &url,
        &["chat", "tiny", "--max-tokens", "5", "--temperature", "0"],
        "hello\n",
    )
    .await);
    let content = answers[0]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(streamed, format!("{content}\n"));

    // Without the key: refused, with the server's message.
    let denied = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_quantd"))
                .args(["models", "--url", &url])
                .env_remove("QUANTD_API_KEY")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("401"));
}
