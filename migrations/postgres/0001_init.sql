-- quantd's schema on PostgreSQL: the same tables and columns as the SQLite migrations
-- (migrations/sqlite, 0001 to 0005) reach, in one step. Timestamps are Unix seconds, leases
-- Unix milliseconds; JSON columns hold serde_json text (read with ::jsonb where a query looks
-- inside). Integers are BIGINT and reals DOUBLE PRECISION, the types SQLite's INTEGER and REAL
-- decode to.

CREATE TABLE blobs (
    digest     TEXT PRIMARY KEY,
    size       BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE models (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('base', 'quantized')),
    format          TEXT NOT NULL CHECK (format IN ('hf-safetensors', 'gguf')),
    architecture    TEXT NOT NULL,
    parameters      BIGINT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    bits_per_weight DOUBLE PRECISION,
    base_model      TEXT REFERENCES models (id) ON DELETE SET NULL,
    job_id          TEXT,
    summary         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    revision        TEXT NOT NULL DEFAULT ''
);

CREATE TABLE model_files (
    model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    digest   TEXT NOT NULL REFERENCES blobs (digest),
    size     BIGINT NOT NULL,
    PRIMARY KEY (model_id, name)
);
CREATE INDEX model_files_digest ON model_files (digest);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    model_id         TEXT NOT NULL,
    method           TEXT NOT NULL,
    output_name      TEXT NOT NULL,
    spec             TEXT NOT NULL,
    spec_hash        TEXT NOT NULL,
    plan             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage            TEXT,
    progress_done    BIGINT NOT NULL DEFAULT 0,
    progress_total   BIGINT NOT NULL DEFAULT 0,
    progress_unit    TEXT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    max_attempts     BIGINT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    error            TEXT,
    idempotency_key  TEXT UNIQUE,
    output_model     TEXT,
    report           TEXT,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT NOT NULL,
    model_revision   TEXT,
    owner            TEXT,
    lease_epoch      BIGINT NOT NULL DEFAULT 0,
    lease_expires_ms BIGINT
);
CREATE INDEX jobs_status_created ON jobs (status, created_at);
CREATE INDEX jobs_model ON jobs (model_id);
CREATE UNIQUE INDEX jobs_active_output ON jobs (output_name) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_status_lease ON jobs (status, lease_expires_ms);

CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE metrics (
    id       BIGSERIAL PRIMARY KEY,
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    model_id TEXT,
    subject  TEXT NOT NULL,
    name     TEXT NOT NULL,
    value    DOUBLE PRECISION,
    label    TEXT
);
CREATE INDEX metrics_job ON metrics (job_id);
CREATE INDEX metrics_model ON metrics (model_id);

CREATE TABLE datasets (
    id         TEXT PRIMARY KEY,
    digest     TEXT NOT NULL REFERENCES blobs (digest),
    format     TEXT NOT NULL CHECK (format IN ('text', 'jsonl')),
    bytes      BIGINT NOT NULL,
    documents  BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX datasets_digest ON datasets (digest);

CREATE TABLE eval_baselines (
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    dataset_id TEXT NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    ctx        BIGINT NOT NULL,
    max_tokens BIGINT NOT NULL,
    results    TEXT NOT NULL,
    job_id     TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, dataset_id, ctx, max_tokens)
);

CREATE TABLE dataset_tokens (
    dataset_id TEXT NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    tokens     BIGINT NOT NULL,
    PRIMARY KEY (dataset_id, model_id)
);
