"""A protocol-faithful fake Ollama server for tests and benchmarks.

It speaks the parts of Ollama's REST API jobvisor uses, with the same shapes:

- ``POST /api/chat`` and ``POST /api/generate``: NDJSON streaming unless the
  request says ``"stream": false`` (Ollama's default is to stream); ``images``
  as base64, ``options``, ``keep_alive``, ``format`` ("json" or a JSON schema).
- ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``, ``GET /``.
- ``POST /v1/chat/completions`` and ``GET /v1/models`` (OpenAI-compatible; not
  streamed unless asked, as in OpenAI's API).
- Errors as ``{"error": "..."}`` (OpenAI-style ``{"error": {"message", "type", ...}}``
  under ``/v1``); an unknown model is a 404 ``model "x" not found, try pulling it
  first``; a full queue a 503 ``server busy, please try again.  maximum pending
  requests exceeded``.

What a real server does with GPUs it imitates with time: ``slots`` requests per
model run at once (``OLLAMA_NUM_PARALLEL``), more wait in line (not rejected),
and beyond ``max_queue`` waiting requests the server answers 503
(``OLLAMA_MAX_QUEUE``). Each request holds its slot for ``latency`` seconds.

Faults (``inject``) apply to the next N matching requests: status 500/503/404/400,
``slow`` (extra seconds inside the slot), ``malformed`` (200 with a body that is
not JSON), ``drop`` (close the socket without answering).

Driving a fake in another process (benchmarks)::

    python -m tests.fakes.ollama --port 11434 --slots 2 --latency 0.5
    curl localhost:11434/_fake/stats
    curl -X POST localhost:11434/_fake/faults -d '{"fault": "503", "count": 3}'
    curl -X POST localhost:11434/_fake/reset
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "0.12.6"
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
DEFAULT_KEEP_ALIVE_S = 300.0
FAULTS = ("500", "503", "404", "400", "slow", "malformed", "drop")
_STATUS_MESSAGES = {
    "500": "llama runner process has terminated: exit status 2",
    "503": ERR_MAX_QUEUE,
    "400": "invalid request",
}
_INFERENCE = ("/api/chat", "/api/generate", "/v1/chat/completions")


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _short_hash(*parts: bytes | str, n: int = 12) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:n]


def canonical_model(name: str) -> str:
    """Ollama's rule: a name without a tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def parse_keep_alive(value: Any) -> float | None:
    """Seconds a model stays loaded; None = forever (negative), 0 = unload now."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration")
    if isinstance(value, int | float):
        return None if value < 0 else float(value)
    text = str(value).strip()
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", text):
        # Go's time.ParseDuration: only "0" may omit the unit; Ollama answers 400.
        if float(text) == 0:
            return 0.0
        raise ValueError(f'time: missing unit in duration "{text}"')
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    matches = re.findall(r"(-?\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not matches or "".join(a + b for a, b in matches) != text:
        raise ValueError(f"time: invalid duration {text!r}")
    for amount, unit in matches:
        total += float(amount) * units[unit]
    return None if total < 0 else total


# --- what a request asks, and what the fake answers ------------------------------


@dataclass
class FakeRequest:
    """One inference request as the responder sees it."""

    endpoint: str
    model: str
    messages: list[dict[str, Any]]
    prompt: str
    images: list[bytes]
    format: Any
    options: dict[str, Any]
    body: dict[str, Any]

    @property
    def text(self) -> str:
        """Everything the model would read, in order."""
        parts = [str(m.get("content") or "") for m in self.messages]
        return "\n".join([*parts, self.prompt])


Responder = Callable[[FakeRequest], str | None]

_DSPY_OUTPUTS = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions|\Z)", re.S)
_DSPY_FIELD = re.compile(r"^\d+\. `(\w+)` \(([^)]*(?:\)[^:]*)?)\)", re.M)
_DSPY_INPUT_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)


def default_responder(req: FakeRequest) -> str:
    """Deterministic content derived from the request.

    - a DSPy prompt (``Your output fields are:``): every output field, in the
      ChatAdapter's ``[[ ## field ## ]]`` format, or as a JSON object when the
      request asks for JSON (JSONAdapter);
    - ``format``/``response_format`` JSON: an instance of the schema (``{"response": ...}``
      for plain ``"json"``);
    - images: ``OCR:`` + a short hash of the image bytes;
    - otherwise ``FAKE:`` + a short hash of the prompt.
    """
    system = next((str(m.get("content") or "") for m in req.messages if m.get("role") == "system"), "")
    schema = _requested_schema(req)
    mirror = _mirror_list(req)
    if "Your output fields are:" in system:
        values = _dspy_values(req, system, mirror)
        if schema is not None or "Outputs will be a JSON object" in system:
            return json.dumps(values, ensure_ascii=False)
        parts = [f"[[ ## {name} ## ]]\n{_as_field_text(value)}" for name, value in values.items()]
        return "\n\n".join([*parts, "[[ ## completed ## ]]"])
    base = "OCR:" + _short_hash(*req.images) if req.images else "FAKE:" + _short_hash(req.text)
    if schema is not None:
        if not schema:  # "json" without a schema
            return json.dumps({"response": base})
        return json.dumps(_instance(schema, schema, base, mirror), ensure_ascii=False)
    return base


def _requested_schema(req: FakeRequest) -> dict[str, Any] | None:
    """The JSON schema the request wants ({} = any JSON object), or None for text."""
    fmt = req.format
    if fmt == "json":
        return {}
    if isinstance(fmt, dict):
        return fmt
    rf = req.body.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_schema":
            inner = rf.get("json_schema") or {}
            return inner.get("schema") or {}
        if rf.get("type") == "json_object":
            return {}
    return None


def _mirror_list(req: FakeRequest) -> list[str]:
    """The first JSON list of strings in the last user message.

    Answers to "one item per criterion" prompts get one item per element, so a
    client that checks it got every criterion back is satisfied.
    """
    users = [m for m in req.messages if m.get("role") == "user"]
    text = str(users[-1].get("content") or "") if users else req.prompt
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    return []


def _dspy_values(req: FakeRequest, system: str, mirror: list[str]) -> dict[str, Any]:
    block = _DSPY_OUTPUTS.search(system)
    fields = _DSPY_FIELD.findall(block.group(1)) if block else []
    seed = _short_hash(req.text)
    values: dict[str, Any] = {}
    for name, type_name in fields:
        schema = _dspy_field_schema(system, name)
        if schema is not None:
            values[name] = _instance(schema, schema, f"{name} {seed}", mirror)
        else:
            values[name] = _python_type_value(type_name, f"{name} {seed}", mirror)
    return values


def _dspy_field_schema(system: str, name: str) -> dict[str, Any] | None:
    marker = f"{{{name}}}"
    at = system.find(marker)
    if at < 0:
        return None
    line_end = system.find("\n", at)
    line = system[at : line_end if line_end >= 0 else len(system)]
    hint = line.find("JSON schema: ")
    if hint < 0:
        return None
    raw = line[hint + len("JSON schema: ") :].replace('\\"', '"')
    try:
        value, _ = json.JSONDecoder().raw_decode(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _python_type_value(type_name: str, text: str, mirror: list[str]) -> Any:
    t = type_name.strip()
    if t == "str":
        return f"Fake {text}."
    if t == "int":
        return 5
    if t == "float":
        return 0.5
    if t == "bool":
        return True
    if t.startswith("list[str]"):
        return list(mirror) or [text]
    if t.startswith(("list", "dict")):
        return [] if t.startswith("list") else {}
    literal = re.match(r"Literal\[(.*)\]", t)
    if literal:
        first = literal.group(1).split(",")[0].strip()
        return first.strip("'\"")
    return f"Fake {text}."


def _instance(schema: dict[str, Any], root: dict[str, Any], text: str, mirror: list[str],
              echo: str | None = None) -> Any:
    """A deterministic value that validates against a (simple) JSON schema."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        return _instance(target, root, text, mirror, echo)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _instance(options[0], root, text, mirror, echo)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        props: dict[str, Any] = schema.get("properties", {})
        order = list(schema.get("required", [])) + [p for p in props if p not in schema.get("required", [])]
        out: dict[str, Any] = {}
        echoed = False
        for name in order:
            sub = props.get(name, {})
            give = None
            if echo is not None and not echoed and _is_string(sub, root):
                give, echoed = echo, True
            out[name] = _instance(sub, root, f"{name} {text}", mirror, give)
        return out
    if kind == "array":
        items = schema.get("items", {})
        count = max(len(mirror), 1, int(schema.get("minItems", 0)))
        return [
            _instance(items, root, f"{i + 1} {text}", mirror, mirror[i] if i < len(mirror) else None)
            for i in range(count)
        ]
    if kind == "integer":
        low, high = int(schema.get("minimum", 0)), int(schema.get("maximum", 10))
        return low + int(_short_hash(text), 16) % (high - low + 1)
    if kind == "number":
        low, high = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0))
        return round(low + (high - low) * (int(_short_hash(text), 16) % 1000) / 999, 3)
    if kind == "boolean":
        return True
    return echo if echo is not None else f"Fake {text}."


def _is_string(schema: dict[str, Any], root: dict[str, Any]) -> bool:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        schema = target
    return schema.get("type") == "string"


def _as_field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- faults ----------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    remaining: int
    endpoint: str | None = None
    model: str | None = None
    delay: float = 0.0

    def matches(self, endpoint: str, model: str) -> bool:
        if self.endpoint is not None and self.endpoint != endpoint:
            return False
        return self.model is None or canonical_model(self.model) == canonical_model(model)


# --- the server ------------------------------------------------------------------


@dataclass
class _ModelState:
    slots_free: int
    cond: threading.Condition
    waiting: int = 0
    in_flight: int = 0
    max_concurrent: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0  # seconds requests spent in line for a slot
    completed: int = 0
    active: dict[int, float] = field(default_factory=dict)
    expires_at: float | None = None  # None = not loaded; inf = forever
    loaded: bool = False


class FakeOllama:
    """A fake Ollama on a local port, run in daemon threads of this process.

    ``models``: names it serves (``None``: any name). ``slots``: parallel requests
    per model. ``latency``: seconds each inference request holds its slot;
    ``model_latency`` overrides it per model. ``max_queue``: waiting requests
    beyond which it answers 503 (``None``: unbounded). ``responder``: returns the
    content for a request (``None`` from it = the default answer).
    """

    def __init__(
        self,
        models: Sequence[str] | None = None,
        slots: int = 2,
        latency: float = 0.0,
        *,
        model_latency: Mapping[str, float] | None = None,
        max_queue: int | None = None,
        responder: Responder | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_requests: int = 100,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.models = None if models is None else [canonical_model(m) for m in models]
        self.slots = slots
        self.latency = float(latency)
        self.model_latency = {canonical_model(k): float(v) for k, v in (model_latency or {}).items()}
        self.max_queue = max_queue
        self.responder = responder
        self.host = host
        self.port = port
        # One lock for all counters; each model's waiters have their own
        # condition on it, so a freed slot wakes one waiter of that model only.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep_requests)
        self._reset_state()

    # lifecycle

    def start(self) -> str:
        """Listen (port 0 = any free port) and return the base URL."""
        if self._server is not None:
            return self.base_url
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-ollama", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes sleeping requests so shutdown is quick
        with self._lock:
            for st in self._models.values():
                st.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeOllama:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # control

    def inject(self, fault: str | int, count: int = 1, endpoint: str | None = None,
               model: str | None = None, delay: float = 0.0) -> None:
        """Apply ``fault`` to the next ``count`` requests to ``endpoint``/``model``.

        ``slow`` holds the slot ``delay`` extra seconds (default 5) and then answers
        normally; for the other kinds ``delay`` is waited before failing.
        """
        kind = str(fault)
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if kind == "slow" and not delay:
            delay = 5.0
        with self._lock:
            self._faults.append(Fault(kind, count, endpoint, model, float(delay)))

    def calls(self, endpoint: str | None = None, model: str | None = None) -> int:
        """Requests received (faulted ones included), by endpoint path and/or model."""
        want = None if model is None else canonical_model(model)
        with self._lock:
            return sum(
                n for (ep, m), n in self._calls.items()
                if (endpoint is None or ep == endpoint) and (want is None or m == want)
            )

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """The most recent request bodies (parsed JSON), oldest first."""
        with self._lock:
            return [dict(r) for r in self._recent if endpoint is None or r["endpoint"] == endpoint]

    def reset(self) -> None:
        """Forget counters, recorded requests and pending faults (not the config)."""
        with self._lock:
            busy = {m: s for m, s in self._models.items() if s.in_flight or s.waiting}
            self._reset_state()
            # Requests in flight keep their slot bookkeeping consistent.
            for name, old in busy.items():
                self._models[name] = _ModelState(
                    slots_free=self.slots - old.in_flight, cond=old.cond, waiting=old.waiting,
                    in_flight=old.in_flight, active=dict(old.active),
                    loaded=old.loaded, expires_at=old.expires_at,
                )

    def _reset_state(self) -> None:
        self._calls: dict[tuple[str, str], int] = {}
        self._faults: list[Fault] = []
        self._models: dict[str, _ModelState] = {}
        self._recent.clear()
        self._max_concurrent = 0
        self._max_queued = 0
        self._busy_s = 0.0
        self._completed = 0
        self._rejected_busy = 0
        self._faults_applied = 0
        self._since = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """Counters as one JSON-able dict (also ``GET /_fake/stats``)."""
        now = time.monotonic()
        with self._lock:
            calls: dict[str, dict[str, int]] = {}
            for (ep, m), n in sorted(self._calls.items()):
                calls.setdefault(ep, {})[m] = n
            per_model = {}
            live_busy = 0.0
            for name, st in sorted(self._models.items()):
                partial = sum(now - t for t in st.active.values())
                live_busy += partial
                per_model[name] = {
                    "in_flight": st.in_flight, "queued": st.waiting,
                    "max_concurrent": st.max_concurrent, "completed": st.completed,
                    "busy_slot_seconds": round(st.busy_s + partial, 6),
                    "wait_seconds": round(st.wait_s, 6),
                }
            return {
                "calls": calls,
                "calls_total": sum(self._calls.values()),
                "in_flight": sum(s.in_flight for s in self._models.values()),
                "queued": sum(s.waiting for s in self._models.values()),
                "max_concurrent": self._max_concurrent,
                "max_queued": self._max_queued,
                "completed": self._completed,
                "busy_slot_seconds": round(self._busy_s + live_busy, 6),
                "wait_seconds": round(sum(s.wait_s for s in self._models.values()), 6),
                "elapsed_s": round(now - self._since, 6),
                "slots": self.slots,
                "models": per_model,
                "rejected_busy": self._rejected_busy,
                "faults_applied": self._faults_applied,
                "faults_pending": sum(f.remaining for f in self._faults),
            }

    # used by the handler

    def _record(self, endpoint: str, model: str, body: dict[str, Any]) -> Fault | None:
        """Count the call, remember the body, and take a matching fault if any."""
        with self._lock:
            key = (endpoint, canonical_model(model) if model else "")
            self._calls[key] = self._calls.get(key, 0) + 1
            self._recent.append({"endpoint": endpoint, "model": model, "body": body})
            for fault in self._faults:
                if fault.matches(endpoint, model):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    self._faults_applied += 1
                    return fault
        return None

    def _knows(self, model: str) -> bool:
        return self.models is None or canonical_model(model) in self.models

    def _latency_for(self, model: str) -> float:
        return self.model_latency.get(canonical_model(model), self.latency)

    def _acquire(self, model: str) -> int | None:
        """Wait for a slot of ``model``; a ticket, or None when the queue is full."""
        name = canonical_model(model)
        with self._lock:
            st = self._model(name)
            if st.slots_free <= 0:
                queued = sum(s.waiting for s in self._models.values())
                if self.max_queue is not None and queued >= self.max_queue:
                    self._rejected_busy += 1
                    return None
                st.waiting += 1
                self._max_queued = max(self._max_queued,
                                       sum(s.waiting for s in self._models.values()))
                queued_at = time.monotonic()
                while st.slots_free <= 0 and not self._stopping.is_set():
                    st.cond.wait(0.5)  # the timeout only bounds a missed stop()
                    st = self._models[name]  # reset() may have swapped the record
                st.waiting -= 1
                st.wait_s += time.monotonic() - queued_at
            st.slots_free -= 1
            st.in_flight += 1
            st.max_concurrent = max(st.max_concurrent, st.in_flight)
            total = sum(s.in_flight for s in self._models.values())
            self._max_concurrent = max(self._max_concurrent, total)
            ticket = id(threading.current_thread())
            st.active[ticket] = time.monotonic()
            return ticket

    def _model(self, name: str) -> _ModelState:
        """The state of model `name` (caller holds the lock)."""
        st = self._models.get(name)
        if st is None:
            st = self._models[name] = _ModelState(slots_free=self.slots,
                                                  cond=threading.Condition(self._lock))
        return st

    def _release(self, model: str, ticket: int) -> None:
        name = canonical_model(model)
        with self._lock:
            st = self._models[name]
            started = st.active.pop(ticket, None)
            if started is not None:
                spent = time.monotonic() - started
                st.busy_s += spent
                self._busy_s += spent
            st.in_flight -= 1
            st.slots_free += 1
            st.completed += 1
            self._completed += 1
            st.cond.notify()

    def _touch(self, model: str, keep_alive: float | None) -> None:
        """Mark ``model`` loaded until keep_alive runs out (0 unloads)."""
        name = canonical_model(model)
        with self._lock:
            st = self._model(name)
            if keep_alive == 0:
                st.loaded, st.expires_at = False, None
            else:
                st.loaded = True
                st.expires_at = float("inf") if keep_alive is None else time.time() + keep_alive

    def _loaded(self) -> list[tuple[str, float]]:
        now = time.time()
        with self._lock:
            return [(n, s.expires_at) for n, s in sorted(self._models.items())
                    if s.loaded and s.expires_at is not None and s.expires_at > now]

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # bursts of connections wait in the backlog, not refused
    allow_reuse_address = True
    fake: FakeOllama

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeout, dropped-connection fault) is routine here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Ollama (Go's net/http) answers on TCP_NODELAY sockets; without it every answer
    # waits ~40 ms on the client's delayed ACK, outside the model slot.
    disable_nagle_algorithm = True
    server: _Server
    server_version = "FakeOllama/" + VERSION

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # tests and benchmarks read counters, not access logs

    # routing

    def do_GET(self) -> None:
        self._read_body()
        path = self.path.split("?", 1)[0]
        fake = self.server.fake
        if path == "/":
            self._send_text(200, "Ollama is running")
        elif path == "/api/version":
            self._send_json(200, {"version": VERSION})
        elif path == "/api/tags":
            self._send_json(200, {"models": [self._model_entry(m) for m in self._listed()]})
        elif path == "/api/ps":
            entries = []
            for name, expires in fake._loaded():
                entry = self._model_entry(name)
                entry.pop("modified_at")
                exp = datetime(9999, 12, 31, tzinfo=UTC) if expires == float("inf") else \
                    datetime.now(UTC) + timedelta(seconds=expires - time.time())
                entry.update(expires_at=exp.isoformat().replace("+00:00", "Z"),
                             size_vram=entry["size"], context_length=4096)
                entries.append(entry)
            self._send_json(200, {"models": entries})
        elif path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "library"}
                    for m in self._listed()]
            self._send_json(200, {"object": "list", "data": data})
        elif path == "/_fake/stats":
            self._send_json(200, fake.stats())
        elif path == "/_fake/requests":
            self._send_json(200, {"requests": fake.requests()})
        else:
            self._send_text(404, "404 page not found")

    def do_HEAD(self) -> None:
        self._read_body()
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        fake = self.server.fake
        if path.startswith("/_fake/"):
            self._control(path, raw)
            return
        if path not in _INFERENCE:
            self._send_text(404, "404 page not found")
            return
        openai = path.startswith("/v1/")
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body must be an object")
        except ValueError as exc:
            self._error(400, f"invalid JSON: {exc}", openai)
            return
        model = str(body.get("model") or "")
        fault = fake._record(path, model, body)
        if fault is not None and fault.kind != "slow":
            fake._sleep(fault.delay)
            self._apply_fault(fault, model, openai)
            return
        try:
            req = self._parse(path, body, model)
        except _ClientError as exc:
            self._error(exc.status, exc.message, openai)
            return
        if not fake._knows(model):
            self._error(404, f'model "{model}" not found, try pulling it first', openai)
            return
        if self._is_load_only(req):
            self._load_or_unload(req)
            return
        arrived = time.monotonic()
        ticket = fake._acquire(model)
        if ticket is None:
            self._error(503, ERR_MAX_QUEUE, openai)
            return
        started = time.monotonic()
        try:
            fake._sleep(fake._latency_for(model) + (fault.delay if fault is not None else 0.0))
            content = fake.responder(req) if fake.responder else None
            if content is None:
                content = default_responder(req)
            fake._touch(model, parse_keep_alive(body.get("keep_alive")))
        finally:
            # Released before answering: a client that has its answer sees the
            # counters already updated.
            fake._release(model, ticket)
        if fake._stopping.is_set():
            self._drop()
            return
        # The client may have given up (its timeout) while the slot was busy.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(req, content, time.monotonic() - started, started - arrived)

    # requests

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def _parse(self, path: str, body: dict[str, Any], model: str) -> FakeRequest:
        if not model:
            raise _ClientError(400, "model is required")
        try:
            parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise _ClientError(400, str(exc)) from exc
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _ClientError(400, "options must be an object")
        images: list[bytes] = []
        messages: list[dict[str, Any]] = []
        prompt = ""
        if path == "/api/generate":
            prompt = str(body.get("prompt") or "")
            if body.get("system"):
                messages.append({"role": "system", "content": str(body["system"])})
            images = [self._b64(i) for i in body.get("images") or []]
        else:
            raw_messages = body.get("messages")
            if raw_messages is None and path == "/v1/chat/completions":
                raise _ClientError(400, "[] is too short - 'messages'")
            for msg in raw_messages or []:
                if not isinstance(msg, dict):
                    raise _ClientError(400, "invalid message format")
                content = msg.get("content")
                if isinstance(content, list):  # OpenAI content parts
                    texts = []
                    for part in content:
                        if part.get("type") == "text":
                            texts.append(str(part.get("text", "")))
                        elif part.get("type") == "image_url":
                            url = part.get("image_url")
                            url = url.get("url", "") if isinstance(url, dict) else str(url)
                            images.append(self._b64(url.split(",", 1)[-1]))
                        else:
                            raise _ClientError(400, "invalid message format")
                    content = "\n".join(texts)
                images.extend(self._b64(i) for i in msg.get("images") or [])
                messages.append({"role": str(msg.get("role", "")), "content": content or ""})
        return FakeRequest(path, model, messages, prompt, images, body.get("format"), options, body)

    @staticmethod
    def _b64(value: Any) -> bytes:
        try:
            return base64.b64decode(str(value), validate=True)
        except ValueError as exc:
            raise _ClientError(400, "illegal base64 data at input byte 0") from exc

    @staticmethod
    def _is_load_only(req: FakeRequest) -> bool:
        if req.endpoint == "/api/chat":
            return not req.messages
        if req.endpoint == "/api/generate":
            return not req.prompt and not req.messages and not req.images
        return False

    def _load_or_unload(self, req: FakeRequest) -> None:
        keep = parse_keep_alive(req.body.get("keep_alive"))
        self.server.fake._touch(req.model, keep)
        reason = "unload" if keep == 0 else "load"
        out: dict[str, Any] = {"model": req.model, "created_at": _now_iso(), "done": True,
                               "done_reason": reason}
        if req.endpoint == "/api/chat":
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        self._send_json(200, out)

    # responses

    def _answer(self, req: FakeRequest, content: str, spent_s: float, waited_s: float = 0.0) -> None:
        body = req.body
        prompt_tokens = max(1, len(req.text.split()))
        eval_tokens = max(1, len(content.split()))
        if req.endpoint == "/v1/chat/completions":
            self._answer_openai(req, content, prompt_tokens, eval_tokens)
            return
        ns = int(spent_s * 1e9)
        # As Ollama's: total_duration runs from the request's arrival, so it includes the
        # time spent in line for a slot; the eval durations are the slot's own work.
        stats = {"total_duration": int(waited_s * 1e9) + ns + 1000, "load_duration": 1000,
                 "prompt_eval_count": prompt_tokens, "prompt_eval_duration": ns // 4,
                 "eval_count": eval_tokens, "eval_duration": ns - ns // 4}
        chat = req.endpoint == "/api/chat"

        def frame(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": req.model, "created_at": _now_iso()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            if done:
                out["done_reason"] = "stop"
                if not chat:
                    out["context"] = list(range(1, min(prompt_tokens + eval_tokens, 64) + 1))
                out.update(stats)
            return out

        if body.get("stream", True) is False:
            self._send_json(200, frame(content, True))
            return
        pieces = [frame(piece, False) for piece in _pieces(content)] + [frame("", True)]
        self._send_stream("application/x-ndjson", (json.dumps(p) + "\n" for p in pieces))

    def _answer_openai(self, req: FakeRequest, content: str, prompt_tokens: int,
                       eval_tokens: int) -> None:
        ident = "chatcmpl-" + str(int(_short_hash(content, req.text, str(time.time_ns())), 16) % 1000)
        created = int(time.time())
        base = {"id": ident, "created": created, "model": req.model, "system_fingerprint": "fp_ollama"}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": eval_tokens,
                 "total_tokens": prompt_tokens + eval_tokens}
        if not req.body.get("stream"):
            self._send_json(200, {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content},
                 "finish_reason": "stop"}], "usage": usage})
            return
        chunks = [{**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]}
            for piece in _pieces(content)]
        chunks.append({**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})
        if (req.body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        self._send_stream("text/event-stream", iter(lines))

    def _apply_fault(self, fault: Fault, model: str, openai: bool) -> None:
        if fault.kind == "drop":
            self._drop()
        elif fault.kind == "malformed":
            body = b'{"model": "' + model.encode() + b'", "message": {"role": "assis'
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif fault.kind == "404":
            self._error(404, f'model "{model}" not found, try pulling it first', openai)
        else:
            self._error(int(fault.kind), _STATUS_MESSAGES[fault.kind], openai)

    def _drop(self) -> None:
        """Close the connection without a response, as a crashed server would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _control(self, path: str, raw: bytes) -> None:
        fake = self.server.fake
        try:
            body = json.loads(raw or b"{}")
            if path == "/_fake/faults":
                fake.inject(body["fault"], int(body.get("count", 1)), body.get("endpoint"),
                            body.get("model"), float(body.get("delay", 0.0)))
                self._send_json(200, {"ok": True, "faults_pending": fake.stats()["faults_pending"]})
            elif path == "/_fake/reset":
                fake.reset()
                self._send_json(200, {"ok": True})
            else:
                self._send_text(404, "404 page not found")
        except (ValueError, KeyError, TypeError) as exc:
            self._send_json(400, {"error": f"bad control request: {exc}"})

    def _listed(self) -> list[str]:
        fake = self.server.fake
        if fake.models is not None:
            return list(fake.models)
        with fake._lock:
            return sorted({m for (_, m) in fake._calls if m})

    @staticmethod
    def _model_entry(name: str) -> dict[str, Any]:
        family = name.split(":")[0].split("/")[-1]
        return {
            "name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z",
            "size": 4_000_000_000, "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": family,
                        "families": [family], "parameter_size": "7B",
                        "quantization_level": "Q4_K_M"},
        }

    def _error(self, status: int, message: str, openai: bool) -> None:
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self._send_json(status, {"error": {"message": message, "type": kind, "param": None,
                                               "code": None}})
        else:
            self._send_json(status, {"error": message})

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, content_type: str, parts: Iterator[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in parts:
            data = part.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def _pieces(content: str) -> list[str]:
    """Split like a token stream would (word by word, whitespace kept)."""
    return re.findall(r"\S+\s*|\s+", content) or [""]


# --- running it as a process ------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.ollama", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--slots", type=int, default=2, help="parallel requests per model")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--model-latency", action="append", default=[], metavar="MODEL=SECONDS")
    parser.add_argument("--models", default="*", help="comma-separated names, * = any")
    parser.add_argument("--max-queue", type=int, default=None, help="waiting requests before 503")
    parser.add_argument("--keep-requests", type=int, default=10,
                        help="request bodies kept for GET /_fake/requests (images make them big)")
    args = parser.parse_args(argv)
    models = None if args.models.strip() == "*" else [m for m in args.models.split(",") if m]
    per_model = {}
    for item in args.model_latency:
        name, _, seconds = item.rpartition("=")
        per_model[name] = float(seconds)
    fake = FakeOllama(models, args.slots, args.latency, model_latency=per_model,
                      max_queue=args.max_queue, host=args.host, port=args.port,
                      keep_requests=args.keep_requests)
    url = fake.start()
    print(url, flush=True)  # a parent process reads this line to know it is up
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
