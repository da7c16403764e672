-- A model's revision names one incarnation of an id: a random token set when the row is
-- inserted. Deleting a model and creating another under the same id gives a new revision, so
-- whatever was derived from the old one (weights loaded by the engine, a job's plan) can tell
-- that the catalog now names something else.
ALTER TABLE models ADD COLUMN revision TEXT NOT NULL DEFAULT '';
UPDATE models SET revision = lower(hex(randomblob(16))) WHERE revision = '';

-- The revision of the model a job was planned for; a job never runs on another one.
-- NULL for jobs submitted before revisions existed.
ALTER TABLE jobs ADD COLUMN model_revision TEXT;
UPDATE jobs SET model_revision = (SELECT revision FROM models WHERE models.id = jobs.model_id)
 WHERE status IN ('queued', 'running');
