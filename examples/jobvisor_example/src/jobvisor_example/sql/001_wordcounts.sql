-- 001_wordcounts: the example plug-in's own table, one row per counted example_wordcount
-- job, written by the handler in the job's completing transaction (ctx.db).
--
-- Applied by `jobvisor migrate` after the core's migrations (so the role jobvisor_worker,
-- created by the core's 003, exists) and recorded as component 'example', version 1.
-- No foreign key to jobvisor.jobs: the counts outlive the jobs' rows.

CREATE SCHEMA jobvisor_example;

CREATE TABLE jobvisor_example.wordcounts (
    job_id     bigint      PRIMARY KEY,
    lines      integer     NOT NULL CHECK (lines >= 0),
    words      integer     NOT NULL CHECK (words >= 0),
    counted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- What worker processes need of it: they insert; `jobvisor example-totals` reads as the
-- owner.
GRANT USAGE ON SCHEMA jobvisor_example TO jobvisor_worker;
GRANT SELECT, INSERT ON jobvisor_example.wordcounts TO jobvisor_worker;
