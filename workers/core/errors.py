"""Errors a handler raises to tell the runtime what to do with its job."""

from __future__ import annotations

MAX_MESSAGE = 1024


class JobError(Exception):
    """Base class: carries a stable error code and a short message without PII."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message[:MAX_MESSAGE]


class TransientError(JobError):
    """Retry later with backoff, until the job's attempts run out."""


class PermanentError(JobError):
    """Fail now; retrying would not help (bad input, missing model...)."""


class PayloadError(PermanentError):
    """The payload does not fit what the handler expects."""

    def __init__(self, message: str, code: str = "invalid_payload") -> None:
        super().__init__(code, message)


class Cancelled(Exception):
    """Raised by `JobContext.check_cancelled()` when the job should stop."""
