-- 011_job_type_domain: the job type's name rule checked where a name is written, not on
-- every update of a job (issue #15).
--
-- As a table CHECK, `job_type ~ '^[a-z][a-z0-9_]{0,62}$'` ran on every new row version:
-- the lease and the acknowledgement of every job, though neither writes the type. That
-- regex costs ~8 µs per updated row on the benchmark machine (200,000-row UPDATE: 3.4 s
-- with it, 1.7 s without or with this domain; docs/benchmarks.md), i.e. ~16 µs of server
-- CPU per job. A domain's constraint is checked only where a value is written to the
-- column (INSERT, COPY, an UPDATE that sets job_type), with the same rule and a clear
-- error: `value for domain jobvisor.job_type_name violates check constraint ...`.
--
-- The table is not rewritten: the domain is added without its constraint (text and the
-- domain are binary-compatible), then the constraint NOT VALID (every stored name already
-- passed the table CHECK it replaces), then that CHECK is dropped. The indexes on
-- job_type are rebuilt, though (seen: new relfilenodes), while the table is held, so
-- writes wait as for an index build (docs/runbook.md, Troubleshooting).
--
-- PostgreSQL refuses to change the type of a column that a trigger's WHEN names (ours in
-- sql/009, a plug-in's such as learning's). Those triggers are dropped and re-created
-- from their own definitions in this same transaction, enabled or disabled as they
-- were. A view or policy on jobvisor.jobs that names job_type makes this migration fail
-- as a whole, with PostgreSQL's error naming it; nothing is changed then.

CREATE DOMAIN jobvisor.job_type_name AS text;

DO $$
DECLARE
    v_defs text[];
    v_names text[];
    v_states "char"[];
    v_i int;
    v_name text;
BEGIN
    SELECT coalesce(array_agg(pg_catalog.pg_get_triggerdef(t.oid) ORDER BY t.tgname), '{}'),
           coalesce(array_agg(t.tgname::text ORDER BY t.tgname), '{}'),
           coalesce(array_agg(t.tgenabled ORDER BY t.tgname), '{}')
    INTO v_defs, v_names, v_states
    FROM pg_catalog.pg_trigger t
    WHERE t.tgrelid = 'jobvisor.jobs'::regclass AND NOT t.tgisinternal
      AND t.tgqual IS NOT NULL;
    FOREACH v_name IN ARRAY v_names LOOP
        EXECUTE format('DROP TRIGGER %I ON jobvisor.jobs', v_name);
    END LOOP;
    ALTER TABLE jobvisor.jobs ALTER COLUMN job_type TYPE jobvisor.job_type_name;
    FOR v_i IN 1 .. coalesce(array_length(v_defs, 1), 0) LOOP
        EXECUTE v_defs[v_i];
        -- as it was: disabled, or enabled for replicas only or always ('O' is the default)
        EXECUTE format('ALTER TABLE jobvisor.jobs %s TRIGGER %I',
                       CASE v_states[v_i] WHEN 'D' THEN 'DISABLE' WHEN 'R' THEN 'ENABLE REPLICA'
                            WHEN 'A' THEN 'ENABLE ALWAYS' ELSE 'ENABLE' END, v_names[v_i]);
    END LOOP;
END
$$;

ALTER DOMAIN jobvisor.job_type_name
    ADD CONSTRAINT job_type_name_check CHECK (VALUE ~ '^[a-z][a-z0-9_]{0,62}$') NOT VALID;

ALTER TABLE jobvisor.jobs DROP CONSTRAINT jobs_job_type_check;
