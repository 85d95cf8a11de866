-- 013_fair_tag_trigger_off: the fair-share insert trigger is enabled only while some type
-- is fair (issue #15).
--
-- sql/009's BEFORE INSERT trigger jobs_fair_tag ran for every insert statement, fair type
-- or not: its WHEN (the fair types, inlined from jobvisor.fair_share_types()) is parsed
-- and planned again by every statement that inserts, before its first row. A one-job
-- enqueue, the first step of the wake-up path, paid about 0.05 ms of the 0.38 ms its
-- execution took on the benchmark machine, paired over 300 inserts (docs/benchmarks.md).
-- A disabled trigger is passed over before its WHEN is looked at.
--
-- configure_fair_share already takes a SHARE ROW EXCLUSIVE lock on the jobs whenever the
-- set of fair types changes (it waits for every writer and holds new ones, for at most
-- lock_timeout): it now also enables the trigger when the set becomes non-empty and
-- disables it when it becomes empty, under that lock, in the same transaction. What a
-- fair type's jobs get is unchanged.

CREATE OR REPLACE FUNCTION jobvisor.configure_fair_share(p_types jsonb, p_served text[]) RETURNS boolean
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
        -- Under the same lock: the trigger runs only while some type is fair.
        EXECUTE format('ALTER TABLE jobvisor.jobs %s TRIGGER jobs_fair_tag',
                       CASE WHEN cardinality(v_after) = 0 THEN 'DISABLE' ELSE 'ENABLE' END);
    END IF;
    RETURN v_after IS DISTINCT FROM v_before;
END
$$;

-- A database with no fair type yet: off now. (ALTER TABLE takes the same lock, briefly.)
DO $$
BEGIN
    IF cardinality(jobvisor.fair_share_types()) = 0 THEN
        ALTER TABLE jobvisor.jobs DISABLE TRIGGER jobs_fair_tag;
    END IF;
END
$$;
