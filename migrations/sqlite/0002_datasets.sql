-- Text datasets for calibration and evaluation: the normalized text is a blob.
CREATE TABLE datasets (
    id         TEXT PRIMARY KEY,               -- "ds_" + first 16 hex of the text's sha256
    digest     TEXT NOT NULL REFERENCES blobs (digest),
    format     TEXT NOT NULL CHECK (format IN ('text', 'jsonl')),
    bytes      INTEGER NOT NULL,               -- of the normalized text
    documents  INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX datasets_digest ON datasets (digest);
