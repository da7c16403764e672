-- Job leases. A running job belongs to one worker (`owner`, a replica id) until
-- `lease_expires_ms` (Unix milliseconds); its worker renews the lease while it runs. Any
-- process re-queues a job whose lease expired. `lease_epoch` counts claims: a worker's writes
-- are conditional on the owner and epoch it claimed with, so a worker that lost its lease
-- (frozen, partitioned) can no longer change the job, let alone publish it.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_expires_ms INTEGER;
-- Jobs running under the old start-up rescue have no lease: expired at once.
UPDATE jobs SET lease_expires_ms = 0 WHERE status = 'running';
CREATE INDEX jobs_status_lease ON jobs (status, lease_expires_ms);
