-- 006_runtime_edges: crash isolation, per-attempt error history, per-type wake-ups.
--
-- * `suspect`: the job was held by a worker process that died (or was recycled for
--   memory) beside other jobs, so nobody knows which of them did it. A suspect is leased
--   only by a process that holds nothing else and takes nothing else while it runs: if
--   the process dies again, the suspect did it and is charged (see workers/queue.py,
--   `rescue_worker`). Jobs that were merely beside the culprit keep their attempts.
-- * `errors`: the last attempts' errors, newest last, bounded (jobvisor.push_error), so
--   a retry no longer overwrites what went wrong before.
-- * Wake-ups go to one channel per job type (jobvisor.jobs_channel): a child is woken
--   only by its own type's enqueues.

-- Constant default, no rewrite of existing rows.
ALTER TABLE jobvisor.jobs ADD COLUMN suspect boolean NOT NULL DEFAULT false;
ALTER TABLE jobvisor.jobs ADD COLUMN errors jsonb
    CHECK (errors IS NULL OR jsonb_typeof(errors) = 'array');

-- Suspects are few; the lease looks for one with an index probe that finds nothing.
CREATE INDEX jobs_suspects ON jobvisor.jobs (job_type, priority DESC, visible_at, id)
    WHERE status = 'queued' AND suspect;

-- (A dead worker's leases are found through jobs_leased: leased rows are few, and one
-- more index on every lease and acknowledgement would cost the hot path.)

-- One attempt's error appended to the history, which keeps the last 10 (each message is
-- already clipped to 1024 characters by the CHECK on error_message's writers).
CREATE FUNCTION jobvisor.push_error(p_errors jsonb, p_attempt int, p_code text, p_message text)
RETURNS jsonb
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(jsonb_agg(e ORDER BY o), '[]'::jsonb)
    FROM (
        SELECT e, o
        FROM jsonb_array_elements(
                 coalesce(p_errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
                     'attempt', p_attempt, 'code', p_code, 'message', left(p_message, 1024),
                     'at', clock_timestamp())))
             WITH ORDINALITY AS x(e, o)
        ORDER BY o DESC
        LIMIT 10
    ) last
$$;

-- The channel a job type's workers LISTEN on. Channel names are identifiers (at most 63
-- bytes); a long type name is shortened with a hash. Two names that shorten alike only
-- cost a spurious wake (an empty lease).
CREATE FUNCTION jobvisor.jobs_channel(p_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN length(p_type) <= 60 THEN 'jv_' || p_type
                ELSE 'jv_' || left(p_type, 51) || '_' || left(md5(p_type), 8) END
$$;

CREATE OR REPLACE FUNCTION jobvisor.notify_enqueued() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT DISTINCT job_type FROM new_rows WHERE status = 'queued' LOOP
        PERFORM pg_notify(jobvisor.jobs_channel(t), '');
    END LOOP;
    RETURN NULL;
END;
$$;
