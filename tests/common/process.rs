//! The real `quantd serve` binary as a child process on a free port, for tests that kill it,
//! restart it or read what it writes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    pub child: Child,
    pub base: String,
}

/// A test that fails half-way still stops its servers (an already stopped one is left as is).
impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `quantd serve` on `port` with its data in `data_dir`, one job thread, the extra
/// `QUANTD_*` settings in `env`, and its output sent to `stdout`/`stderr`; returns once
/// `/ready` answers 200. `NO_COLOR` and `RUST_LOG` are cleared, so what it logs does not depend
/// on the environment the tests run in.
pub fn start(
    data_dir: &Path,
    port: u16,
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> ServerProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("serve")
        .env("QUANTD_DATA_DIR", data_dir)
        .env("QUANTD_SERVER__PORT", port.to_string())
        .env("QUANTD_JOBS__THREADS", "1")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("quantd starts");
    let base = format!("http://127.0.0.1:{port}");
    let began = Instant::now();
    while reqwest::blocking::get(format!("{base}/ready"))
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ServerProcess { child, base }
}
