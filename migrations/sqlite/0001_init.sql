-- quantd's schema. Timestamps are Unix seconds. JSON columns hold serde_json text.

-- Content-addressed files under data_dir/blobs/sha256/ab/<hex>.
CREATE TABLE blobs (
    digest     TEXT PRIMARY KEY,            -- "sha256:<64 hex>"
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE models (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('base', 'quantized')),
    format          TEXT NOT NULL CHECK (format IN ('hf-safetensors', 'gguf')),
    architecture    TEXT NOT NULL,
    parameters      INTEGER NOT NULL,
    size_bytes      INTEGER NOT NULL,
    bits_per_weight REAL,
    base_model      TEXT REFERENCES models (id) ON DELETE SET NULL,
    job_id          TEXT,
    summary         TEXT NOT NULL,              -- JSON: hyper-parameters, dtype, tokenizer facts
    created_at      INTEGER NOT NULL
);

-- The files a model is made of; several models may share a blob.
CREATE TABLE model_files (
    model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    digest   TEXT NOT NULL REFERENCES blobs (digest),
    size     INTEGER NOT NULL,
    PRIMARY KEY (model_id, name)
);
CREATE INDEX model_files_digest ON model_files (digest);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    model_id         TEXT NOT NULL,             -- no foreign key: job history outlives deleted models
    method           TEXT NOT NULL,
    output_name      TEXT NOT NULL,
    spec             TEXT NOT NULL,             -- JSON: the validated request
    spec_hash        TEXT NOT NULL,             -- to tell a repeated idempotency key from a reused one
    plan             TEXT NOT NULL,             -- JSON: computed at submit
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage            TEXT,
    progress_done    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    progress_unit    TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    idempotency_key  TEXT UNIQUE,
    output_model     TEXT,
    report           TEXT,                      -- JSON: what the method reported
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX jobs_status_created ON jobs (status, created_at);
CREATE INDEX jobs_model ON jobs (model_id);
-- At most one queued or running job may produce a given output model.
CREATE UNIQUE INDEX jobs_active_output ON jobs (output_name) WHERE status IN ('queued', 'running');

CREATE TABLE job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,                   -- stage | metric | log | done | failed | cancelled
    data       TEXT NOT NULL,                   -- JSON
    created_at INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- Numbers a job measured: per tensor (subject = tensor name) or per model (subject = 'model').
CREATE TABLE metrics (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    model_id TEXT,
    subject  TEXT NOT NULL,
    name     TEXT NOT NULL,
    value    REAL,
    label    TEXT
);
CREATE INDEX metrics_job ON metrics (job_id);
CREATE INDEX metrics_model ON metrics (model_id);
