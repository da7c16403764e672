//! PostgreSQL for tests: the suite's throwaway server (`QUANTD_TEST_PG_URL`, started by
//! `scripts/test.sh`) or, when that is unset, one started here with
//! `scripts/postgres/throwaway.sh` and stopped on drop. A test that needs PostgreSQL fails when
//! neither works; it never passes without one. Each test gets a database of its own.

use std::path::PathBuf;
use std::process::Command;

use sqlx::Connection;

pub struct PgServer {
    /// Admin URL (database `postgres`).
    pub url: String,
    /// Set when this process started the server (and so stops it).
    own_dir: Option<tempfile::TempDir>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres/throwaway.sh")
}

impl PgServer {
    pub fn get() -> Self {
        if let Ok(url) = std::env::var("QUANTD_TEST_PG_URL") {
            return Self { url, own_dir: None };
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path().join("pg"))
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "could not start PostgreSQL (scripts/postgres/throwaway.sh; scripts/test.sh installs \
             Debian's postgresql package): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Self {
            url,
            own_dir: Some(dir),
        }
    }

    /// Creates an empty database; returns its URL.
    pub async fn create_database(&self) -> String {
        let name = format!("quantd_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("PostgreSQL answers");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("database created");
        conn.close().await.ok();
        let base = self.url.rsplit_once('/').expect("URL has a database").0;
        format!("{base}/{name}")
    }

    /// [`create_database`] for tests without a runtime.
    pub fn create_database_blocking(&self) -> String {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(self.create_database())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(dir) = &self.own_dir {
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(dir.path().join("pg"))
                .status();
        }
    }
}
