-- 004_batches: batches of jobs with live counters, and webhooks when a job or a batch
-- finishes (docs/webhooks.md).
--
-- Counters are kept by triggers, inside the transaction that changes a job, so they are
-- right whichever process wrote the change (worker thread, worker loop, supervisor
-- rescue, operator CLI) and whatever it ran in (a bulk acknowledgement, a handler's own
-- transaction with follow-up jobs):
--   * an INSERT of jobs with a batch_id adds to the batch's total (creating the batch);
--   * a job finishing (finished_at set) counts under its status; one put back in the
--     queue (operator retry) is taken off again. The batch row's lock serialises
--     concurrent completions, so none is lost and the last one sees the batch finished.
-- Webhook deliveries are `webhook` jobs enqueued in that same transaction, with a sticky
-- idempotency key (`webhook:batch:<id>`, `webhook:job:<id>`): each fires at most once,
-- even when a finished job is retried and finishes again.

CREATE TABLE jobvisor.batches (
    id           text        PRIMARY KEY,
    total        integer     NOT NULL DEFAULT 0 CHECK (total >= 0),
    completed    integer     NOT NULL DEFAULT 0 CHECK (completed >= 0),
    failed       integer     NOT NULL DEFAULT 0 CHECK (failed >= 0),
    cancelled    integer     NOT NULL DEFAULT 0 CHECK (cancelled >= 0),
    -- Checked against the allow-list when set (workers/webhooks.py), and again on delivery.
    callback_url text        CHECK (callback_url ~* '^https?://' AND length(callback_url) <= 2048),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CONSTRAINT counts_within_total CHECK (completed + failed + cancelled <= total),
    -- "finished" is exactly "every job counted": no code path can say otherwise.
    CONSTRAINT finished_when_all_done CHECK (
        (finished_at IS NOT NULL) = (total > 0 AND completed + failed + cancelled = total))
);

-- Retention of finished batches (their jobs are pruned on their own schedule).
CREATE INDEX batches_finished ON jobvisor.batches (finished_at) WHERE finished_at IS NOT NULL;

-- Nullable, no default: adding it rewrites nothing.
ALTER TABLE jobvisor.jobs ADD COLUMN callback_url text
    CHECK (callback_url ~* '^https?://' AND length(callback_url) <= 2048);

-- Batches that already exist in the queue (rows pruned before this migration are gone).
INSERT INTO jobvisor.batches (id, total, completed, failed, cancelled, created_at, finished_at)
SELECT batch_id, count(*),
       count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'cancelled'),
       min(created_at),
       CASE WHEN bool_and(finished_at IS NOT NULL) THEN max(finished_at) END
FROM jobvisor.jobs
WHERE batch_id IS NOT NULL
GROUP BY batch_id;


-- --- webhook deliveries ------------------------------------------------------------------
-- `jobvisor.webhook_max_attempts` (ALTER DATABASE ... SET) overrides the attempts of a
-- delivery; retries back off as the `webhook` type's YAML `retry:` says.
CREATE FUNCTION jobvisor.enqueue_webhook(p_key text, p_url text, p_body jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_setting text := current_setting('jobvisor.webhook_max_attempts', true);
BEGIN
    INSERT INTO jobvisor.jobs AS j (job_type, payload, max_attempts, idempotency_key, key_sticky)
    VALUES ('webhook',
            jsonb_build_object('url', p_url, 'body', p_body || jsonb_build_object('delivery', p_key)),
            -- A bad setting must not break the statement that finished the job.
            CASE WHEN v_setting ~ '^[1-9][0-9]{0,2}$' THEN v_setting::int ELSE 8 END,
            p_key, true)
    ON CONFLICT (idempotency_key)
        WHERE idempotency_key IS NOT NULL AND (status IN ('queued', 'leased') OR key_sticky)
        DO NOTHING;
END
$$;


-- --- a job finishes (or is put back after finishing) ---------------------------------------
-- Two row triggers with the same WHEN clause. Updating the batch row once per job would
-- pile up one row version per job on a single hot row (measured: ~5x the cost of an
-- acknowledgement). Instead `jobs_finished` adds the job's change to a per-transaction
-- tally (a transaction-local setting), and `jobs_batch_apply`, deferred to COMMIT, applies
-- each batch's tally with one UPDATE: still inside the completing transaction, and the row
-- lock is held only while it commits. Concurrent commits queue on that lock and each sees
-- the counts of those committed before it, so exactly one sees the last job done.

CREATE FUNCTION jobvisor.job_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_tally text;
    v_acc   jsonb;
    v_cur   jsonb;
BEGIN
    IF NEW.batch_id IS NOT NULL THEN
        v_tally := current_setting('jobvisor.batch_tally', true);
        v_acc := CASE WHEN coalesce(v_tally, '') = '' THEN '{}'::jsonb ELSE v_tally::jsonb END;
        v_cur := coalesce(v_acc -> NEW.batch_id, '[0, 0, 0]'::jsonb);
        -- +1 for the status a job finishes with, -1 for the one it leaves (operator retry).
        v_acc := v_acc || jsonb_build_object(NEW.batch_id, jsonb_build_array(
            (v_cur ->> 0)::int + (NEW.finished_at IS NOT NULL AND NEW.status = 'completed')::int
                               - (OLD.finished_at IS NOT NULL AND OLD.status = 'completed')::int,
            (v_cur ->> 1)::int + (NEW.finished_at IS NOT NULL AND NEW.status = 'failed')::int
                               - (OLD.finished_at IS NOT NULL AND OLD.status = 'failed')::int,
            (v_cur ->> 2)::int + (NEW.finished_at IS NOT NULL AND NEW.status = 'cancelled')::int
                               - (OLD.finished_at IS NOT NULL AND OLD.status = 'cancelled')::int));
        -- is_local: gone at commit or rollback, and undone with a rolled-back savepoint
        -- together with that savepoint's deferred trigger events.
        PERFORM set_config('jobvisor.batch_tally', v_acc::text, true);
    END IF;
    IF NEW.callback_url IS NOT NULL AND OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL THEN
        PERFORM jobvisor.enqueue_webhook(
            'webhook:job:' || NEW.id, NEW.callback_url,
            jsonb_build_object(
                'event', 'job.finished',
                'job', jsonb_build_object(
                    'id', NEW.id, 'type', NEW.job_type, 'status', NEW.status,
                    'attempts', NEW.attempts, 'error_code', NEW.error_code,
                    'error_message', NEW.error_message, 'batch_id', NEW.batch_id,
                    'created_at', NEW.created_at, 'finished_at', NEW.finished_at,
                    -- A large result stays in the queue; the receiver learns it was left out.
                    'result', CASE WHEN pg_column_size(NEW.result) <= 65536 THEN NEW.result END,
                    'result_omitted', coalesce(pg_column_size(NEW.result) > 65536, false))));
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION jobvisor.apply_batch_tally() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_tally text := current_setting('jobvisor.batch_tally', true);
    v_id    text;
    v_d     jsonb;
    v_done  int;
    b       jobvisor.batches;
BEGIN
    -- The first deferred event of the transaction applies everything; the rest find the
    -- tally empty.
    IF coalesce(v_tally, '') = '' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('jobvisor.batch_tally', '', true);
    -- In id order: two transactions touching the same batches lock them in one order.
    FOR v_id, v_d IN SELECT key, value FROM jsonb_each(v_tally::jsonb) ORDER BY key LOOP
        v_done := (v_d ->> 0)::int + (v_d ->> 1)::int + (v_d ->> 2)::int;
        UPDATE jobvisor.batches AS x
        SET completed = x.completed + (v_d ->> 0)::int,
            failed = x.failed + (v_d ->> 1)::int,
            cancelled = x.cancelled + (v_d ->> 2)::int,
            finished_at = CASE WHEN x.completed + x.failed + x.cancelled + v_done = x.total
                               THEN coalesce(x.finished_at, now()) END,
            updated_at = now()
        WHERE x.id = v_id
        RETURNING x.* INTO b;
        -- Finished by this transaction: it was short of its total before.
        IF FOUND AND b.finished_at IS NOT NULL AND b.callback_url IS NOT NULL
           AND b.completed + b.failed + b.cancelled - v_done < b.total THEN
            PERFORM jobvisor.enqueue_webhook(
                'webhook:batch:' || b.id, b.callback_url,
                jsonb_build_object(
                    'event', 'batch.finished',
                    'batch', jsonb_build_object(
                        'id', b.id, 'total', b.total, 'completed', b.completed,
                        'failed', b.failed, 'cancelled', b.cancelled,
                        'created_at', b.created_at, 'finished_at', b.finished_at)));
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- Row triggers with a WHEN clause: a job without batch and callback (the hot path), and
-- every heartbeat, lease and progress write, only evaluate the condition; nothing is
-- queued for them. No statement-level UPDATE trigger: it would tax every acknowledgement.
CREATE TRIGGER jobs_finished
    AFTER UPDATE OF status ON jobvisor.jobs
    FOR EACH ROW
    WHEN ((NEW.batch_id IS NOT NULL OR NEW.callback_url IS NOT NULL)
          AND NEW.finished_at IS DISTINCT FROM OLD.finished_at)
    EXECUTE FUNCTION jobvisor.job_finished();

CREATE CONSTRAINT TRIGGER jobs_batch_apply
    AFTER UPDATE OF status ON jobvisor.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.batch_id IS NOT NULL AND NEW.finished_at IS DISTINCT FROM OLD.finished_at)
    EXECUTE FUNCTION jobvisor.apply_batch_tally();


-- --- jobs inserted into a batch ---------------------------------------------------------------
-- Once per INSERT statement over its transition table (shared with jobs_notify_insert), so
-- a 20,000-row bulk enqueue pays one aggregate; it covers every way a job gets in,
-- follow-ups a handler enqueues into its own job's batch included.
CREATE FUNCTION jobvisor.count_batch_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobvisor.batches AS x (id, total, completed, failed, cancelled, finished_at)
    SELECT n.batch_id, n.total, n.completed, n.failed, n.cancelled,
           CASE WHEN n.completed + n.failed + n.cancelled = n.total THEN now() END
    FROM (SELECT batch_id, count(*)::int AS total,
                 (count(*) FILTER (WHERE status = 'completed'))::int AS completed,
                 (count(*) FILTER (WHERE status = 'failed'))::int AS failed,
                 (count(*) FILTER (WHERE status = 'cancelled'))::int AS cancelled
          FROM new_rows WHERE batch_id IS NOT NULL GROUP BY batch_id) n
    -- Batch rows are locked in one order, so two enqueues into the same batches can't
    -- deadlock each other.
    ORDER BY n.batch_id
    ON CONFLICT (id) DO UPDATE
    SET total = x.total + excluded.total,
        completed = x.completed + excluded.completed,
        failed = x.failed + excluded.failed,
        cancelled = x.cancelled + excluded.cancelled,
        -- More work in a finished batch opens it again (its webhook has fired, though).
        finished_at = CASE WHEN x.completed + x.failed + x.cancelled + excluded.completed
                                + excluded.failed + excluded.cancelled = x.total + excluded.total
                           THEN coalesce(x.finished_at, now()) END,
        updated_at = now();
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_batch
    AFTER INSERT ON jobvisor.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobvisor.count_batch_jobs();


-- --- least privilege ---------------------------------------------------------------------------
-- The triggers run as the role that changes a job: the worker role must keep batches too.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker') THEN
        GRANT SELECT, INSERT, UPDATE ON jobvisor.batches TO jobvisor_worker;
    END IF;
END
$$;
