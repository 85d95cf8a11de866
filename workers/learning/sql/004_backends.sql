-- 004_backends: a submission records which backend produced its text and its feedback
-- (issue #14, "Honest defaults": the default backend is a stub, and a reader of the row
-- must be able to tell its placeholders from a model's work).
--
--   text_backend      stub        the stub's placeholder (no OCR happened)
--                     text_layer  the PDF's own text layer (real text, no OCR needed)
--                     ollama | tesseract   the OCR engine that read the pages
--   feedback_backend  stub | dspy | ollama  what wrote the feedback (ollama also after a
--                                           DSPy fallback: the backend used, not configured)
--   NULL              unknown: written before this migration, by a worker from before it,
--                     or (text) stored by the platform itself
--
-- The values are checked for shape, not against a list: a new engine needs no migration.
--
-- New overloads of the two guarded writes take the backend; the old signatures stay, so
-- workers from before this migration keep working during a rolling upgrade (they record
-- NULL). No DEFAULT on the new parameter: a default would make a two-argument call match
-- both overloads ("function is not unique"). Bodies are 002_clock_times' with only the
-- backend added: the same guards, SECURITY DEFINER, pinned search_path, clock_timestamp().

ALTER TABLE public.learning_submissions
    ADD COLUMN text_backend     text CHECK (text_backend ~ '^[a-z][a-z0-9_]{0,31}$'),
    ADD COLUMN feedback_backend text CHECK (feedback_backend ~ '^[a-z][a-z0-9_]{0,31}$');

-- --- guarded writes, with the backend ------------------------------------------------------

CREATE FUNCTION public.learning_worker_update_extracted(
    p_submission_id uuid, p_text text, p_text_backend text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_text IS NULL OR btrim(p_text) = '' THEN
        RAISE EXCEPTION 'extracted text must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_text_backend IS NOT NULL AND p_text_backend !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'text backend must match ^[a-z][a-z0-9_]{0,31}$'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- `extracted` without text is accepted too: an earlier run marked it before storing
    -- text, and vision must be able to fill it in (OCR-reuse fallback).
    UPDATE public.learning_submissions s
    SET analysis_status = 'extracted', text_body = p_text, text_backend = p_text_backend,
        error_code = NULL, extracted_at = v_now, updated_at = v_now
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
    p_submission_id uuid, p_feedback_md text, p_analysis_json jsonb, p_feedback_backend text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_feedback_md IS NULL OR btrim(p_feedback_md) = '' THEN
        RAISE EXCEPTION 'feedback must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_feedback_backend IS NOT NULL AND p_feedback_backend !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'feedback backend must match ^[a-z][a-z0-9_]{0,31}$'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE public.learning_submissions s
    SET analysis_status = 'completed', feedback_md = p_feedback_md,
        analysis_json = p_analysis_json, feedback_backend = p_feedback_backend,
        error_code = NULL, finished_at = v_now, updated_at = v_now
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

-- --- the old signatures, for workers from before this migration ---------------------------
-- Their callers know no backend: they record NULL (unknown), never a stale value. The
-- same body, once: they call the overloads above (as this function's owner, who may).
-- CREATE OR REPLACE keeps owner and privileges; the grants are stated again below.

CREATE OR REPLACE FUNCTION public.learning_worker_update_extracted(p_submission_id uuid, p_text text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN public.learning_worker_update_extracted(p_submission_id, p_text, NULL::text);
END
$$;

CREATE OR REPLACE FUNCTION public.learning_worker_update_completed(
    p_submission_id uuid, p_feedback_md text, p_analysis_json jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN public.learning_worker_update_completed(p_submission_id, p_feedback_md,
                                                   p_analysis_json, NULL::text);
END
$$;

-- --- health probe: the writes today's workers call --------------------------------------
-- 001_learning's probe, with `worker_functions` also asking for the overloads above
-- (a role lacking them would pass the old check and fail every write).

CREATE OR REPLACE FUNCTION public.learning_worker_health_probe()
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
      AND has_function_privilege(v_caller, 'public.learning_worker_update_failed(uuid, text)', 'EXECUTE')
      AND has_function_privilege(v_caller, 'public.learning_worker_update_extracted(uuid, text, text)', 'EXECUTE')
      AND has_function_privilege(v_caller, 'public.learning_worker_update_completed(uuid, text, jsonb, text)', 'EXECUTE');
    detail := CASE WHEN ok THEN 'caller may execute the guarded writes'
                   ELSE 'caller lacks EXECUTE on learning_worker_update_*' END;
    RETURN NEXT;
END
$$;

-- --- privileges -----------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_health_probe() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_health_probe() TO jobvisor_worker;
