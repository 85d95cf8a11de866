"""Model servers (Ollama) that share this machine's GPUs: what their models hold.

A model a server has loaded already lowers the free GPU reading (NVML, sysfs), so the
planner must not subtract it again. What the free reading does not show is a model the
server loaded before and has since unloaded (its ``keep_alive`` ran out): it loads again
with the next job that needs it, and then its memory must still be there. So each
replan reads every server's ``GET /api/ps``, remembers per (server, model) the largest
``size_vram`` seen, for ``supervisor.model_servers_memory_ttl`` after it was last seen
loaded, and reports as *reserved* the remembered size of every model not loaded now.
The planner takes the reserved bytes off the GPU budget (docs/planning.md, "Model server
memory").

Which servers: ``supervisor.model_servers`` when the YAML sets it (each URL listed there
is taken to share our GPUs, e.g. another container on this host; ``[]`` reads none);
otherwise ``$OLLAMA_BASE_URL`` (default ``http://localhost:11434``), but only when it
names this machine: a server on another host keeps its models on that host's GPUs.

All servers together get ``READ_TIMEOUT_S`` per replan; a server that does not answer,
or answers something that is not Ollama's shape, reads as "unknown" (its remembered
models all count as reserved: if it crashed, it frees its memory now and takes it back
when it restarts). Each change of a server's state is logged once, never per replan,
and nothing raises.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

log = logging.getLogger("jobvisor.model_servers")

URL_ENV = "OLLAMA_BASE_URL"
DEFAULT_URL = "http://localhost:11434"
READ_TIMEOUT_S = 1.0  # for all servers of one replan together
MAX_ANSWER_BYTES = 1 << 20  # /api/ps lists a handful of models; more is not Ollama
MAX_NAME = 200
DEFAULT_MEMORY_TTL_S = 3600.0

# Where a server's URL came from (shown in status and the dashboard).
FROM_CONFIG = "supervisor.model_servers"
FROM_ENV = URL_ENV
FROM_DEFAULT = "default"

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                          "ip6-loopback"})


# --- URLs --------------------------------------------------------------------------------


def parse_server_url(value: Any) -> str:
    """A model server's base URL, normalised (no trailing slash); ValueError says why not.

    Credentials are refused: the URL is shown in logs, status and on the dashboard."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a URL such as {DEFAULT_URL} (got {value!r})")
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{display_url(text)!r}: no user or password in the URL "
                         "(it is shown in logs, status and on the dashboard)")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a base URL has no query or fragment")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def display_url(url: str) -> str:
    """The URL without any user:password part (an environment variable may carry one)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def own_names() -> set[str]:
    """This host's own names, without asking DNS (which may hang a replan)."""
    name = socket.gethostname().lower().rstrip(".")
    return {name, name.split(".", 1)[0]} - {""}


def own_addresses() -> set[str]:
    addresses: set[str] = set()
    try:
        for entries in psutil.net_if_addrs().values():
            for a in entries:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    addresses.add(a.address.split("%", 1)[0].lower())
    except (OSError, RuntimeError):  # no permission, or no such API here
        pass
    return addresses


def is_this_machine(host: str, names: Iterable[str] | None = None,
                    addresses: Iterable[str] | None = None) -> bool:
    """Whether ``host`` (a URL's host name) names this machine: loopback, localhost, this
    host's name, or one of its interfaces' addresses. No DNS lookups."""
    h = host.strip("[]").lower().rstrip(".").split("%", 1)[0]
    if h in _LOCAL_NAMES or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return h in (own_names() if names is None else {n.lower() for n in names})
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    known = own_addresses() if addresses is None else {a.lower() for a in addresses}
    return ip.compressed in {str(ipaddress.ip_address(a)) for a in known if _is_ip(a)}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Target:
    """A server the supervisor knows of; ``counted`` False: not read (why in ``note``)."""

    url: str
    source: str  # FROM_CONFIG, FROM_ENV or FROM_DEFAULT
    counted: bool = True
    note: str | None = None


def targets(configured: Sequence[str] | None, env: Mapping[str, str]) -> list[Target]:
    """The servers to read: the YAML list when it is set (``[]``: none), else the URL the
    model-backed job types use, when it points at this machine."""
    if configured is not None:
        return [Target(url, FROM_CONFIG) for url in configured]
    raw = (env.get(URL_ENV) or "").strip()
    source = FROM_ENV if raw else FROM_DEFAULT
    raw = raw or DEFAULT_URL
    # An environment URL may carry credentials (a proxy in front of Ollama): used for the
    # request, never shown.
    stripped = display_url(raw)
    try:
        url = parse_server_url(stripped)
    except ValueError as err:
        return [Target(stripped, source, counted=False, note=f"not a usable URL: {err}")]
    if raw != stripped:
        url = raw.rstrip("/")
    host = urlsplit(url).hostname or ""
    if not is_this_machine(host):
        return [Target(url, source, counted=False,
                       note=f"{host} is another host: its models are on its GPUs, not ours")]
    return [Target(url, source)]


# --- one reading -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    name: str
    size_vram: int  # bytes on the GPU(s)
    size: int | None = None  # bytes in all (a partly offloaded model has size > size_vram)
    expires_at: str | None = None


@dataclass(frozen=True)
class ReservedModel:
    name: str
    size_vram: int  # the largest size_vram seen
    unloaded_s: float | None  # seconds since last seen loaded (None: never this run)


@dataclass
class ModelServerReading:
    url: str  # without credentials
    source: str
    counted: bool  # False: not read at all (another host, a bad URL)
    reachable: bool | None  # None when not read
    error: str | None = None
    models: list[LoadedModel] = field(default_factory=list)  # loaded now ([] when unknown)
    reserved: list[ReservedModel] = field(default_factory=list)

    @property
    def held_bytes(self) -> int | None:
        """GPU memory its loaded models hold (already "not free"); None when unknown."""
        return sum(m.size_vram for m in self.models) if self.reachable else None

    @property
    def reserved_bytes(self) -> int:
        """GPU memory kept for models it had loaded and has unloaded."""
        return sum(m.size_vram for m in self.reserved)

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "source": self.source, "counted": self.counted,
            "reachable": self.reachable, "error": self.error,
            "models": [{"name": m.name, "size_vram": m.size_vram, "size": m.size,
                        "expires_at": m.expires_at} for m in self.models],
            "held_bytes": self.held_bytes,
            "reserved_bytes": self.reserved_bytes,
            "reserved": [{"name": m.name, "size_vram": m.size_vram,
                          "unloaded_s": None if m.unloaded_s is None else round(m.unloaded_s, 1)}
                         for m in self.reserved],
        }


def parse_ps(doc: Any) -> list[LoadedModel]:
    """Ollama's ``/api/ps`` answer as loaded models; ValueError when it isn't that shape."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError("no 'models' list")
    models = []
    for i, m in enumerate(doc["models"]):
        if not isinstance(m, dict):
            raise ValueError(f"models[{i}] is not an object")
        name = m.get("name") or m.get("model")
        if not isinstance(name, str) or not name:
            raise ValueError(f"models[{i}] has no name")
        vram = m.get("size_vram")
        if isinstance(vram, bool) or not isinstance(vram, int) or vram < 0:
            raise ValueError(f"models[{i}].size_vram is not a byte count")
        size = m.get("size")
        size = size if isinstance(size, int) and not isinstance(size, bool) else None
        expires = m.get("expires_at")
        models.append(LoadedModel(name[:MAX_NAME], vram, size,
                                  expires[:64] if isinstance(expires, str) else None))
    return models


def read_ps(client: httpx.Client, url: str, timeout: float) -> tuple[list[LoadedModel] | None,
                                                                      str | None]:
    """(loaded models, None) or (None, why not). Within about ``timeout`` seconds, even
    against a server that answers one byte at a time."""
    deadline = time.monotonic() + timeout
    try:
        with client.stream("GET", url + "/api/ps", timeout=timeout) as answer:
            if answer.status_code != 200:
                return None, f"HTTP {answer.status_code}"
            body = bytearray()
            for chunk in answer.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    return None, "answer too large"
                if time.monotonic() > deadline:
                    return None, "timed out"
    except httpx.TimeoutException:
        return None, "timed out"
    except httpx.ConnectError:
        return None, "connection refused or host unreachable"
    except (httpx.HTTPError, OSError) as err:
        return None, f"request failed ({type(err).__name__})"
    try:
        doc = json.loads(bytes(body))
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that aren't text
        return None, "not an Ollama /api/ps answer: not JSON"
    try:
        return parse_ps(doc), None
    except ValueError as err:
        return None, f"not an Ollama /api/ps answer: {err}"


# --- what is remembered between replans --------------------------------------------------


@dataclass
class _Seen:
    size_vram: int
    at: float  # monotonic time last seen loaded


class ModelServerWatch:
    """Reads the servers each replan and remembers what their models took.

    One instance lives as long as the supervisor. ``clock`` and ``client`` are for tests.
    """

    def __init__(self, *, timeout: float = READ_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 client: httpx.Client | None = None) -> None:
        self.timeout = timeout
        self.clock = clock
        self._client = client
        self._seen: dict[str, dict[str, _Seen]] = {}
        self._state: dict[str, str] = {}  # url -> state last logged
        self._ever_reached: set[str] = set()
        self._reserved_logged: dict[str, tuple[tuple[str, int], ...]] = {}

    def client(self) -> httpx.Client:
        if self._client is None:
            # No proxies from the environment: these servers are on this machine (or on
            # its container network); a proxy would answer for the wrong host. A fresh
            # connection each replan: one kept open would outlive a restarted server.
            self._client = httpx.Client(trust_env=False, follow_redirects=False,
                                        headers={"Connection": "close"})
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def read(self, servers: Sequence[Target], ttl: float = DEFAULT_MEMORY_TTL_S
             ) -> list[ModelServerReading]:
        """One reading per server, at most ``timeout`` seconds for all of them."""
        start = self.clock()
        deadline = time.monotonic() + self.timeout
        readings = []
        for t in servers:
            shown = display_url(t.url)
            if not t.counted:
                self._changed(t, shown, "not_counted", t.note)
                readings.append(ModelServerReading(shown, t.source, False, None, t.note))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                models, error = None, "not read: this replan's time for model servers ran out"
            else:
                models, error = read_ps(self.client(), t.url, left)
            readings.append(self._account(t, shown, models, error, start, ttl))
        current = {display_url(t.url) for t in servers}
        for remembered in (self._seen, self._state, self._reserved_logged):
            for gone in set(remembered) - current:
                del remembered[gone]  # a server no longer configured
        return readings

    def _account(self, t: Target, shown: str, models: list[LoadedModel] | None,
                 error: str | None, now: float, ttl: float) -> ModelServerReading:
        seen = self._seen.setdefault(shown, {})
        for name in [n for n, s in seen.items() if now - s.at > ttl]:
            del seen[name]  # not loaded for longer than the TTL: forgotten
        loaded: set[str] = set()
        if models is not None:
            self._ever_reached.add(shown)
            for m in models:
                loaded.add(m.name)
                prev = seen.get(m.name)
                seen[m.name] = _Seen(max(m.size_vram, prev.size_vram if prev else 0), now)
        reserved = sorted((ReservedModel(n, s.size_vram, now - s.at)
                           for n, s in seen.items() if n not in loaded),
                          key=lambda m: m.name)
        reading = ModelServerReading(shown, t.source, True, models is not None, error,
                                     models or [], reserved)
        self._changed(t, shown, "ok" if models is not None else "unknown", error)
        key = tuple((m.name, m.size_vram) for m in reserved)
        if key != self._reserved_logged.get(shown, ()):
            self._reserved_logged[shown] = key
            log.info("model_memory_reserved", extra={
                "url": shown, "models": [f"{n}={b}" for n, b in key],
                "bytes": reading.reserved_bytes})
        return reading

    def _changed(self, t: Target, shown: str, state: str, detail: str | None) -> None:
        """Log a server's state when it changes (first reading included), once."""
        label = f"{state}:{detail}" if state == "not_counted" else state
        if self._state.get(shown) == label:
            return
        self._state[shown] = label
        if state == "ok":
            log.info("model_server_reachable", extra={"url": shown, "source": t.source})
        elif state == "not_counted":
            log.info("model_server_not_counted", extra={"url": shown, "source": t.source,
                                                        "reason": detail})
        else:
            # Loud for a server the operator listed or that answered before; a default
            # URL with no Ollama behind it is a normal machine.
            level = logging.WARNING if (t.source != FROM_DEFAULT
                                        or shown in self._ever_reached) else logging.INFO
            log.log(level, "model_server_unreachable", extra={
                "url": shown, "source": t.source, "error": detail,
                "reserved_models": len(self._seen.get(shown, {}))})
