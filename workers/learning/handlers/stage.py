"""Error mapping shared by the model stages (vision, feedback)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from workers import Cancelled, Job, JobContext, PermanentError, TransientError
from workers.core.errors import JobError


def run_stage(inner: Callable[[Job, JobContext], dict[str, Any]], job: Job, ctx: JobContext,
              *, fail_code: str, retry_code: str) -> dict[str, Any]:
    """Run a stage; anything unexpected becomes the stage's own retry code.

    Only the exception's type is kept: its text may quote the student's text or the
    model's answer.
    """
    try:
        return inner(job, ctx)
    except (JobError, Cancelled):
        raise
    except psycopg.errors.NoDataFound:
        # Missing, or another owner's: row-level security hides both alike.
        raise PermanentError(fail_code, "submission not visible to its job") from None
    except Exception as exc:  # noqa: BLE001 - the stage's retry code, not unexpected_error
        raise TransientError(retry_code, f"unexpected {type(exc).__name__}") from None


def model_overrides(options: dict[str, Any], env_options: dict[str, Any]) -> dict[str, Any]:
    """Settings a type's YAML `options:` adds to the environment's: `model_options` (Ollama
    model options such as num_ctx, merged over AI_*_OPTIONS) and `keep_alive`."""
    out: dict[str, Any] = {}
    model_options = options.get("model_options")
    if model_options is not None:
        if not isinstance(model_options, dict):
            raise ValueError("options.model_options in the type's YAML must be a mapping")
        out["options"] = env_options | model_options
    if options.get("keep_alive") is not None:
        out["keep_alive"] = options["keep_alive"]
    return out
