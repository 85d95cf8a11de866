-- 009_fair_share: fair share between the owners of one job type (issue #16, docs/fair_share.md).
--
-- A type configured with `fair_by: <payload field>` leases its jobs by start-time fair
-- queueing (SFQ, Goyal et al. 1996) instead of first in, first out. Every job gets a key
-- (the field's value) and a start tag at insert:
--
--     tag = greatest(V, last + 1 / weight)
--
-- `last` is the highest tag among the key's live (queued or leased) jobs, `weight` the
-- key's (fair_weights, default 1) and V the smallest tag the lease would take next at
-- the job's priority (the virtual time; with nothing visible queued there, the highest
-- tag running). Leasing reads queued jobs by (priority DESC, tag, id): priority stays
-- strict, keys take turns within a level, and a lone key still gets every slot.
--
-- A key's state is its live jobs, nothing else: no per-key row is written at enqueue
-- (no row lock that concurrent producers of one owner would queue on, no lock order for
-- two bulk loads to deadlock over, nothing to prune). A key that comes back after its
-- jobs finished starts at V, as SFQ starts a flow that has gone idle.
--
-- Types without fair_by pay one comparison per inserted row: the insert trigger's WHEN
-- lists the fair types (jobvisor.fair_share_types(), rewritten by configure_fair_share),
-- and the new partial indexes hold keyed rows only.

-- Nullable, no default, no CHECK: adding them rewrites and scans nothing (fair_key_of
-- keeps a key within 200 characters).
ALTER TABLE jobvisor.jobs ADD COLUMN fair_key text;
-- NULL with a key: queued before its type was fair (see fair_key_backlog); leased first.
ALTER TABLE jobvisor.jobs ADD COLUMN fair_tag float8;

-- What the supervisors configured (configure_fair_share). `path` is `field` split at its
-- dots: a nested field is read with `payload #>> path`.
CREATE TABLE jobvisor.fair_types (
    job_type            text        PRIMARY KEY,
    field               text        NOT NULL CHECK (field ~ '^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$'
                                                    AND length(field) <= 200),
    path                text[]      NOT NULL,
    weights             jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(weights) = 'object'),
    max_running_per_key integer     CHECK (max_running_per_key >= 1),
    -- The type's live jobs from before it was fair all have a key (fair_key_backlog).
    backlog_done        boolean     NOT NULL DEFAULT false,
    configured_at       timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The fair lease's order. `visible_at` last: it orders nothing (ids are unique), but the
-- lease's `visible_at <= now()` is then checked in the index, so a delayed job waiting
-- among the tags (a retry's backoff) costs an index entry, not a heap fetch.
CREATE INDEX jobs_fair_lease_order
    ON jobvisor.jobs (job_type, priority DESC, fair_tag NULLS FIRST, id, visible_at)
    WHERE status = 'queued' AND fair_key IS NOT NULL;

-- A key's live jobs, by tag: its last tag, read at insert. Status is in the predicate
-- only, so that the probe (status IN ('queued', 'leased')) can use no other index.
CREATE INDEX jobs_fair_keys ON jobvisor.jobs (job_type, fair_key, fair_tag)
    WHERE status IN ('queued', 'leased') AND fair_key IS NOT NULL;

-- The key of a payload: the field's value as text ('' when missing or null, so jobs
-- without it share one key). Longer than 200 characters, it is shortened with a hash.
-- (One expression, so that it is inlined where it is used.)
CREATE FUNCTION jobvisor.fair_key_of(p_payload jsonb, p_path text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN length(p_payload #>> p_path) > 200
                THEN left(p_payload #>> p_path, 167) || ':' || md5(p_payload #>> p_path)
                ELSE coalesce(p_payload #>> p_path, '') END
$$;

-- The fair types, as a constant: the insert trigger's WHEN inlines it, so a row of any
-- other type costs one comparison (no function call, no table read). Rewritten by
-- configure_fair_share only; each statement that inserts reads the current definition.
CREATE FUNCTION jobvisor.fair_share_types() RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '{}'::text[] $$;

-- The start tag of a new job (see the top of this file). Reads, never writes: it runs as
-- whoever inserts (a worker's follow-up job, the platform, COPY) with SELECT on
-- fair_types and jobs, which the worker role has. Rows inserted earlier by the same
-- statement are visible here, so a bulk insert tags its jobs in order.
-- Each of its statements has one right plan whatever the statistics say (a bulk load
-- into a table never analyzed must not run a scan per row): the key probe can use one
-- index only (jobs_fair_keys' predicate), and with scans of the table and sorts ruled
-- out the V probe is jobs_fair_lease_order's; the plans are then made once per session.
CREATE FUNCTION jobvisor.fair_tag_job() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_sort = off
    SET enable_bitmapscan = off
AS $$
DECLARE
    v_path    text[];
    v_weights jsonb;
    v_key     text;
    v_last    float8;
    v_v       float8;
    v_at      timestamptz;
BEGIN
    SELECT t.path, t.weights INTO v_path, v_weights
    FROM jobvisor.fair_types t WHERE t.job_type = NEW.job_type;
    IF NOT FOUND THEN
        RETURN NEW;  -- being taken off the list (configure_fair_share)
    END IF;
    -- jobvisor.fair_key_of, spelt out: plain expressions are what plpgsql runs fastest.
    v_key := coalesce(NEW.payload #>> v_path, '');
    IF length(v_key) > 200 THEN
        v_key := left(v_key, 167) || ':' || md5(v_key);
    END IF;
    NEW.fair_key := v_key;
    IF NEW.status <> 'queued' THEN
        RETURN NEW;
    END IF;
    -- The key's place: after its last live job (jobs_fair_keys, one index probe).
    SELECT max(fair_tag) INTO v_last FROM jobvisor.jobs
    WHERE job_type = NEW.job_type AND fair_key = v_key AND status IN ('queued', 'leased');
    -- V: the tag the lease takes next at this priority (jobs_fair_lease_order, one probe).
    SELECT fair_tag, visible_at INTO v_v, v_at FROM jobvisor.jobs
    WHERE job_type = NEW.job_type AND status = 'queued' AND fair_key IS NOT NULL
      AND priority = NEW.priority
    ORDER BY fair_tag NULLS FIRST
    LIMIT 1;
    IF FOUND AND (v_v IS NULL OR v_at > now()) THEN
        -- Past the backlog keyed without a tag and the delayed jobs (passed over in the
        -- index): a retry waiting out its backoff keeps its old tag, and must not pull V
        -- back, or a new key would jump the queue. Rarely needed.
        SELECT fair_tag INTO v_v FROM jobvisor.jobs
        WHERE job_type = NEW.job_type AND status = 'queued' AND fair_key IS NOT NULL
          AND priority = NEW.priority AND fair_tag IS NOT NULL AND visible_at <= now()
        ORDER BY fair_tag NULLS FIRST
        LIMIT 1;
    END IF;
    IF v_v IS NULL THEN
        -- Nothing waits at this level: the latest tag started (jobs_leased; the type's
        -- running jobs), so a key arriving now is not ahead of those served just before.
        SELECT max(fair_tag) INTO v_v FROM jobvisor.jobs
        WHERE job_type = NEW.job_type AND status = 'leased';
    END IF;
    NEW.fair_tag := greatest(coalesce(v_v, 0),
                             v_last + 1 / coalesce((v_weights ->> v_key)::float8, 1));
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_fair_tag
    BEFORE INSERT ON jobvisor.jobs
    FOR EACH ROW
    WHEN (NEW.job_type = ANY (jobvisor.fair_share_types()))
    EXECUTE FUNCTION jobvisor.fair_tag_job();


-- --- configuration (the supervisor, at start and on every reload) -------------------------
-- p_types: {"<type>": {"field": "...", "weights": {"<key>": w}, "max_running_per_key": n}}
-- for the fair types among p_served, the types the caller speaks for; rows of other types
-- (another host's) are left alone. Returns whether the set of fair types changed.
--
-- When it changes, the trigger's list is rewritten under a SHARE ROW EXCLUSIVE lock on
-- the jobs: it waits for every transaction writing jobs to end (and holds new writers,
-- for at most lock_timeout, 2 s: the caller tries again later), so none goes on
-- inserting with the old list once this commits. Weights and limits are read per row:
-- changing them takes no lock.
CREATE FUNCTION jobvisor.configure_fair_share(p_types jsonb, p_served text[]) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_before text[];
    v_after  text[];
    v_bad    text;
BEGIN
    IF jsonb_typeof(p_types) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'configure_fair_share: p_types must be a JSON object';
    END IF;
    SELECT t.key INTO v_bad FROM jsonb_each(p_types) t
    WHERE NOT t.key = ANY (p_served) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'configure_fair_share: % is not among the served types', v_bad;
    END IF;
    SELECT t.key || '.' || w.key INTO v_bad
    FROM jsonb_each(p_types) t, jsonb_each(coalesce(t.value -> 'weights', '{}')) w
    WHERE jsonb_typeof(w.value) <> 'number' OR (w.value #>> '{}')::float8 <= 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'configure_fair_share: weight % must be a number > 0', v_bad;
    END IF;
    -- One configuration at a time: several supervisors may reload together.
    PERFORM pg_advisory_xact_lock(hashtext('jobvisor.fair_share'), 0);
    v_before := jobvisor.fair_share_types();
    DELETE FROM jobvisor.fair_types
    WHERE job_type = ANY (p_served) AND NOT p_types ? job_type;
    INSERT INTO jobvisor.fair_types AS f (job_type, field, path, weights, max_running_per_key)
    SELECT t.key, t.value ->> 'field', string_to_array(t.value ->> 'field', '.'),
           coalesce(t.value -> 'weights', '{}'), (t.value ->> 'max_running_per_key')::int
    FROM jsonb_each(p_types) t
    ORDER BY t.key
    ON CONFLICT (job_type) DO UPDATE
        SET field = excluded.field, path = excluded.path, weights = excluded.weights,
            max_running_per_key = excluded.max_running_per_key, updated_at = now()
        WHERE (f.field, f.weights, f.max_running_per_key)
              IS DISTINCT FROM (excluded.field, excluded.weights, excluded.max_running_per_key);
    SELECT coalesce(array_agg(job_type ORDER BY job_type), '{}') INTO v_after
    FROM jobvisor.fair_types;
    IF v_after IS DISTINCT FROM v_before THEN
        PERFORM set_config('lock_timeout', '2s', true);
        LOCK TABLE jobvisor.jobs IN SHARE ROW EXCLUSIVE MODE;
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION jobvisor.fair_share_types() RETURNS text[] '
            'LANGUAGE sql STABLE PARALLEL SAFE AS %L',
            format('SELECT %L::text[]', v_after));
    END IF;
    RETURN v_after IS DISTINCT FROM v_before;
END
$$;

-- Live jobs of a fair type that have no key (queued or leased before the type was fair)
-- get one, up to p_limit a call; returns how many. Their tag stays NULL, which the lease
-- takes first. Once a call finds none left, the type is marked done: no unkeyed job can
-- appear after configure_fair_share's lock, but for an operator's retry of an old
-- failed job, which keys it itself (workers/core/queue.py, _RETRY_FAILED).
CREATE FUNCTION jobvisor.fair_key_backlog(p_type text, p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_path   text[];
    v_queued int;
    v_leased int;
BEGIN
    SELECT path INTO v_path FROM jobvisor.fair_types
    WHERE job_type = p_type AND NOT backlog_done;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- Through jobs_lease_order and jobs_leased (status first): never the finished rows.
    UPDATE jobvisor.jobs j SET fair_key = jobvisor.fair_key_of(j.payload, v_path)
    WHERE j.id = ANY (ARRAY(
        SELECT id FROM jobvisor.jobs
        WHERE job_type = p_type AND status = 'queued' AND fair_key IS NULL
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    UPDATE jobvisor.jobs j SET fair_key = jobvisor.fair_key_of(j.payload, v_path)
    WHERE j.id = ANY (ARRAY(
        SELECT id FROM jobvisor.jobs
        WHERE job_type = p_type AND status = 'leased' AND fair_key IS NULL
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_leased = ROW_COUNT;
    IF v_queued + v_leased = 0
       AND NOT EXISTS (SELECT 1 FROM jobvisor.jobs
                       WHERE job_type = p_type AND status = 'queued' AND fair_key IS NULL)
       AND NOT EXISTS (SELECT 1 FROM jobvisor.jobs
                       WHERE job_type = p_type AND status = 'leased' AND fair_key IS NULL) THEN
        UPDATE jobvisor.fair_types SET backlog_done = true WHERE job_type = p_type;
    END IF;
    RETURN v_queued + v_leased;
END
$$;

REVOKE EXECUTE ON FUNCTION jobvisor.configure_fair_share(jsonb, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION jobvisor.fair_key_backlog(text, int) FROM PUBLIC;


-- --- least privilege ---------------------------------------------------------------------
-- The insert trigger runs as the inserting role and only reads: the worker role (whose
-- handlers enqueue follow-up jobs) needs to read the configuration, nothing more. The
-- operator's retry of a failed job reads it too.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker') THEN
        GRANT SELECT ON jobvisor.fair_types TO jobvisor_worker;
    END IF;
END
$$;
