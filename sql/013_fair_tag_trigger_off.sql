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
-- lock_timeout), and holds it to the end of its transaction. sql/009's function keeps
-- that work under a new name; configure_fair_share calls it and then, when the set
-- changed, enables the trigger if the set is not empty and disables it if it is, under
-- that lock, in the same transaction. What a fair type's jobs get is unchanged.

ALTER FUNCTION jobvisor.configure_fair_share(jsonb, text[])
    RENAME TO configure_fair_share_list;

CREATE FUNCTION jobvisor.configure_fair_share(p_types jsonb, p_served text[]) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT jobvisor.configure_fair_share_list(p_types, p_served) THEN
        RETURN false;
    END IF;
    -- The list was rewritten under the lock, which this transaction still holds.
    EXECUTE format('ALTER TABLE jobvisor.jobs %s TRIGGER jobs_fair_tag',
                   CASE WHEN EXISTS (SELECT FROM jobvisor.fair_types)
                        THEN 'ENABLE' ELSE 'DISABLE' END);
    RETURN true;
END
$$;
-- The owner's, as sql/009's was (the renamed one keeps its grants).
REVOKE EXECUTE ON FUNCTION jobvisor.configure_fair_share(jsonb, text[]) FROM PUBLIC;

-- A database with no fair type yet: off now. (ALTER TABLE takes the same lock, briefly.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM jobvisor.fair_types) THEN
        ALTER TABLE jobvisor.jobs DISABLE TRIGGER jobs_fair_tag;
    END IF;
END
$$;
