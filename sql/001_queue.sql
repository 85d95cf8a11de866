-- jobvisor queue: one row per job in its own schema.
-- Invariants live in CHECK constraints so that no code path can break them.

CREATE SCHEMA IF NOT EXISTS jobvisor;

CREATE TABLE jobvisor.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_type         text        NOT NULL CHECK (job_type ~ '^[a-z][a-z0-9_]{0,62}$'),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    priority         integer     NOT NULL DEFAULT 0,
    status           text        NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'leased', 'completed', 'failed', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    visible_at       timestamptz NOT NULL DEFAULT now(),
    lease_key        uuid,
    leased_by        text,
    leased_until     timestamptz,
    cancel_requested boolean     NOT NULL DEFAULT false,
    error_code       text,
    error_message    text        CHECK (length(error_message) <= 1024),
    result           jsonb,
    progress         real        CHECK (progress BETWEEN 0 AND 1),
    progress_note    text        CHECK (length(progress_note) <= 200),
    idempotency_key  text,
    -- A sticky key stays taken after the job finished (cron slots): see DESIGN.md.
    key_sticky       boolean     NOT NULL DEFAULT false,
    batch_id         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT leased_has_lease CHECK (
        (status = 'leased') = (lease_key IS NOT NULL AND leased_until IS NOT NULL)),
    CONSTRAINT finished_has_finished_at CHECK (
        (status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);

-- The hot path: leasing reads queued rows of one type in this order.
CREATE INDEX jobs_lease_order ON jobvisor.jobs (job_type, priority DESC, visible_at, id)
    WHERE status = 'queued';

-- Rescue looks for expired leases; per-type in-flight counts (global_concurrency) too.
CREATE INDEX jobs_leased ON jobvisor.jobs (job_type, leased_until) WHERE status = 'leased';

-- Retention prunes finished rows by age.
CREATE INDEX jobs_finished ON jobvisor.jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE INDEX jobs_batch ON jobvisor.jobs (batch_id) WHERE batch_id IS NOT NULL;

-- An idempotency key is unique among live jobs, and among finished ones when sticky.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobvisor.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND (status IN ('queued', 'leased') OR key_sticky);

-- Wake sleeping workers: one NOTIFY per statement and type, delivered at commit.
-- Statements that put rows back to queued notify explicitly (see workers/queue.py);
-- an UPDATE trigger would tax every acknowledgement on the hot path.
CREATE FUNCTION jobvisor.notify_enqueued() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT DISTINCT job_type FROM new_rows WHERE status = 'queued' LOOP
        PERFORM pg_notify('jobvisor_jobs', t);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_insert
    AFTER INSERT ON jobvisor.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobvisor.notify_enqueued();
