"""Structured logs: one event per line, ids and codes only.

Call sites log an event name as the message and put fields in `extra`:
`log.info("job_failed", extra={"job_id": 7, "code": "pdf_invalid"})`.

Lines are JSON objects when stderr is not a terminal (log collectors, tests) and
human-readable text on a terminal; JOBVISOR_LOG_FORMAT=json or text forces either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


LOG_FORMAT_VARIABLE = "JOBVISOR_LOG_FORMAT"
LOG_FORMATS = ("json", "text", "auto")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra` fields of a record, and the exception's type (only: exception text
    may carry payload content)."""
    out = {k: v for k, v in vars(record).items()
           if k not in _STANDARD and not k.startswith("_")}
    if record.exc_info and record.exc_info[0] is not None:
        out["exc_type"] = record.exc_info[0].__name__
    return out


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
        out.update(_fields(record))
        return json.dumps(out, default=str)


_BARE = re.compile(r"^[^\s\"'=\\]+$")


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:01 info  child_started job_type=pdf slot=0`: one line per
    event for a person at a terminal; values with spaces or newlines are JSON-quoted."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        parts = [when, f"{record.levelname.lower():<5}", _one_line(record.getMessage())]
        parts += [f"{key}={_text_value(value)}" for key, value in _fields(record).items()]
        return " ".join(parts)


def _text_value(value: Any) -> str:
    if not isinstance(value, str):  # numbers, lists, mappings: compact JSON, one line
        return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return value if _BARE.match(value) else json.dumps(value, ensure_ascii=False)


def _one_line(text: str) -> str:
    return text if "\n" not in text and "\r" not in text else json.dumps(text)


def log_format(stream: Any, environ: Mapping[str, str] | None = None) -> str:
    """"json" or "text" for `stream`: JOBVISOR_LOG_FORMAT if set, else text on a terminal.
    ValueError (one line) for another value of the variable."""
    env = os.environ if environ is None else environ
    wanted = (env.get(LOG_FORMAT_VARIABLE) or "auto").strip().lower()
    if wanted not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_VARIABLE}={wanted!r}: use json, text or auto")
    if wanted == "auto":
        isatty = getattr(stream, "isatty", None)
        return "text" if isatty is not None and isatty() else "json"
    return wanted


def configure(level: str | None = None, *, stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) at `level`, else JOBVISOR_LOG_LEVEL (default INFO), as
    JSON lines or text (`log_format`). ValueError for an unknown JOBVISOR_LOG_FORMAT."""
    stream = sys.stderr if stream is None else stream
    formatter = TextFormatter() if log_format(stream) == "text" else JsonFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
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
