-- 003_learning: the learning platform's submissions and the pipeline's database side.
--
-- Everything lives in schema `public` under the names the platform's runbook already
-- uses (`public.learning_worker_update_failed(...)`, `public.learning_worker_health_probe()`),
-- so the platform and jobvisor share one vocabulary. See docs/pipeline.md.
--
-- Trust model: row-level security keyed on `app.current_sub` isolates the jobs a worker
-- runs from each other (a job sets its owner at the start of its transaction); it guards
-- against a mis-set context, not against a worker that sets any subject it likes.

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

CREATE TABLE public.learning_submissions (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_sub       text        NOT NULL CHECK (owner_sub <> ''),
    source_key      text        NOT NULL CHECK (source_key <> ''),   -- storage key of the upload
    mime_type       text        NOT NULL,
    criteria        jsonb       NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(criteria) = 'array'),
    analysis_status text        NOT NULL DEFAULT 'pending'
                    CHECK (analysis_status IN ('pending', 'extracted', 'completed', 'failed')),
    text_body       text,
    feedback_md     text,
    analysis_json   jsonb,
    error_code      text        CHECK (error_code ~ '^[a-z][a-z0-9_]{0,63}$'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    extracted_at    timestamptz,
    finished_at     timestamptz,
    CONSTRAINT completed_has_feedback CHECK (
        analysis_status <> 'completed' OR (text_body IS NOT NULL AND feedback_md IS NOT NULL)),
    CONSTRAINT failed_has_error_code CHECK (analysis_status <> 'failed' OR error_code IS NOT NULL),
    CONSTRAINT finished_has_finished_at CHECK (
        (analysis_status IN ('completed', 'failed')) = (finished_at IS NOT NULL))
);

CREATE INDEX learning_submissions_owner ON public.learning_submissions (owner_sub, created_at DESC);

-- FORCE: the table's owner is held to the policy too, unless it is a superuser.
ALTER TABLE public.learning_submissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.learning_submissions FORCE ROW LEVEL SECURITY;

CREATE POLICY learning_submissions_owner ON public.learning_submissions
    USING (owner_sub = current_setting('app.current_sub', true))
    WITH CHECK (owner_sub = current_setting('app.current_sub', true));

-- --- least privilege for the worker role -----------------------------------------------

REVOKE ALL ON public.learning_submissions FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO jobvisor_worker;
GRANT USAGE ON SCHEMA jobvisor TO jobvisor_worker;
GRANT SELECT, INSERT, UPDATE ON jobvisor.jobs TO jobvisor_worker;
-- Reads only, and only what the policy lets through: every write goes through the
-- guarded functions below.
GRANT SELECT ON public.learning_submissions TO jobvisor_worker;

DO $$
DECLARE
    seq text := pg_catalog.pg_get_serial_sequence('jobvisor.jobs', 'id');
BEGIN
    IF seq IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO jobvisor_worker', seq);
    END IF;
END
$$;

-- --- guarded writes ------------------------------------------------------------------------
-- Each function changes one submission of the caller's `app.current_sub` in the state it
-- expects. A submission that is missing or someone else's raises no_data_found (the same
-- error for both, so existence does not leak); one in another state is left alone and
-- the function returns false. search_path is pinned and every name qualified.

CREATE FUNCTION public.learning_worker_update_extracted(p_submission_id uuid, p_text text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_text IS NULL OR btrim(p_text) = '' THEN
        RAISE EXCEPTION 'extracted text must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- `extracted` without text is accepted too: an earlier run marked it before storing
    -- text, and vision must be able to fill it in (OCR-reuse fallback).
    UPDATE public.learning_submissions s
    SET analysis_status = 'extracted', text_body = p_text, error_code = NULL,
        extracted_at = now(), updated_at = now()
    WHERE s.id = p_submission_id
      AND s.owner_sub = current_setting('app.current_sub', true)
      AND (s.analysis_status = 'pending'
           OR (s.analysis_status = 'extracted' AND coalesce(btrim(s.text_body), '') = ''));
    IF FOUND THEN
        RETURN true;
    END IF;
    PERFORM 1 FROM public.learning_submissions s
    WHERE s.id = p_submission_id AND s.owner_sub = current_setting('app.current_sub', true);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'learning submission not found' USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END
$$;

CREATE FUNCTION public.learning_worker_update_completed(
    p_submission_id uuid, p_feedback_md text, p_analysis_json jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_feedback_md IS NULL OR btrim(p_feedback_md) = '' THEN
        RAISE EXCEPTION 'feedback must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE public.learning_submissions s
    SET analysis_status = 'completed', feedback_md = p_feedback_md,
        analysis_json = p_analysis_json, error_code = NULL, finished_at = now(),
        updated_at = now()
    WHERE s.id = p_submission_id
      AND s.owner_sub = current_setting('app.current_sub', true)
      AND s.analysis_status = 'extracted'
      AND coalesce(btrim(s.text_body), '') <> '';
    IF FOUND THEN
        RETURN true;
    END IF;
    PERFORM 1 FROM public.learning_submissions s
    WHERE s.id = p_submission_id AND s.owner_sub = current_setting('app.current_sub', true);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'learning submission not found' USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END
$$;

CREATE FUNCTION public.learning_worker_update_failed(p_submission_id uuid, p_error_code text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_error_code IS NULL OR p_error_code !~ '^[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error code must match ^[a-z][a-z0-9_]{0,63}$'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE public.learning_submissions s
    SET analysis_status = 'failed', error_code = p_error_code, finished_at = now(),
        updated_at = now()
    WHERE s.id = p_submission_id
      AND s.owner_sub = current_setting('app.current_sub', true)
      AND s.analysis_status IN ('pending', 'extracted');
    IF FOUND THEN
        RETURN true;
    END IF;
    PERFORM 1 FROM public.learning_submissions s
    WHERE s.id = p_submission_id AND s.owner_sub = current_setting('app.current_sub', true);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'learning submission not found' USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END
$$;

-- --- how a job's outcome reaches its submission ---------------------------------------
-- The queue decides in SQL whether a failure is final (attempts used up, a permanent
-- error, a timeout, a rescued lease of a dead worker, a cancel). This trigger reacts in
-- the very statement that writes that decision, which is fenced by the job's lease_key:
-- the submission changes exactly when the job's outcome commits, whichever process
-- (worker thread, worker loop, supervisor rescue, operator CLI) wrote it.
--   job failed/cancelled              -> submission failed with a stage error code
--   vision/feedback job back to queue -> submission keeps its status, error_code <stage>_retrying
--   failed job queued again (operator `jobvisor jobs retry`) -> submission reopened
CREATE FUNCTION public.learning_job_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_raw   text := NEW.payload ->> 'submission_id';
    v_owner text := NEW.payload ->> 'owner_sub';
    v_prev  text := current_setting('app.current_sub', true);
    v_id    uuid;
    v_code  text;
BEGIN
    -- A malformed payload must never break the queue statement that fired us (a rescue
    -- updates many jobs at once): ignore it, the job row keeps its own error.
    IF v_raw IS NULL OR v_raw !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       OR coalesce(v_owner, '') = '' THEN
        RETURN NULL;
    END IF;
    v_id := v_raw::uuid;
    -- Act as the job's owner (the policy binds a non-superuser owner of this function),
    -- and put the caller's subject back afterwards.
    PERFORM set_config('app.current_sub', v_owner, true);
    IF NEW.status IN ('failed', 'cancelled') THEN
        v_code := CASE
            WHEN NEW.status = 'cancelled' THEN NEW.job_type || '_cancelled'
            -- a stage's own code says most (pdf_invalid, vision_failed, vision_timeout)...
            WHEN NEW.error_code ~ '^(pdf|image|vision|feedback)_[a-z0-9_]+$'
                 AND NEW.error_code !~ '_retrying$'
                 AND length(NEW.error_code) <= 64 THEN NEW.error_code
            -- ...retries that ran out, unexpected errors, rescued leases: the stage failed
            ELSE NEW.job_type || '_failed'
        END;
        UPDATE public.learning_submissions s
        SET analysis_status = 'failed', error_code = v_code, finished_at = now(),
            updated_at = now()
        WHERE s.id = v_id AND s.owner_sub = v_owner
          AND s.analysis_status IN ('pending', 'extracted');
    ELSIF OLD.status = 'leased' THEN
        UPDATE public.learning_submissions s
        SET error_code = NEW.job_type || '_retrying', updated_at = now()
        WHERE s.id = v_id AND s.owner_sub = v_owner
          AND s.analysis_status IN ('pending', 'extracted');
    ELSE
        -- Back to the state the stage starts from: text already stored means extracted.
        UPDATE public.learning_submissions s
        SET analysis_status = CASE WHEN coalesce(btrim(s.text_body), '') <> ''
                                   THEN 'extracted' ELSE 'pending' END,
            error_code = NULL, finished_at = NULL, updated_at = now()
        WHERE s.id = v_id AND s.owner_sub = v_owner AND s.analysis_status = 'failed';
    END IF;
    PERFORM set_config('app.current_sub', coalesce(v_prev, ''), true);
    RETURN NULL;
END
$$;

-- AFTER ... OF status with a WHEN clause: heartbeats and progress never consider it, and
-- completions (the hot path) only evaluate the condition; nothing is queued for them.
-- pdf retries are not mirrored: the runbook's retry codes are vision_* and feedback_*,
-- and a pdf_retrying code would outlive the pdf stage's success.
CREATE TRIGGER learning_job_outcome
    AFTER UPDATE OF status ON jobvisor.jobs
    FOR EACH ROW
    WHEN (NEW.job_type IN ('pdf', 'vision', 'feedback')
          AND NEW.status IS DISTINCT FROM OLD.status
          AND (NEW.status IN ('failed', 'cancelled')
               OR (NEW.status = 'queued' AND OLD.status IN ('failed', 'cancelled'))
               OR (NEW.status = 'queued' AND OLD.status = 'leased'
                   AND NEW.job_type <> 'pdf' AND NEW.error_code IS NOT NULL))
          AND NEW.payload ? 'submission_id')
    EXECUTE FUNCTION public.learning_job_outcome();

-- --- health probe ------------------------------------------------------------------------
-- Inside a SECURITY DEFINER function current_user is the owner, so the caller is judged
-- by session_user (the login role of the worker's DSN).
CREATE FUNCTION public.learning_worker_health_probe()
RETURNS TABLE (check_name text, ok boolean, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_caller name := session_user;
    v_role   boolean := EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobvisor_worker');
    v_super  boolean := coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = session_user), false);
    v_queued bigint;
BEGIN
    check_name := 'db_role';
    ok := v_role;
    detail := CASE WHEN v_role THEN 'role jobvisor_worker exists'
                   ELSE 'role jobvisor_worker is missing' END;
    RETURN NEXT;

    check_name := 'current_role';
    ok := v_super OR (v_role AND pg_has_role(v_caller, 'jobvisor_worker', 'MEMBER'));
    detail := v_caller || CASE WHEN v_super THEN ' (superuser)'
                               WHEN ok THEN ' (member of jobvisor_worker)'
                               ELSE ' (not a member of jobvisor_worker)' END;
    RETURN NEXT;

    check_name := 'queue_visible';
    BEGIN
        -- A list of privileges is true when any is held: ask for each.
        ok := has_table_privilege(v_caller, 'jobvisor.jobs', 'SELECT')
              AND has_table_privilege(v_caller, 'jobvisor.jobs', 'UPDATE');
        SELECT count(*) INTO v_queued FROM jobvisor.jobs
        WHERE status = 'queued' AND job_type IN ('pdf', 'vision', 'feedback');
        detail := 'queued learning jobs: ' || v_queued
                  || CASE WHEN ok THEN '' ELSE ' (caller lacks SELECT/UPDATE on jobvisor.jobs)' END;
    EXCEPTION WHEN undefined_table OR invalid_schema_name THEN
        ok := false;
        detail := 'jobvisor.jobs does not exist';
    END;
    RETURN NEXT;

    check_name := 'submissions_rls';
    SELECT c.relrowsecurity AND c.relforcerowsecurity INTO ok
    FROM pg_class c WHERE c.oid = 'public.learning_submissions'::regclass;
    detail := CASE WHEN ok THEN 'row-level security enabled and forced'
                   ELSE 'row-level security is not enabled and forced' END;
    RETURN NEXT;

    check_name := 'worker_functions';
    ok := has_function_privilege(v_caller, 'public.learning_worker_update_extracted(uuid, text)', 'EXECUTE')
      AND has_function_privilege(v_caller, 'public.learning_worker_update_completed(uuid, text, jsonb)', 'EXECUTE')
      AND has_function_privilege(v_caller, 'public.learning_worker_update_failed(uuid, text)', 'EXECUTE');
    detail := CASE WHEN ok THEN 'caller may execute the guarded writes'
                   ELSE 'caller lacks EXECUTE on learning_worker_update_*' END;
    RETURN NEXT;
END
$$;

REVOKE EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_failed(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_health_probe() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_job_outcome() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_failed(uuid, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_health_probe() TO jobvisor_worker;
