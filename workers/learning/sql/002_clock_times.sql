-- 002_clock_times: the times a stage's writes record are the moments of those writes.
--
-- `now()` is the start of the transaction. Handlers read in a short transaction, do the
-- slow work (OCR, a model call) with none open, and only then open the transaction that
-- writes the outcome and completes the job (workers/core/context.py); still, a transaction
-- that opened early would stamp the submission's `extracted_at` / `finished_at` with the
-- start of the work. `clock_timestamp()` is the moment of the write.
--
-- Each function is its 001_learning body with only the time source changed:
-- `clock_timestamp()` is read once per call (`v_now`), so the columns one call stamps
-- stay equal to each other, as they were with `now()`. Signatures, SECURITY DEFINER,
-- search_path and grants are unchanged (CREATE OR REPLACE keeps owner and privileges;
-- the grants are stated again at the end all the same). This was the learning half of
-- the core's former 008_clock_times (adopted by the plug-in on upgrade).

-- --- 001_learning: the guarded writes ---------------------------------------------------

CREATE OR REPLACE FUNCTION public.learning_worker_update_extracted(p_submission_id uuid, p_text text)
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
    -- `extracted` without text is accepted too: an earlier run marked it before storing
    -- text, and vision must be able to fill it in (OCR-reuse fallback).
    UPDATE public.learning_submissions s
    SET analysis_status = 'extracted', text_body = p_text, error_code = NULL,
        extracted_at = v_now, updated_at = v_now
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

CREATE OR REPLACE FUNCTION public.learning_worker_update_completed(
    p_submission_id uuid, p_feedback_md text, p_analysis_json jsonb)
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
    UPDATE public.learning_submissions s
    SET analysis_status = 'completed', feedback_md = p_feedback_md,
        analysis_json = p_analysis_json, error_code = NULL, finished_at = v_now,
        updated_at = v_now
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

CREATE OR REPLACE FUNCTION public.learning_worker_update_failed(p_submission_id uuid, p_error_code text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_error_code IS NULL OR p_error_code !~ '^[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error code must match ^[a-z][a-z0-9_]{0,63}$'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE public.learning_submissions s
    SET analysis_status = 'failed', error_code = p_error_code, finished_at = v_now,
        updated_at = v_now
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

-- --- 001_learning: how a job's outcome reaches its submission -------------------------

CREATE OR REPLACE FUNCTION public.learning_job_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now   timestamptz := clock_timestamp();
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
        SET analysis_status = 'failed', error_code = v_code, finished_at = v_now,
            updated_at = v_now
        WHERE s.id = v_id AND s.owner_sub = v_owner
          AND s.analysis_status IN ('pending', 'extracted');
    ELSIF OLD.status = 'leased' THEN
        UPDATE public.learning_submissions s
        SET error_code = NEW.job_type || '_retrying', updated_at = v_now
        WHERE s.id = v_id AND s.owner_sub = v_owner
          AND s.analysis_status IN ('pending', 'extracted');
    ELSE
        -- Back to the state the stage starts from: text already stored means extracted.
        UPDATE public.learning_submissions s
        SET analysis_status = CASE WHEN coalesce(btrim(s.text_body), '') <> ''
                                   THEN 'extracted' ELSE 'pending' END,
            error_code = NULL, finished_at = NULL, updated_at = v_now
        WHERE s.id = v_id AND s.owner_sub = v_owner AND s.analysis_status = 'failed';
    END IF;
    PERFORM set_config('app.current_sub', coalesce(v_prev, ''), true);
    RETURN NULL;
END
$$;

-- --- privileges, as 001_learning left them ---------------------------------------------------

REVOKE EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_worker_update_failed(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.learning_job_outcome() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION public.learning_worker_update_extracted(uuid, text) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_completed(uuid, text, jsonb) TO jobvisor_worker;
GRANT EXECUTE ON FUNCTION public.learning_worker_update_failed(uuid, text) TO jobvisor_worker;
