-- Evaluation results of a reference (base) model, so the variants of one model compare with
-- the same base numbers and its speed is measured once: one row per (model, dataset, ctx,
-- max_tokens). Gone with the model or the dataset.
CREATE TABLE eval_baselines (
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    dataset_id TEXT NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    ctx        INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL,
    results    TEXT NOT NULL,                  -- JSON: perplexity, scored tokens, speed
    job_id     TEXT,                           -- the job that measured it
    created_at INTEGER NOT NULL,
    PRIMARY KEY (model_id, dataset_id, ctx, max_tokens)
);

-- How many tokens a dataset is for a model's tokenizer, learned when a job tokenizes it.
CREATE TABLE dataset_tokens (
    dataset_id TEXT NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    tokens     INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, model_id)
);
