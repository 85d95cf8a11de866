"""Webhooks: which URLs jobvisor may call, and how a delivery is signed.

A callback URL is checked twice: when a job or batch carrying it is enqueued (so a
typo or a forbidden host fails at once, with the reason) and again right before each
delivery (the allow-list may have shrunk since). Only http/https, no user:password in
the URL, and the host must be on `JOBVISOR_WEBHOOK_ALLOWED_HOSTS`: a queue that anyone
can enqueue into must not become a way to make the worker call internal services.

Signature (Stripe's scheme, so receivers know the recipe, see docs/webhooks.md):

    X-Jobvisor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is signed with the body, so a receiver that rejects old timestamps rejects
replays; `X-Jobvisor-Delivery` (stable across retries) lets it drop duplicates.

Nothing here logs; callers log `redact(url)` only, since a query string may hold a token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SECRET_ENV = "JOBVISOR_WEBHOOK_SECRET"
SECRET_FILE_ENV = "JOBVISOR_WEBHOOK_SECRET_FILE"
ALLOWED_HOSTS_ENV = "JOBVISOR_WEBHOOK_ALLOWED_HOSTS"
TIMEOUT_ENV = "JOBVISOR_WEBHOOK_TIMEOUT"

SIGNATURE_HEADER = "X-Jobvisor-Signature"
DELIVERY_HEADER = "X-Jobvisor-Delivery"
EVENT_HEADER = "X-Jobvisor-Event"

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
REPLAY_TOLERANCE_S = 300
MAX_URL_LENGTH = 2048  # the same limit as the CHECK constraints in sql/004_batches.sql


class WebhookURLError(ValueError):
    """A callback URL jobvisor refuses to call. The message names the reason and the
    host, never the query string."""


# --- the allow-list --------------------------------------------------------------------------

def allowed_hosts(environ: Mapping[str, str] | None = None) -> list[str]:
    """Entries of JOBVISOR_WEBHOOK_ALLOWED_HOSTS (comma-separated, lower case).

    An entry is `host` (any port), `host:port`, `*.domain` (any subdomain, not the
    domain itself) or `*.domain:port`; IPv6 literals go in brackets (`[::1]:8080`). A URL
    without a port means 443 or 80. Unset or empty allows no host at all: callbacks are
    off until an operator names the receivers.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ALLOWED_HOSTS_ENV, "")
    return [e.strip().lower().rstrip(".") for e in raw.split(",") if e.strip()]


def _split_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return host.rstrip("."), int(port) if port.isdigit() else None


def host_allowed(host: str, port: int, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        pattern, entry_port = _split_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):  # ".example.com": a subdomain, never the apex
                return True
        elif host == pattern:
            return True
    return False


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def check_url(url: str, allowed: list[str] | None = None) -> str:
    """Return `url` if jobvisor may POST to it, else raise WebhookURLError saying why."""
    if not isinstance(url, str) or not url:
        raise WebhookURLError("callback URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"callback URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise WebhookURLError("callback URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookURLError(f"callback URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLError(
            f"callback URL scheme {scheme or '(none)'!r} is not allowed: use http or https")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and process listings; sign-only instead.
        raise WebhookURLError("callback URL must not contain user:password@")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookURLError("callback URL has no host")
    allowed = allowed_hosts() if allowed is None else allowed
    effective_port = port if port is not None else _default_port(scheme)
    if not host_allowed(host, effective_port, allowed):
        listed = ", ".join(allowed) if allowed else "none: the variable is unset or empty"
        raise WebhookURLError(
            f"callback URL host {host}:{effective_port} is not in {ALLOWED_HOSTS_ENV} "
            f"(allowed: {listed})")
    return url


def redact(url: str) -> str:
    """scheme://host[:port]/path: what may be logged or stored of a URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(malformed URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def same_host(a: str, b: str) -> bool:
    """True when `b` (a redirect target) points at the host `a` points at, without a
    downgrade from https to http."""
    pa, pb = urlsplit(a), urlsplit(b)
    if (pa.hostname or "").rstrip(".") != (pb.hostname or "").rstrip("."):
        return False
    return not (pa.scheme.lower() == "https" and pb.scheme.lower() != "https")


# --- signing ------------------------------------------------------------------------------------

def load_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The signing secret: JOBVISOR_WEBHOOK_SECRET, else the file JOBVISOR_WEBHOOK_SECRET_FILE
    names (trailing newline stripped); None when neither is set."""
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV, "")
    if value:
        return value.encode()
    path = env.get(SECRET_FILE_ENV, "")
    if path:
        try:
            data = Path(path).read_bytes().rstrip(b"\r\n")
        except OSError:
            return None
        return data or None
    return None


def encode_body(body: Any) -> bytes:
    """The exact bytes POSTed and signed: compact, keys sorted, UTF-8."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode("utf-8")


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """Hex HMAC-SHA256 over `"<timestamp>." + body`."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={sign(secret, body, t)}"


def verify_signature(secret: bytes, body: bytes, header: str, *,
                     tolerance: float = REPLAY_TOLERANCE_S, now: float | None = None) -> bool:
    """The receiver's check: a v1 signature matches and the timestamp is recent.

    (docs/webhooks.md has the same recipe without jobvisor installed.)
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in (header or "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp)
    return any(hmac.compare_digest(expected, s) for s in signatures)


def timeout_seconds(options: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> float:
    """Per-request timeout: the type's YAML `options.timeout`, else JOBVISOR_WEBHOOK_TIMEOUT,
    else 10 s; capped at 60 s so a receiver can't hold a delivery thread for long."""
    env = os.environ if environ is None else environ
    raw: Any = (options or {}).get("timeout", env.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = DEFAULT_TIMEOUT_S
    if not value > 0:
        value = DEFAULT_TIMEOUT_S
    return min(value, MAX_TIMEOUT_S)
