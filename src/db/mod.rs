//! Database access, on SQLite (the embedded default: `quantd.db` under `data_dir`) or
//! PostgreSQL (`database_url = "postgres://..."`, for several replicas): the pool, the
//! migrations of each backend, the few places where their SQL differs, and one file of queries
//! per table. Every query is written once, with `$N` placeholders both backends accept, and runs
//! through sqlx's `Any` driver. Nothing above this module writes SQL.

pub mod blobs;
pub mod datasets;
pub mod evals;
pub mod jobs;
pub mod metrics;
pub mod models;

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, Executor};

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The database engine behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One process on one data directory (its lock file sees to that).
    Sqlite,
    /// Any number of replicas.
    Postgres,
}

/// A transaction on either backend.
pub type Tx = sqlx::Transaction<'static, Any>;

/// The connection pool and which engine it talks to; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// Connects to `database_url` when it is set, else to `quantd.db` under `data_dir` (created if
/// needed), and applies the backend's migrations.
pub async fn connect(database_url: &str, data_dir: &Path) -> Result<Db, sqlx::Error> {
    sqlx::any::install_default_drivers();
    let db = if database_url.is_empty() {
        let path = data_dir.join("quantd.db");
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers work beside the writer; the busy timeout makes a writer
                    // wait for the lock instead of failing.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await?;
        Db {
            pool,
            backend: Backend::Sqlite,
        }
    } else {
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(database_url)
            .await?;
        Db {
            pool,
            backend: Backend::Postgres,
        }
    };
    let migrator = match db.backend {
        Backend::Sqlite => &SQLITE_MIGRATOR,
        Backend::Postgres => &POSTGRES_MIGRATOR,
    };
    migrator.run(&db.pool).await?;
    Ok(db)
}

impl Db {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for queries in this module.
    fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A transaction for reads only, or writes that need no lock held from the start.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.pool.begin().await
    }

    /// A transaction that reads and then writes on what it read. SQLite takes the write lock
    /// at once (`BEGIN IMMEDIATE`), so two such transactions never interleave; PostgreSQL's
    /// queries lock the rows they read with [`Db::for_update`].
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// The locking clause a `SELECT` inside [`Db::begin_write`] ends with (none on SQLite,
    /// whose transaction holds the whole database already).
    fn for_update(&self) -> &'static str {
        self.locking(" FOR UPDATE")
    }

    /// [`Db::for_update`] that passes over rows another transaction holds (claiming).
    fn for_update_skip_locked(&self) -> &'static str {
        self.locking(" FOR UPDATE SKIP LOCKED")
    }

    /// A shared lock on the rows read: a concurrent `FOR UPDATE` is waited for.
    fn for_share(&self) -> &'static str {
        self.locking(" FOR SHARE")
    }

    /// `clause` on PostgreSQL; nothing on SQLite, where writes are serialized anyway.
    fn locking(&self, clause: &'static str) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => clause,
        }
    }

    /// An SQL expression for the text at `path` inside the JSON text column `column` (NULL
    /// when absent or JSON null).
    fn json_text(&self, column: &str, path: &[&str]) -> String {
        match self.backend {
            Backend::Sqlite => format!("json_extract({column}, '$.{}')", path.join(".")),
            Backend::Postgres => format!("({column}::jsonb #>> '{{{}}}')", path.join(",")),
        }
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> bool {
        self.pool.execute("SELECT 1").await.is_ok()
    }

    /// Closes the pool (tests and tools that drop databases afterwards).
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Unix milliseconds now (leases).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
