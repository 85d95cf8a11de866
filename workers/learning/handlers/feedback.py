"""`feedback` jobs: the submission's stored text + its criteria → feedback, completed.

Payload (written by the vision stage): `{"submission_id", "owner_sub"}`. The text comes
from the submission row (never from vision: a retry here repeats only the feedback
call). The backend is `workers.learning.ai.feedback.feedback_backend()` (stub | dspy | ollama,
from AI_FEEDBACK_BACKEND / AI_BACKEND; DSPy falls back to a direct Ollama call).

The submission is read in a short read-only transaction (`ctx.read()`) that ends before
the model call; the result is stored afterwards through `learning_worker_update_completed`
(which refuses a submission that moved on meanwhile), with the backend that actually
wrote it (`feedback_backend`: stub | dspy | ollama, ollama also after a DSPy fallback),
in this job's fenced, completing transaction. The language is AI_FEEDBACK_LANGUAGE
(de | en); an unknown one fails the job as a configuration error. Errors:
`TransientError("feedback_retrying")` and `PermanentError("feedback_failed")`. Logs carry
ids, counts and codes, never text.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

from psycopg.types.json import Jsonb

from workers import Job, JobContext, PayloadError, PermanentError, TransientError
from workers.learning.ai.feedback import (
    FAIL_CODE,
    RETRY_CODE,
    FeedbackSettings,
    feedback_backend,
    write_feedback,
)
from workers.learning.handlers.stage import model_overrides, run_stage

log = logging.getLogger("jobvisor.feedback")


def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    return run_stage(_handle, job, ctx, fail_code=FAIL_CODE, retry_code=RETRY_CODE)


def _handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    payload = job.payload if isinstance(job.payload, dict) else {}
    try:
        submission_id = str(uuid.UUID(str(payload.get("submission_id"))))
    except ValueError:
        raise PayloadError("submission_id must be a uuid") from None
    # Read in a short transaction of its own: none stays open during the model call.
    with ctx.read() as conn:
        row = conn.execute(
            "SELECT analysis_status, text_body, criteria FROM public.learning_submissions"
            " WHERE id = %s",
            (submission_id,),
        ).fetchone()
    if row is None:  # missing, or not this job's owner: row-level security hides both
        raise PermanentError(FAIL_CODE, "submission not visible to its job")
    status, text_body, raw_criteria = row
    done: dict[str, Any] = {"submission_id": submission_id}
    if status in ("completed", "failed"):
        log.info("submission_skipped", extra={"job_id": job.id, "submission_id": submission_id,
                                              "status": status})
        return done | {"skipped": status}
    if status != "extracted" or not (text_body and text_body.strip()):
        # Feedback never runs OCR itself; text comes only from the vision stage.
        raise PermanentError(FAIL_CODE, f"no extracted text (submission is {status})")

    criteria = criteria_list(raw_criteria)
    try:
        backend = feedback_backend()
        settings = FeedbackSettings.from_env()
        settings = replace(settings, **model_overrides(ctx.options, settings.options))
    except ValueError as exc:  # a configuration error names the variable, not any text
        raise PermanentError(FAIL_CODE, str(exc)) from None
    ctx.progress(0.1, f"writing feedback ({len(criteria)} criteria)")
    result = write_feedback(text_body, criteria, backend=backend, settings=settings)
    if not result.feedback_md.strip():
        raise TransientError(RETRY_CODE, f"empty feedback from {result.backend_used}")
    ctx.check_cancelled()
    # The completing transaction starts only now; the guarded write returns false when
    # the submission moved on during the model call.
    (stored,) = ctx.db.execute(
        "SELECT public.learning_worker_update_completed(%s, %s, %s, %s)",
        (submission_id, result.feedback_md, Jsonb(result.analysis), result.backend_used),
    ).fetchone()
    if not stored:
        log.info("submission_moved_on", extra={"job_id": job.id, "submission_id": submission_id})
        return done | {"skipped": "state_changed"}
    log.info("feedback_written", extra={
        "job_id": job.id, "submission_id": submission_id, "backend": result.backend_used,
        "language": settings.language, "criteria": len(criteria),
        "chars": len(result.feedback_md),
    })
    return done | {"backend": result.backend_used, "criteria": len(criteria),
                   "schema": result.analysis.get("schema")}


def criteria_list(raw: Any) -> list[str]:
    """The submission's criteria as names: strings, or objects naming one."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PermanentError(FAIL_CODE, "criteria must be a JSON array")
    names: list[str] = []
    for item in raw:
        if isinstance(item, dict):
            item = item.get("criterion") or item.get("name") or item.get("title")
        if not isinstance(item, str) or not item.strip():
            raise PermanentError(FAIL_CODE, "each criterion must be a non-empty string "
                                            "or an object with criterion/name/title")
        names.append(item.strip())
    return names
