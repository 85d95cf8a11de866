"""`webhook` jobs: POST one signed notification that a job or a batch finished.

The queue enqueues them (sql/004_batches.sql) in the transaction that finishes the job
or batch, with payload `{"url": ..., "body": {...}}`; the body already says what
happened, so a delivery never reads other jobs. Being jobs, deliveries get the queue's
retries with backoff, run in their own worker processes (a receiver that hangs only
holds a delivery thread, for at most the timeout), and a delivery that used its attempts
is `failed` and shows in `jobvisor status` and `jobs show`.

Outcomes: 2xx is done. 408, 429, 5xx, timeouts and connection errors are transient.
Other 4xx, a URL outside the allow-list, a missing secret and a redirect to another
host are permanent. A redirect to the same host is followed (at most 3) with the same
POST. Logs and errors name `scheme://host/path` only, never a query string or the body.

Options (the type's YAML `options:`): `timeout` (seconds per request, default
$JOBVISOR_WEBHOOK_TIMEOUT or 10, at most 60).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urljoin

import httpx

from workers import Job, JobContext, PayloadError, PermanentError, TransientError
from workers.core import webhooks

log = logging.getLogger("jobvisor.webhook")

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "jobvisor-webhook/1"


def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
    payload = job.payload if isinstance(job.payload, dict) else {}
    url, body = payload.get("url"), payload.get("body")
    if not isinstance(url, str) or not isinstance(body, dict):
        raise PayloadError("webhook: payload needs 'url' (a string) and 'body' (an object)")
    allowed = webhooks.allowed_hosts()
    _check(url, allowed)
    secret = webhooks.load_secret()
    if secret is None:
        raise PermanentError("webhook_secret_missing",
                             f"set {webhooks.SECRET_ENV} (or {webhooks.SECRET_FILE_ENV}) for "
                             "the workers that deliver webhooks")
    data = webhooks.encode_body(body)
    base_headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhooks.EVENT_HEADER: str(body.get("event", "")),
        webhooks.DELIVERY_HEADER: str(body.get("delivery") or f"webhook:{job.id}"),
        "X-Jobvisor-Attempt": str(job.attempt),
    }
    timeout_s = webhooks.timeout_seconds(ctx.options)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
    target = url
    # trust_env=False: no proxy or .netrc credentials from the environment end up being
    # sent to a receiver; redirects are ours to judge, hop by hop.
    with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for hop in range(MAX_REDIRECTS + 1):
            ctx.check_cancelled()
            status, location = _post(client, target, data, base_headers, secret, timeout_s)
            if 200 <= status < 300:
                log.info("webhook_delivered", extra={
                    "job_id": job.id, "target": webhooks.redact(target), "status": status,
                    "attempt": job.attempt, "redirects": hop})
                return {"status_code": status, "target": webhooks.redact(target),
                        "redirects": hop}
            if status in REDIRECTS and location:
                target = _redirect(url, target, location, allowed)
                continue
            _raise_for(status, target)
    raise PermanentError("webhook_too_many_redirects",
                         f"more than {MAX_REDIRECTS} redirects from {webhooks.redact(url)}")


def _check(url: str, allowed: list[str]) -> None:
    try:
        webhooks.check_url(url, allowed)
    except webhooks.WebhookURLError as exc:
        raise PermanentError("webhook_url_refused", str(exc)) from None


def _post(client: httpx.Client, target: str, data: bytes, base_headers: dict[str, str],
          secret: bytes, timeout_s: float) -> tuple[int, str | None]:
    # Signed per request: a retry or a redirect carries a fresh timestamp, so a receiver's
    # replay window stays short; the delivery id stays the same for de-duplication.
    headers = base_headers | {webhooks.SIGNATURE_HEADER: webhooks.signature_header(secret, data)}
    where = webhooks.redact(target)
    try:
        # Streamed and closed unread: the receiver's body is none of our business, and a
        # large one must not cost memory.
        with client.stream("POST", target, content=data, headers=headers) as resp:
            return resp.status_code, resp.headers.get("location")
    except httpx.TimeoutException:
        raise TransientError("webhook_timeout",
                             f"no answer from {where} within {timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise TransientError("webhook_unreachable",
                             f"{type(exc).__name__} calling {where}") from None


def _redirect(original: str, current: str, location: str, allowed: list[str]) -> str:
    target = urljoin(current, location)
    if not webhooks.same_host(original, target):
        raise PermanentError(
            "webhook_redirect_refused",
            f"{webhooks.redact(current)} redirects to another host "
            f"({webhooks.redact(target)}); only same-host redirects are followed")
    _check(target, allowed)
    return target


def _raise_for(status: int, target: str) -> None:
    message = f"HTTP {status} from {webhooks.redact(target)}"
    if status in (408, 429) or status >= 500:
        raise TransientError(f"webhook_http_{status}", message)
    raise PermanentError(f"webhook_http_{status}", message)
