-- 012_one_insert_trigger: one statement trigger after an insert into jobs, not two
-- (issue #15).
--
-- Every enqueue ran two PL/pgSQL statement triggers over the inserted rows: one sent the
-- wake-ups (sql/001, sql/006), one counted the rows of batches (sql/004), running its
-- INSERT ... ON CONFLICT into jobvisor.batches even when no row had a batch. A single
-- enqueue, the wake-up path's first step, paid about 0.33 ms for them on the benchmark
-- machine with idle CPUs (docs/benchmarks.md); one function that notifies in one query
-- and counts only when a row has a batch pays about 0.1 ms less. Bulk enqueues are
-- unchanged. What each did is kept: one NOTIFY per statement and queued type on the
-- type's channel, delivered at commit; batch counters summed in batch id order (two
-- enqueues into the same batches can't deadlock).

CREATE FUNCTION jobvisor.after_jobs_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(jobvisor.jobs_channel(q.job_type), '')
    FROM (SELECT DISTINCT job_type FROM new_rows WHERE status = 'queued') q;
    IF EXISTS (SELECT FROM new_rows WHERE batch_id IS NOT NULL) THEN
        INSERT INTO jobvisor.batches AS x (id, total, completed, failed, cancelled,
                                           finished_at)
        SELECT n.batch_id, n.total, n.completed, n.failed, n.cancelled,
               CASE WHEN n.completed + n.failed + n.cancelled = n.total THEN now() END
        FROM (SELECT batch_id, count(*)::int AS total,
                     (count(*) FILTER (WHERE status = 'completed'))::int AS completed,
                     (count(*) FILTER (WHERE status = 'failed'))::int AS failed,
                     (count(*) FILTER (WHERE status = 'cancelled'))::int AS cancelled
              FROM new_rows WHERE batch_id IS NOT NULL GROUP BY batch_id) n
        ORDER BY n.batch_id
        ON CONFLICT (id) DO UPDATE
        SET total = x.total + excluded.total,
            completed = x.completed + excluded.completed,
            failed = x.failed + excluded.failed,
            cancelled = x.cancelled + excluded.cancelled,
            -- More work in a finished batch opens it again (its webhook has fired, though).
            finished_at = CASE WHEN x.completed + x.failed + x.cancelled + excluded.completed
                                    + excluded.failed + excluded.cancelled
                                    = x.total + excluded.total
                               THEN coalesce(x.finished_at, now()) END,
            updated_at = now();
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER jobs_notify_insert ON jobvisor.jobs;
DROP TRIGGER jobs_count_batch ON jobvisor.jobs;
DROP FUNCTION jobvisor.notify_enqueued();
DROP FUNCTION jobvisor.count_batch_jobs();

CREATE TRIGGER jobs_after_insert
    AFTER INSERT ON jobvisor.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobvisor.after_jobs_insert();
