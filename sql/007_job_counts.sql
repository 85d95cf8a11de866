-- 007_job_counts: exact counts of finished jobs, cheap to read; retention pruned through
-- an index by status. The supervisor's periodic statements then read no finished row
-- they don't change, however many retention keeps (benchmarks/periodic_queries.py).
--
-- `jobvisor status`, /metrics and the dashboard show per type how many jobs are
-- completed, failed and cancelled. Counting them in jobvisor.jobs is a scan of every
-- retained finished row (7–30 days, millions), every 2 s on every supervisor. Instead the
-- counts are kept here, in the statement that moves a job into or out of a finished
-- status (workers/queue.py: a data-modifying CTE next to the UPDATE or DELETE), so they
-- commit or roll back with the change itself. Live counts (queued, leased) are still read
-- from the jobs, through the partial indexes over those statuses.
--
-- A (type, status) is spread over shards, the total being the sum of its rows. A writer
-- takes a shard nobody else holds (jobvisor.count_shard): no acknowledgement ever waits
-- on another's counter row, so none queue on a hot row, and no lock cycle can form with
-- the batch rows that a handler's transaction may already hold (its follow-up jobs'
-- batch, sql/004) while another completion holds its counter row and waits for that batch.

CREATE TABLE jobvisor.job_counts (
    job_type text     NOT NULL,
    status   text     NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    shard    smallint NOT NULL CHECK (shard >= 0),
    -- One shard may go negative (a retried or pruned job taken off where it was not
    -- counted); the sum over the shards is the count.
    n        bigint   NOT NULL,
    PRIMARY KEY (job_type, status, shard)
);

-- A shard of (type, status) that no other transaction is writing: a transaction-level
-- advisory lock per shard, tried (never waited for) from the caller's home shard on. The
-- lock is held to the end of the transaction, like the row lock that comes with it, and
-- a transaction gets its own shard back (the lock is re-entrant). Only when more than
-- 1024 transactions write the same count at once do the rest share (and wait for) one.
CREATE FUNCTION jobvisor.count_shard(p_type text, p_status text) RETURNS smallint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_key  int := hashtext('jobvisor.job_counts/' || p_type || '/' || p_status);
    v_home int := pg_backend_pid() % 16;
    v_s    int;
BEGIN
    FOR i IN 0..1023 LOOP
        v_s := CASE WHEN i < 16 THEN (v_home + i) % 16 ELSE i END;
        IF pg_try_advisory_xact_lock(v_key, v_s) THEN
            RETURN v_s;
        END IF;
    END LOOP;
    RETURN 1024;
END
$$;

-- Retention prunes one status at a time (workers/queue.py, _PRUNE). By finished_at alone,
-- the completed prune (7 days) read every failed row kept between 7 and 30 days: ~60 ms
-- with 10⁶ finished jobs, for nothing to delete. By status first, it reads only the rows
-- it deletes (docs/benchmarks.md). (The statement is also never prepared: a generic plan
-- can't see the cutoff and chose a full scan, 160 ms.) Built while the migration holds
-- the table, so writes wait for it: ~1.5 s per 10⁶ rows on the benchmark machine.
CREATE INDEX jobs_finished_by_status ON jobvisor.jobs (status, finished_at)
    WHERE finished_at IS NOT NULL;
DROP INDEX jobvisor.jobs_finished;

-- The counts recomputed from the jobs: at this migration, and as a repair should they
-- ever drift (finishes written by code older than this migration during a rolling
-- upgrade). The SHARE lock waits for transactions that changed jobs to commit and keeps
-- new ones out until the counts are rewritten, so they are exact as of that moment.
CREATE FUNCTION jobvisor.recount_jobs() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE jobvisor.jobs IN SHARE MODE;
    DELETE FROM jobvisor.job_counts;
    INSERT INTO jobvisor.job_counts (job_type, status, shard, n)
    SELECT job_type, status, 0, count(*)
    FROM jobvisor.jobs
    WHERE status IN ('completed', 'failed', 'cancelled')
    GROUP BY job_type, status;
END
$$;

REVOKE EXECUTE ON FUNCTION jobvisor.recount_jobs() FROM PUBLIC;

SELECT jobvisor.recount_jobs();


-- --- least privilege ---------------------------------------------------------------------
-- Workers finish their own jobs (complete, retry, fail, put back), so the worker role
-- keeps the counts too; `jobvisor status` run with the worker's DSN reads them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker') THEN
        GRANT SELECT, INSERT, UPDATE ON jobvisor.job_counts TO jobvisor_worker;
        GRANT EXECUTE ON FUNCTION jobvisor.count_shard(text, text) TO jobvisor_worker;
    END IF;
END
$$;
