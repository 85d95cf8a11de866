-- 003_outcomes: a stage's outcome reaches its submission through the plug-in's outcomes
-- hook, not a trigger on the core's jobs table.
--
-- The queue decides in SQL whether a failure is final (attempts used up, a permanent
-- error, a timeout, a rescued lease of a dead worker, a cancel). Whoever writes that
-- decision (a worker thread, a worker loop, the supervisor's rescue, the operator CLI)
-- goes through workers/core/queue.py, which hands the changed jobs to the plug-in's hook
-- (workers/learning/outcomes.py) in the same transaction: the submission changes exactly
-- when the job's outcome commits.
--   job failed/cancelled              -> submission failed with a stage error code
--   vision/feedback job back to queue -> submission keeps its status, error_code <stage>_retrying
--   failed job queued again (operator `jobvisor jobs retry`) -> submission reopened
-- pdf retries are not mirrored: the runbook's retry codes are vision_* and feedback_*,
-- and a pdf_retrying code would outlive the pdf stage's success.

DROP TRIGGER IF EXISTS learning_job_outcome ON jobvisor.jobs;
DROP FUNCTION IF EXISTS public.learning_job_outcome();

-- p_ids: the jobs that changed, in this transaction; p_was: the status each left. The
-- status each entered is read from its row (the change is visible to us already).
CREATE FUNCTION public.learning_record_outcomes(p_ids bigint[], p_was text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_prev  text := current_setting('app.current_sub', true);
    r       record;
    v_id    uuid;
    v_code  text;
BEGIN
    -- In job id order: two transactions touching the same submissions lock them in one order.
    FOR r IN
        SELECT j.id, j.job_type, j.status, j.error_code, d.was,
               j.payload ->> 'submission_id' AS raw_id, j.payload ->> 'owner_sub' AS owner
        FROM unnest(p_ids, p_was) AS d(id, was)
        JOIN jobvisor.jobs j ON j.id = d.id
        WHERE j.job_type IN ('pdf', 'vision', 'feedback')
          AND jsonb_typeof(j.payload) = 'object'
        ORDER BY j.id
    LOOP
        -- A malformed payload must never break the queue statement that called us (a
        -- rescue changes many jobs at once): skip it, the job row keeps its own error.
        CONTINUE WHEN r.raw_id IS NULL
            OR r.raw_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
            OR coalesce(r.owner, '') = '';
        v_id := r.raw_id::uuid;
        -- Act as the job's owner (the policy binds a non-superuser owner of this function).
        PERFORM set_config('app.current_sub', r.owner, true);
        IF r.status IN ('failed', 'cancelled') THEN
            v_code := CASE
                WHEN r.status = 'cancelled' THEN r.job_type || '_cancelled'
                -- a stage's own code says most (pdf_invalid, vision_failed, vision_timeout)...
                WHEN r.error_code ~ '^(pdf|image|vision|feedback)_[a-z0-9_]+$'
                     AND r.error_code !~ '_retrying$'
                     AND length(r.error_code) <= 64 THEN r.error_code
                -- ...retries that ran out, unexpected errors, rescued leases: the stage failed
                ELSE r.job_type || '_failed'
            END;
            UPDATE public.learning_submissions s
            SET analysis_status = 'failed', error_code = v_code, finished_at = v_now,
                updated_at = v_now
            WHERE s.id = v_id AND s.owner_sub = r.owner
              AND s.analysis_status IN ('pending', 'extracted');
        ELSIF r.status = 'queued' AND r.was = 'leased' THEN
            IF r.job_type <> 'pdf' AND r.error_code IS NOT NULL THEN
                UPDATE public.learning_submissions s
                SET error_code = r.job_type || '_retrying', updated_at = v_now
                WHERE s.id = v_id AND s.owner_sub = r.owner
                  AND s.analysis_status IN ('pending', 'extracted');
            END IF;
        ELSIF r.status = 'queued' AND r.was IN ('failed', 'cancelled') THEN
            -- Back to the state the stage starts from: text already stored means extracted.
            UPDATE public.learning_submissions s
            SET analysis_status = CASE WHEN coalesce(btrim(s.text_body), '') <> ''
                                       THEN 'extracted' ELSE 'pending' END,
                error_code = NULL, finished_at = NULL, updated_at = v_now
            WHERE s.id = v_id AND s.owner_sub = r.owner AND s.analysis_status = 'failed';
        END IF;
    END LOOP;
    PERFORM set_config('app.current_sub', coalesce(v_prev, ''), true);
END
$$;

REVOKE EXECUTE ON FUNCTION public.learning_record_outcomes(bigint[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.learning_record_outcomes(bigint[], text[]) TO jobvisor_worker;
