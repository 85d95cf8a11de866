"""A small httpx client for Ollama's `/api/chat`, with errors the queue understands.

Classification (the queue retries transient errors with backoff and fails
permanent ones at once):

- connection refused/reset/dropped, timeouts, 5xx (503 = Ollama's queue is full),
  429, and a 200 whose body is not the expected JSON → `TransientError(retry_code)`;
- 404 (model not pulled), 400 and other 4xx → `PermanentError(fail_code)`.

Every request holds a token of its (server, model) from `workers.core.model_gate`, whose
limit follows what the server shows: a 503/429 or a read timeout lowers it, and the
answer's durations say how long the request waited in the server's queue.

Messages carry the status, the model name and a short reason only: never the
prompt, the images or the response body, which may contain student text.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from workers.core import model_gate
from workers.core.errors import PermanentError, TransientError

DEFAULT_BASE_URL = "http://localhost:11434"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 120.0

Timeout = tuple[float, float]  # (connect, read) seconds
# "Server busy": Ollama's full queue (503) and a proxy's rate limit (429) lower the limit.
BUSY_STATUSES = (503, 429)

_client_lock = threading.Lock()
_client: httpx.Client | None = None


def base_url_from_env() -> str:
    """OLLAMA_BASE_URL without a trailing slash (default http://localhost:11434)."""
    return (os.environ.get("OLLAMA_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def timeout_from_env(stage: str) -> Timeout:
    """(connect, read) seconds: AI_CONNECT_TIMEOUT, AI_<STAGE>_READ_TIMEOUT else AI_READ_TIMEOUT."""
    connect = _seconds("AI_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
    read = _seconds("AI_READ_TIMEOUT", DEFAULT_READ_TIMEOUT)
    return connect, _seconds(f"AI_{stage.upper()}_READ_TIMEOUT", read)


def keep_alive_from_env() -> str | float | None:
    """AI_KEEP_ALIVE as Ollama wants it: "5m" stays a duration, "-1" becomes a number.

    Ollama reads a JSON string with Go's duration parser, which rejects unitless
    "-1"; a JSON number means seconds (negative: keep loaded forever).
    """
    raw = (os.environ.get("AI_KEEP_ALIVE") or "").strip()
    if not raw:
        return None
    try:
        number = float(raw)
    except ValueError:
        return raw
    return int(number) if number.is_integer() else number


def options_from_env(name: str) -> dict[str, Any]:
    """Ollama model options as a JSON object in env var `name` ({} when unset)."""
    raw = os.environ.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError(f"{name} must be a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _shared_client() -> httpx.Client:
    # One pool per process: httpx.Client is thread-safe, and reusing connections
    # spares a TCP handshake per job. Timeouts are set per request.
    global _client
    with _client_lock:
        if _client is None or _client.is_closed:
            _client = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        return _client


def close() -> None:
    """Close the shared connection pool (at process exit; a later call reopens it)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None


def chat(
    base_url: str,
    model: str,
    messages: Sequence[dict[str, Any]],
    *,
    images: Sequence[bytes] | None = None,
    options: dict[str, Any] | None = None,
    keep_alive: str | float | None = None,
    format: str | dict[str, Any] | None = None,  # noqa: A002 - Ollama's field name
    timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
    retry_code: str = "ai_retrying",
    fail_code: str = "ai_failed",
) -> str:
    """One non-streaming `/api/chat` call; returns the assistant message content.

    `images` (raw bytes) are attached, base64-encoded, to the last message.
    Raises `TransientError(retry_code, ...)` or `PermanentError(fail_code, ...)`.
    """
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], "stream": False}
    if images:
        if not body["messages"]:
            body["messages"].append({"role": "user", "content": ""})
        body["messages"][-1]["images"] = [base64.b64encode(i).decode("ascii") for i in images]
    if options:
        body["options"] = options
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    if format is not None:
        body["format"] = format
    connect, read = timeout
    limits = httpx.Timeout(connect=connect, read=read, write=read, pool=connect)
    url = base_url.rstrip("/") + "/api/chat"
    try:
        # A token of this (server, model) for the request's time: the limit the gate finds.
        with model_gate.gate().call(base_url, model, wait=read) as call:
            try:
                response = _shared_client().post(url, json=body, timeout=limits)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    call.down()  # no answer at all: not a slow server, maybe a restarting one
                elif not isinstance(exc, httpx.PoolTimeout):  # our own pool: not the server
                    call.timeout()
                raise TransientError(
                    retry_code, f"ollama {_timeout_kind(exc)} timeout, model={model}") from None
            except httpx.TransportError as exc:
                call.down()
                raise TransientError(
                    retry_code, f"ollama unreachable ({type(exc).__name__}), model={model}") from None
            if response.status_code in BUSY_STATUSES:
                call.busy()
            elif response.status_code >= 500:
                call.down()
            content, answer = _content(response, model, retry_code, fail_code)
            call.ok(server_wait=model_gate.ollama_server_wait(answer))
            return content
    except model_gate.NoToken as exc:
        raise TransientError(retry_code, f"{exc} (the endpoint's limit is in use)") from None


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    return {httpx.ConnectTimeout: "connect", httpx.ReadTimeout: "read",
            httpx.WriteTimeout: "write", httpx.PoolTimeout: "pool"}.get(type(exc), "")


def _content(response: httpx.Response, model: str, retry_code: str,
             fail_code: str) -> tuple[str, dict[str, Any]]:
    """The assistant's text and the whole answer (its durations feed the gate)."""
    status = response.status_code
    if status == 404:
        raise PermanentError(fail_code, f"ollama 404: model {model} not found")
    if status >= 500 or status in (408, 429):
        raise TransientError(retry_code, f"ollama {status}, model={model}")
    if status >= 400:
        raise PermanentError(fail_code, f"ollama {status}: request rejected, model={model}")
    try:
        data = response.json()
        content = data["message"]["content"]
    except (ValueError, KeyError, TypeError):
        raise TransientError(retry_code, f"ollama {status}: malformed response, model={model}") from None
    if not isinstance(content, str):
        raise TransientError(retry_code, f"ollama {status}: malformed response, model={model}")
    return content, data
