"""`pdf` jobs: the first stage of the learning pipeline, and standalone PDF extraction.

Pipeline payload `{"submission_id", "owner_sub"}`: the upload named by the submission
is rendered to page PNGs (a photo becomes page 1), and a `vision` job for those pages
is enqueued in this job's fenced transaction: it exists exactly when this job completes.
The submission is read in a short read-only transaction that ends before the render;
the completing transaction opens only after it.

Standalone payload `{"file": KEY_OR_PATH, ...}` (`file_path` is accepted too): the
result is the per-page text (and with `include_images`, page image keys); every other
payload field (`template`, `context`, ...) belongs to the caller and is handed back
in the result.

Options (the type's YAML `options:`): `dpi` (150), `max_pages` (50), `max_bytes`
(25 MiB, an integer), `max_side` (photos, 4096 px), `stitch` (true).

Failures raise `PermanentError("pdf_invalid" | "image_invalid" | "pdf_source_missing")`;
how they reach the submission is the queue trigger's job (docs/pipeline.md).
Logs carry ids, counts and codes only.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from workers import Job, JobContext, PayloadError, PermanentError
from workers.learning.pdf_render import (
    DEFAULT_DPI,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SIDE,
    RenderResult,
    extract_pdf,
    prepare_image,
    render_pdf,
)
from workers.learning.storage import DerivedPaths, LocalStorage, normalize_key, storage_from_env
from workers.learning.subject import owner

log = logging.getLogger("jobvisor.pdf")

PDF_MIME = "application/pdf"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg")
DEFAULT_MAX_PAGES = 50
_RESERVED = ("file", "file_path", "owner_sub", "owner")


def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    payload = job.payload if isinstance(job.payload, dict) else {}
    if payload.get("submission_id") is not None:
        return _pipeline(job, ctx, payload)
    if payload.get("file") or payload.get("file_path"):
        return _standalone(job, ctx, payload)
    raise PayloadError("pdf: payload needs submission_id (pipeline) or file (standalone)")


# --- pipeline ------------------------------------------------------------------------


def _pipeline(job: Job, ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    submission_id = _submission_id(payload)
    # Read in a short transaction of its own: none stays open while the pages render.
    with ctx.read() as conn:
        row = conn.execute(
            "SELECT analysis_status, source_key, mime_type FROM public.learning_submissions"
            " WHERE id = %s",
            (submission_id,),
        ).fetchone()
    if row is None:  # missing, or not this job's owner: row-level security hides both
        raise PermanentError("pdf_submission_not_found", "submission not visible to its job")
    status, source_key, mime_type = row
    if status in ("completed", "failed"):
        # A duplicate or late job: the submission is finished; chaining would redo work.
        log.info("submission_skipped", extra={"job_id": job.id, "submission_id": submission_id,
                                              "status": status})
        return {"submission_id": submission_id, "skipped": status}

    storage = storage_from_env()
    data = _read(storage, source_key)
    render = _render(data, mime_type, storage, ctx)
    ctx.check_cancelled()
    # The completing transaction opens here, after the render.
    vision_job = ctx.enqueue(
        "vision",
        {
            "submission_id": submission_id,
            "owner_sub": owner(job.payload),
            "page_keys": render.page_keys,
            "stitched_key": render.stitched_key,
            # The text layer stays in storage: payloads are shown to operators.
            "text_layer_key": DerivedPaths(render.content_hash).text_layer,
            "content_hash": render.content_hash,
        },
        key=f"vision:{submission_id}",
        priority=job.priority,
    )
    log.info("submission_rendered", extra={
        "job_id": job.id, "submission_id": submission_id, "pages": render.page_count,
        "cached": render.cached, "vision_job": vision_job,
    })
    return {"submission_id": submission_id, "pages": render.page_count,
            "cached": render.cached, "content_hash": render.content_hash,
            "vision_job": vision_job}


def _submission_id(payload: dict[str, Any]) -> str:
    """The payload's submission id as canonical uuid text (PayloadError otherwise)."""
    raw = payload.get("submission_id")
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        raise PayloadError("submission_id must be a uuid") from None


def _render(data: bytes, mime_type: str, storage: LocalStorage, ctx: JobContext) -> RenderResult:
    kind = _kind(mime_type, data)
    opts = _options(ctx.options)
    if kind == "image":
        return prepare_image(data, storage, max_bytes=opts["max_bytes"],
                             max_side=opts["max_side"], progress=ctx.progress)
    return render_pdf(data, storage, dpi=opts["dpi"], max_pages=opts["max_pages"],
                      max_bytes=opts["max_bytes"], stitch=opts["stitch"],
                      progress=ctx.progress)


def _kind(mime_type: str, data: bytes) -> str:
    mime = (mime_type or "").split(";")[0].strip().lower()
    if mime == PDF_MIME:
        return "pdf"
    if mime in IMAGE_MIMES:
        return "image"
    # An unknown or generic type (application/octet-stream): the bytes decide.
    if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        return "image"
    if b"%PDF-" in data[:1024]:
        return "pdf"
    raise PermanentError("pdf_invalid", "neither a PDF nor a PNG/JPEG image")


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Render limits from the type's YAML `options:`, checked so a typo fails loudly."""
    out = {
        "dpi": options.get("dpi", DEFAULT_DPI),
        "max_pages": options.get("max_pages", DEFAULT_MAX_PAGES),
        "max_bytes": options.get("max_bytes", DEFAULT_MAX_BYTES),
        "max_side": options.get("max_side", DEFAULT_MAX_SIDE),
        "stitch": options.get("stitch", True),
    }
    for name in ("dpi", "max_pages", "max_bytes", "max_side"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PermanentError("pdf_options_invalid", f"option {name} must be a positive integer")
    if not isinstance(out["stitch"], bool):
        raise PermanentError("pdf_options_invalid", "option stitch must be true or false")
    return out


def _read(storage: LocalStorage, key: str) -> bytes:
    try:
        return storage.read(key)
    except (FileNotFoundError, IsADirectoryError):
        raise PermanentError("pdf_source_missing", "source file not found in storage") from None
    except ValueError:  # a key that would leave the storage root
        raise PermanentError("pdf_source_missing", "source key is not a valid storage key") from None


# --- standalone ----------------------------------------------------------------------


def _standalone(job: Job, ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    storage = storage_from_env()
    key = _storage_key(storage, payload.get("file") or payload.get("file_path"))
    data = _read(storage, key)
    opts = _options(ctx.options)
    params: dict[str, Any] = {
        "extraction_method": payload.get("extraction_method", "text"),
        "include_images": payload.get("include_images", False),
        "dpi": payload.get("dpi", opts["dpi"]),
        "max_pages": opts["max_pages"],
        "max_bytes": opts["max_bytes"],
    }
    if payload.get("ocr_lang"):
        params["ocr_lang"] = payload["ocr_lang"]
    result = extract_pdf(data, storage=storage, progress=ctx.progress, **params)
    result["file"] = key
    result["include_images"] = params["include_images"]
    # The caller's own fields (template, context, ...) come back untouched.
    for name, value in payload.items():
        if name not in _RESERVED and name not in result:
            result[name] = value
    log.info("pdf_extracted", extra={"job_id": job.id, "pages": result["page_count"],
                                     "method": result["extraction_method"]})
    return result


def _storage_key(storage: LocalStorage, file: Any) -> str:
    """A storage key from a key or from a path inside STORAGE_DIR."""
    if not isinstance(file, str) or not file:
        raise PayloadError("file must be a storage key or a path under STORAGE_DIR")
    if Path(file).is_absolute():
        try:
            relative = Path(file).resolve().relative_to(storage.root.resolve())
        except ValueError:
            raise PayloadError("file must be a storage key or a path under STORAGE_DIR") from None
        return normalize_key(relative.as_posix())
    try:
        return normalize_key(file)
    except ValueError as exc:
        raise PayloadError(f"file: {exc}") from None
