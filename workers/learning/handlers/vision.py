"""`vision` jobs: page images → the submission's text, then hand over to `feedback`.

Payload (written by the pdf stage): `{"submission_id", "owner_sub", "page_keys",
"text_layer_key"}`. The engine is `workers.learning.ai.vision.vision_engine()` (stub | ollama |
tesseract, from AI_VISION_BACKEND / AI_BACKEND).

OCR reuse: a submission already `extracted` with text gets no model call; the job
only enqueues feedback. `extracted` without text is read again and stored. The
submission is read in a short read-only transaction (`ctx.read()`) that ends before the
model call; afterwards the text is stored through `learning_worker_update_extracted`
(which refuses a submission that moved on meanwhile), together with what produced it
(`text_backend`: stub = a placeholder, text_layer = the PDF's own text, ollama,
tesseract), and the feedback job enqueued in the job's completing transaction, so both
happen exactly when this job completes. Reused text keeps the backend it was stored with.

Errors: `TransientError("vision_retrying")` (the queue retries with backoff) and
`PermanentError("vision_failed")`. Logs carry ids, counts and codes, never text.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from typing import Any

from workers import Job, JobContext, PayloadError, PermanentError
from workers.learning.ai.vision import (
    FAIL_CODE,
    RETRY_CODE,
    VisionResult,
    VisionSettings,
    read_pages,
    vision_engine,
)
from workers.learning.handlers.stage import model_overrides, run_stage
from workers.learning.storage import LocalStorage, storage_from_env
from workers.learning.subject import owner

log = logging.getLogger("jobvisor.vision")


def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    return run_stage(_handle, job, ctx, fail_code=FAIL_CODE, retry_code=RETRY_CODE)


def _handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    payload = job.payload if isinstance(job.payload, dict) else {}
    submission_id = _submission_id(payload)
    # Read in a short transaction of its own: none stays open during the model call.
    with ctx.read() as conn:
        row = conn.execute(
            "SELECT analysis_status, text_body FROM public.learning_submissions WHERE id = %s",
            (submission_id,),
        ).fetchone()
    if row is None:  # missing, or not this job's owner: row-level security hides both
        raise PermanentError(FAIL_CODE, "submission not visible to its job")
    status, text_body = row
    done: dict[str, Any] = {"submission_id": submission_id}
    if status in ("completed", "failed"):
        log.info("submission_skipped", extra={"job_id": job.id, "submission_id": submission_id,
                                              "status": status})
        return done | {"skipped": status}

    if status == "extracted" and text_body and text_body.strip():
        # OCR reuse: the text is already stored; vision would only cost a model call.
        feedback_job = _enqueue_feedback(job, ctx, submission_id)
        log.info("vision_reused_text", extra={"job_id": job.id, "submission_id": submission_id,
                                              "feedback_job": feedback_job})
        return done | {"reused_text": True, "feedback_job": feedback_job}

    try:
        engine = vision_engine()
        settings = VisionSettings.from_env()
        settings = replace(settings, **model_overrides(ctx.options, settings.options))
    except ValueError as exc:  # a configuration error names the variable, not any text
        raise PermanentError(FAIL_CODE, str(exc)) from None
    storage = storage_from_env()
    images = _images(storage, payload)
    text_layer = _text_layer(storage, payload.get("text_layer_key"))
    read = _read(images, engine, text_layer, settings, ctx)
    text = read.text
    if not text.strip():
        # Temperature 0 and the same pages: a retry would read nothing again.
        raise PermanentError(FAIL_CODE, f"no text recognised on {len(images)} page(s)")
    ctx.check_cancelled()
    # The completing transaction starts only now. The guarded write re-checks the state
    # read above: it returns false when the submission moved on during the model call.
    (stored,) = ctx.db.execute(
        "SELECT public.learning_worker_update_extracted(%s, %s, %s)",
        (submission_id, text, read.backend_used),
    ).fetchone()
    if not stored:
        # Someone else moved the submission on meanwhile; whoever did owns the next step.
        log.info("submission_moved_on", extra={"job_id": job.id, "submission_id": submission_id})
        return done | {"skipped": "state_changed"}
    feedback_job = _enqueue_feedback(job, ctx, submission_id)
    log.info("vision_extracted", extra={
        "job_id": job.id, "submission_id": submission_id, "engine": engine,
        "text_backend": read.backend_used, "pages": len(images), "chars": len(text),
        "feedback_job": feedback_job,
    })
    return done | {"reused_text": False, "engine": engine, "text_backend": read.backend_used,
                   "pages": len(images), "chars": len(text), "feedback_job": feedback_job}


def _read(images: list[bytes], engine: str, text_layer: str | None, settings: VisionSettings,
          ctx: JobContext) -> VisionResult:
    """OCR the pages. Tesseract goes page by page, reporting progress per page; the model
    gets the whole document in one request (it reads pages in context)."""
    n = len(images)
    if engine != "tesseract" or n == 1:
        ctx.progress(0.1, f"reading {n} page(s)")
        return read_pages(images, engine=engine, text_layer=text_layer, settings=settings)
    pages = []
    for i, image in enumerate(images, 1):
        ctx.check_cancelled()
        pages.append(read_pages([image], engine=engine, text_layer=None, settings=settings).text)
        ctx.progress(i / n * 0.9, f"page {i}/{n}")
    return VisionResult("\n\n".join(pages), engine)


def _submission_id(payload: dict[str, Any]) -> str:
    try:
        return str(uuid.UUID(str(payload.get("submission_id"))))
    except ValueError:
        raise PayloadError("submission_id must be a uuid") from None


def _enqueue_feedback(job: Job, ctx: JobContext, submission_id: str) -> int:
    # The key makes a duplicate vision run join the feedback job already waiting.
    return ctx.enqueue("feedback", {"submission_id": submission_id, "owner_sub": owner(job.payload)},
                       key=f"feedback:{submission_id}", priority=job.priority)


def _images(storage: LocalStorage, payload: dict[str, Any]) -> list[bytes]:
    keys = payload.get("page_keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise PayloadError("page_keys must be a non-empty list of storage keys")
    try:
        return [storage.read(k) for k in keys]
    except (FileNotFoundError, IsADirectoryError, ValueError):
        # Rendered pages are derived data: pruned ones need the pdf stage to run again.
        raise PermanentError(FAIL_CODE, "a page image is missing from storage") from None


def _text_layer(storage: LocalStorage, key: Any) -> str | None:
    """The PDF's own text (the stub engine uses it); None when there is none."""
    if not isinstance(key, str) or not key:
        return None
    try:
        pages = json.loads(storage.read(key))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None
    if not isinstance(pages, list):
        return None
    return "\n\n".join(str(p).rstrip() for p in pages)
