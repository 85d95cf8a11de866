"""Structured logs: one JSON object per line, ids and codes only.

Call sites log an event name as the message and put fields in `extra`:
`log.info("job_failed", extra={"job_id": 7, "code": "pdf_invalid"})`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception text may carry payload content.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


def configure(level: str | None = None) -> None:
    """Log JSON lines to stderr at JOBVISOR_LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("JOBVISOR_LOG_LEVEL", "INFO")).upper())
    # Libraries chatty at INFO (httpx logs every request URL) stay at WARNING.
    for noisy in ("httpx", "httpcore", "LiteLLM", "litellm", "psycopg.pool", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def frames(exc: BaseException) -> list[str]:
    """Where an exception came from, as `file:line in function` per frame: code
    locations only, never the exception's text (it may quote payload content)."""
    return [f"{f.filename}:{f.lineno} in {f.name}"
            for f in traceback.extract_tb(exc.__traceback__)]
