//! Job leases at the database level, on SQLite (and on PostgreSQL in the suite's PostgreSQL
//! pass): a claim makes a lease, an expired lease puts the job back in the queue, and a worker
//! that lost its lease can write nothing: no progress, no event, no outcome, no publish.

mod common;

use std::time::Duration;

use quantd::db::jobs::{self, NewJob};
use quantd::db::models::{self, ModelRow};
use quantd::db::{self, Db};

struct TestDb {
    db: Db,
    _dir: tempfile::TempDir,
    _pg: Option<common::postgres::PgServer>,
}

async fn open() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let pg = common::on_postgres().then(common::postgres::PgServer::get);
    let url = match &pg {
        Some(pg) => pg.create_database().await,
        None => String::new(),
    };
    let db = db::connect(&url, dir.path()).await.unwrap();
    TestDb {
        db,
        _dir: dir,
        _pg: pg,
    }
}

/// A model and one queued job on it, with `max_attempts`; returns the job id.
async fn queue_job(db: &Db, max_attempts: u32) -> String {
    let revision = models::new_revision();
    let row = ModelRow {
        id: "m".into(),
        kind: "base".into(),
        format: "gguf".into(),
        architecture: "llama".into(),
        parameters: 1,
        size_bytes: 1,
        bits_per_weight: None,
        base_model: None,
        job_id: None,
        summary: "{}".into(),
        created_at: db::now(),
        revision: revision.clone(),
    };
    let mut tx = db.begin().await.unwrap();
    models::insert(&mut tx, &row, &[]).await.unwrap();
    tx.commit().await.unwrap();
    let job = NewJob {
        id: "j1",
        model_id: "m",
        method: "gguf",
        output_name: "m:q8_0",
        spec: "{}",
        spec_hash: "h",
        plan: "{}",
        max_attempts,
        idempotency_key: None,
        model_revision: &revision,
    };
    assert!(jobs::insert(db, &job).await.unwrap());
    "j1".into()
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_can_write_nothing() {
    let t = open().await;
    let db = &t.db;
    let id = queue_job(db, 3).await;
    let first = jobs::claim(db, "replica-a", 50).await.unwrap().unwrap();
    assert_eq!((first.attempts, first.lease_epoch), (1, 1));
    assert_eq!(first.owner.as_deref(), Some("replica-a"));
    assert!(jobs::claim(db, "replica-b", 50).await.unwrap().is_none());
    let a = first.lease();
    assert!(jobs::renew(db, &a, 50).await.unwrap());

    tokio::time::sleep(Duration::from_millis(120)).await;
    let (requeued, failed) = jobs::expire_leases(db).await.unwrap();
    assert_eq!((requeued, failed), (vec![id.clone()], vec![]));
    let second = jobs::claim(db, "replica-b", 60_000).await.unwrap().unwrap();
    assert_eq!((second.attempts, second.lease_epoch), (2, 2));
    let b = second.lease();

    // Everything the first worker tries is refused, and changes nothing.
    assert!(!jobs::renew(db, &a, 60_000).await.unwrap());
    jobs::set_progress(db, &a, "quantizing", 5, 9, "tensors")
        .await
        .unwrap();
    let event = serde_json::json!({"stage": "writing"});
    assert!(!jobs::add_worker_event(db, &a, "stage", &event)
        .await
        .unwrap());
    let failed = serde_json::json!({"status": "failed"});
    assert!(
        !jobs::finish_unsuccessfully(db, &a, "failed", Some("x"), None, &failed)
            .await
            .unwrap()
    );
    let mut tx = db.begin().await.unwrap();
    let report = serde_json::json!({});
    assert!(!jobs::complete(&mut tx, &a, Some("m:q8_0"), &report)
        .await
        .unwrap());
    tx.rollback().await.unwrap();
    let row = jobs::get(db, &id).await.unwrap().unwrap();
    assert_eq!(row.status, "running");
    assert_eq!(row.owner.as_deref(), Some("replica-b"));
    assert_eq!(row.progress_done, 0);
    assert!(jobs::events(db, &id).await.unwrap().is_empty());

    // The new owner's writes go through.
    assert!(jobs::renew(db, &b, 60_000).await.unwrap());
    assert!(jobs::add_worker_event(db, &b, "stage", &event)
        .await
        .unwrap());
    let mut tx = db.begin().await.unwrap();
    assert!(jobs::complete(&mut tx, &b, None, &report).await.unwrap());
    tx.commit().await.unwrap();
    let row = jobs::get(db, &id).await.unwrap().unwrap();
    assert_eq!(row.status, "succeeded");
    assert_eq!(row.owner.as_deref(), Some("replica-b"));
    assert_eq!(row.lease_expires_ms, None);
}

#[tokio::test]
async fn a_job_whose_lease_expires_too_often_fails() {
    let t = open().await;
    let db = &t.db;
    let id = queue_job(db, 2).await;
    for attempt in 1..=2 {
        let row = jobs::claim(db, "replica-a", 10).await.unwrap().unwrap();
        assert_eq!(row.attempts, attempt);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (requeued, failed) = jobs::expire_leases(db).await.unwrap();
        if attempt == 1 {
            assert_eq!((requeued, failed), (vec![id.clone()], vec![]));
        } else {
            assert_eq!((requeued, failed), (vec![], vec![id.clone()]));
        }
    }
    let row = jobs::get(db, &id).await.unwrap().unwrap();
    assert_eq!(row.status, "failed");
    assert!(
        row.error.as_deref().unwrap().contains("max_attempts 2"),
        "{:?}",
        row.error
    );
}

#[tokio::test]
async fn a_live_lease_is_not_expired() {
    let t = open().await;
    let db = &t.db;
    queue_job(db, 3).await;
    jobs::claim(db, "replica-a", 60_000).await.unwrap().unwrap();
    assert_eq!(
        jobs::expire_leases(db).await.unwrap(),
        (vec![], vec![]),
        "a job within its lease belongs to its worker"
    );
}
