-- 003_worker_role: the least-privilege role worker processes log in as (a member of
-- `jobvisor_worker`, see README "Database roles"), with what the queue needs of it.
--
-- Plug-ins grant the role what their own tables need in their own migrations. Databases
-- from before the plug-in split got these grants from the former 003_learning (now the
-- learning plug-in's 001): stating them again changes nothing there.

-- Roles are cluster-wide and several databases on one server run this file (tests, maybe
-- at the same moment): create the group role only if missing, and tolerate the race.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker') THEN
        BEGIN
            CREATE ROLE jobvisor_worker NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database's migration created it between the check and now
        END;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA jobvisor TO jobvisor_worker;
GRANT SELECT, INSERT, UPDATE ON jobvisor.jobs TO jobvisor_worker;

DO $$
DECLARE
    seq text := pg_catalog.pg_get_serial_sequence('jobvisor.jobs', 'id');
BEGIN
    IF seq IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO jobvisor_worker', seq);
    END IF;
END
$$;
