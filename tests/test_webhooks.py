"""Webhooks: signed, queued deliveries when a job or a batch finishes.

Receivers are local HTTP servers on 127.0.0.1 whose answers a test scripts; a hanging
receiver is released by the test itself, so nothing here depends on timing.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from supervisor_app.cli import batches as cli_batches
from supervisor_app.errors import BadInput
from tests.helpers import counts, start_worker, stop, wait_for
from workers import Job, PermanentError, TransientError
from workers.core import queue as q
from workers.core import webhook_handler as handler
from workers.core import webhooks

SECRET = "test-webhook-secret"
FAST = ("--poll", "0.1", "--backoff", "0.05", "--max-backoff", "0.2")
REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """Answers each POST with the next scripted action (the last one repeats): a status
    code, `("redirect", code, location)`, or `"hang"` (no answer until `release`)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script) or [200]
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.lock:
                    index = len(owner.requests)
                    owner.requests.append({"path": self.path, "headers": dict(self.headers),
                                           "body": body})
                    action = owner.script[min(index, len(owner.script) - 1)]
                if action == "hang":
                    owner.release.wait(120)
                    action = 200
                if isinstance(action, tuple):
                    _, code, location = action
                    self.send_response(code)
                    self.send_header("Location", location)
                else:
                    self.send_response(action)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _hook_env(worker_env: dict[str, str], receiver: Receiver, monkeypatch) -> dict[str, str]:
    """Env for workers and this process: the receiver allowed, the secret set."""
    allowed = f"127.0.0.1:{receiver.port}"
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, allowed)
    return worker_env | {webhooks.ALLOWED_HOSTS_ENV: allowed, webhooks.SECRET_ENV: SECRET}


def _delivery(db: psycopg.Connection, key: str) -> dict[str, Any] | None:
    return q.webhook_delivery(db, key)


def _delivered(db: psycopg.Connection, key: str, status: str = "completed"):
    return lambda: (d := _delivery(db, key)) is not None and d["status"] == status and d


# --- end to end, with worker processes -----------------------------------------------------

def test_a_batch_webhook_fires_once_after_the_last_job(db, worker_env, receiver, monkeypatch,
                                                        tmp_path):
    env = _hook_env(worker_env, receiver, monkeypatch)
    jobs = [q.NewJob("noop", {}) for _ in range(20)] + [
        q.NewJob("fail", {"kind": "permanent"}), q.NewJob("sleep", {"seconds": 1})]
    q.enqueue_batch(db, "hooked", jobs, callback_url=receiver.url("/batch?token=abc"))
    procs = [start_worker(env, t, "--concurrency", "4", *FAST, log=tmp_path / f"{t}.log")
             for t in ("noop", "noop", "fail", "sleep", "webhook")]
    try:
        hook = wait_for(_delivered(db, "webhook:batch:hooked"), what="the batch webhook")
        # An operator retry reopens the batch; when it finishes again, nothing is re-sent.
        failed_id = db.execute("SELECT id FROM jobvisor.jobs WHERE job_type = 'fail'"
                               ).fetchone()[0]
        assert q.retry_failed(db, failed_id)
        wait_for(lambda: q.get_job(db, failed_id)["status"] == "failed", what="the re-run")
        assert q.get_batch(db, "hooked")["finished"]
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0] * len(procs)
    assert receiver.count() == 1
    body = json.loads(receiver.requests[0]["body"])
    assert body["event"] == "batch.finished" and body["delivery"] == "webhook:batch:hooked"
    assert {k: body["batch"][k] for k in ("id", "total", "completed", "failed", "cancelled")} \
        == {"id": "hooked", "total": 22, "completed": 21, "failed": 1, "cancelled": 0}
    assert receiver.requests[0]["path"] == "/batch?token=abc"
    # Enqueued by the transaction that finished the last job, not before.
    # (Its created_at is the finishing transaction's start: after every job of the batch
    # started, and no later than the last one finished.)
    (last_started, last_finished) = db.execute(
        "SELECT max(started_at), max(finished_at) FROM jobvisor.jobs WHERE batch_id = 'hooked'"
        " AND id <> %s", (failed_id,)).fetchone()
    created = db.execute("SELECT created_at FROM jobvisor.jobs WHERE id = %s",
                         (hook["id"],)).fetchone()[0]
    assert last_started <= created <= last_finished
    assert db.execute("SELECT count(*) FROM jobvisor.jobs WHERE job_type = 'webhook'"
                      ).fetchone()[0] == 1
    assert hook["attempts"] == 1


def test_a_receiver_failing_twice_gets_the_delivery_on_the_third_attempt_signed(
        db, worker_env, monkeypatch, tmp_path):
    with Receiver(500, 500, 200) as receiver:
        env = _hook_env(worker_env, receiver, monkeypatch)
        job_id = q.enqueue(db, q.NewJob("noop", {"n": 1}, callback_url=receiver.url()))
        procs = [start_worker(env, t, *FAST, log=tmp_path / f"{t}.log")
                 for t in ("noop", "webhook")]
        try:
            hook = wait_for(_delivered(db, f"webhook:job:{job_id}"), what="the delivery")
        finally:
            codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    assert hook["attempts"] == 3 and receiver.count() == 3
    bodies = {r["body"] for r in receiver.requests}
    assert len(bodies) == 1  # the same bytes each time; only the signature's time moves
    for attempt, request in enumerate(receiver.requests, 1):
        headers = request["headers"]
        assert webhooks.verify_signature(SECRET.encode(), request["body"],
                                         headers[webhooks.SIGNATURE_HEADER])
        assert headers[webhooks.DELIVERY_HEADER] == f"webhook:job:{job_id}"
        assert headers["X-Jobvisor-Attempt"] == str(attempt)
        assert headers["Content-Type"] == "application/json"
    body = json.loads(receiver.requests[-1]["body"])
    assert body["event"] == "job.finished"
    assert {k: body["job"][k] for k in ("id", "type", "status")} == {
        "id": job_id, "type": "noop", "status": "completed"}
    failed_attempts = q.get_job(db, hook["id"])
    assert failed_attempts["status"] == "completed"


def test_a_receiver_that_never_answers_does_not_slow_the_job_pipeline(db, worker_env,
                                                                      monkeypatch, tmp_path):
    with Receiver("hang", 200) as receiver:
        env = _hook_env(worker_env, receiver, monkeypatch)
        procs = [start_worker(env, "webhook", "--concurrency", "1", "--options",
                              '{"timeout": 60}', "--timeout", "120", *FAST,
                              log=tmp_path / "webhook.log")]
        procs += [start_worker(env, "noop", "--concurrency", "4", "--prefetch", "8", *FAST,
                               log=tmp_path / f"noop{i}.log") for i in range(2)]
        try:
            first = q.enqueue(db, q.NewJob("noop", {}, callback_url=receiver.url()))
            wait_for(lambda: receiver.count() == 1, what="the first delivery to hang")
            q.enqueue_many(db, [q.NewJob("noop", {"i": i}, callback_url=receiver.url())
                                for i in range(200)])
            wait_for(lambda: counts(db, "noop").get("completed") == 201,
                     what="the pipeline to finish while the receiver hangs")
            # Every job finished while the first delivery still hangs on its first attempt.
            hanging = _delivery(db, f"webhook:job:{first}")
            assert (hanging["status"], hanging["attempts"]) == ("leased", 1)
            assert counts(db, "webhook") == {"leased": 1, "queued": 200}
            assert receiver.count() == 1
            receiver.release.set()
            wait_for(lambda: counts(db, "webhook").get("completed") == 201, timeout=120,
                     what="the deliveries once the receiver answers")
        finally:
            receiver.release.set()
            codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0]


def test_a_url_outside_the_allow_list_is_refused_at_enqueue(db, monkeypatch):
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, "hooks.example, *.trusted.example:8443")
    with pytest.raises(webhooks.WebhookURLError,
                       match=r"evil\.example:443 is not in JOBVISOR_WEBHOOK_ALLOWED_HOSTS") as err:
        q.enqueue_many(db, [q.NewJob("noop", {}),
                            q.NewJob("noop", {}, callback_url="https://evil.example/x?t=key1")])
    assert "key1" not in str(err.value)
    with pytest.raises(webhooks.WebhookURLError, match="169.254.169.254"):
        q.enqueue_batch(db, "b", [q.NewJob("noop", {})],
                        callback_url="http://169.254.169.254/latest/meta-data")
    assert counts(db) == {}  # nothing of either call was inserted
    assert db.execute("SELECT count(*) FROM jobvisor.batches").fetchone()[0] == 0
    with pytest.raises(BadInput, match="--callback-url: callback URL scheme 'ftp'"):
        cli_batches.check_callback_url("ftp://hooks.example/x")
    assert cli_batches.check_callback_url("https://a.trusted.example:8443/x") is not None
    monkeypatch.delenv(webhooks.ALLOWED_HOSTS_ENV)
    with pytest.raises(webhooks.WebhookURLError, match="allowed: none"):
        q.enqueue(db, q.NewJob("noop", {}, callback_url="https://hooks.example/x"))


def test_finishing_a_job_with_a_callback_enqueues_its_delivery_with_the_outcome(
        db, monkeypatch):
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, "hooks.example")
    cancelled = q.enqueue(db, q.NewJob("noop", {}, callback_url="https://hooks.example/c"))
    failed = q.enqueue(db, q.NewJob("noop", {}, callback_url="https://hooks.example/f"))
    plain = q.enqueue(db, q.NewJob("noop", {}))
    q.cancel(db, cancelled)
    for job in q.lease(db, "noop", 2, worker_id="w", lease_seconds=30):
        if job.id == failed:
            q.fail(db, job.id, job.lease_key, code="boom", message="it broke")
        else:
            assert job.id == plain
            q.complete(db, job.id, job.lease_key, None)
    rows = db.execute("SELECT idempotency_key, key_sticky, payload FROM jobvisor.jobs"
                      " WHERE job_type = 'webhook' ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(f"webhook:job:{cancelled}", True),
                                            (f"webhook:job:{failed}", True)]
    body = rows[1][2]["body"]
    assert rows[1][2]["url"] == "https://hooks.example/f"
    assert body["job"]["status"] == "failed" and body["job"]["error_code"] == "boom"
    assert rows[0][2]["body"]["job"]["status"] == "cancelled"


# --- the handler, without a database -------------------------------------------------------

class _Ctx:
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = options or {}
        self.cancelled = False

    def check_cancelled(self) -> None:
        pass


def _job(url: str, attempt: int = 1) -> Job:
    return Job(7, "webhook", {"url": url, "body": {"event": "job.finished",
                                                   "delivery": "webhook:job:6"}},
               attempt, 8)


@pytest.fixture
def hook_env(monkeypatch, receiver: Receiver) -> Receiver:
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, f"127.0.0.1:{receiver.port}")
    monkeypatch.setenv(webhooks.SECRET_ENV, SECRET)
    return receiver


def test_handler_follows_a_same_host_redirect_and_refuses_another_host(hook_env):
    receiver = hook_env
    receiver.script = [("redirect", 307, "/moved"), 204]
    result = handler.handle(_job(receiver.url("/start?sig=1")), _Ctx())
    assert result == {"status_code": 204, "target": receiver.url("/moved"), "redirects": 1}
    assert [r["path"] for r in receiver.requests] == ["/start?sig=1", "/moved"]
    receiver.script = [("redirect", 302, "http://localhost:9/elsewhere")]
    with pytest.raises(PermanentError) as err:
        handler.handle(_job(receiver.url()), _Ctx())
    assert err.value.code == "webhook_redirect_refused"


@pytest.mark.parametrize(("status", "error", "code"), [
    (404, PermanentError, "webhook_http_404"),
    (410, PermanentError, "webhook_http_410"),
    (429, TransientError, "webhook_http_429"),
    (408, TransientError, "webhook_http_408"),
    (503, TransientError, "webhook_http_503"),
])
def test_handler_sorts_receiver_answers_into_transient_and_permanent(hook_env, status, error,
                                                                     code):
    hook_env.script = [status]
    with pytest.raises(error) as err:
        handler.handle(_job(hook_env.url("/x?secret=zz")), _Ctx())
    assert err.value.code == code
    assert "zz" not in err.value.message  # no query string in stored errors


def test_handler_times_out_on_a_silent_receiver_and_retries_later(hook_env):
    hook_env.script = ["hang"]
    with pytest.raises(TransientError) as err:
        handler.handle(_job(hook_env.url()), _Ctx({"timeout": 0.3}))
    assert err.value.code == "webhook_timeout"


def test_handler_refuses_what_is_no_longer_allowed_or_cannot_be_signed(hook_env, monkeypatch):
    with pytest.raises(PermanentError) as err:
        handler.handle(_job("https://elsewhere.example/x"), _Ctx())
    assert err.value.code == "webhook_url_refused"
    monkeypatch.delenv(webhooks.SECRET_ENV)
    with pytest.raises(PermanentError) as err:
        handler.handle(_job(hook_env.url()), _Ctx())
    assert err.value.code == "webhook_secret_missing"
    assert hook_env.count() == 0


def test_handler_reads_the_secret_from_a_file(hook_env, monkeypatch, tmp_path):
    monkeypatch.delenv(webhooks.SECRET_ENV)
    (tmp_path / "secret").write_text(SECRET + "\n")
    monkeypatch.setenv(webhooks.SECRET_FILE_ENV, str(tmp_path / "secret"))
    handler.handle(_job(hook_env.url()), _Ctx())
    request = hook_env.requests[0]
    assert webhooks.verify_signature(SECRET.encode(), request["body"],
                                     request["headers"][webhooks.SIGNATURE_HEADER])


def test_connection_refused_is_transient(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, f"127.0.0.1:{port}")
    monkeypatch.setenv(webhooks.SECRET_ENV, SECRET)
    with pytest.raises(TransientError) as err:
        handler.handle(_job(f"http://127.0.0.1:{port}/x"), _Ctx())
    assert err.value.code == "webhook_unreachable"


# --- URLs and signatures -----------------------------------------------------------------------

@pytest.mark.parametrize(("url", "ok"), [
    ("https://hooks.example/x", True),
    ("https://HOOKS.example./x", True),
    ("http://hooks.example:8080/x", False),       # port not allowed for this entry
    ("https://a.trusted.example:8443/", True),
    ("https://trusted.example:8443/", False),     # the wildcard is for subdomains only
    ("https://a.trusted.example/", False),        # wrong port (443)
    ("http://[::1]:9000/x", True),
    ("https://user:pw@hooks.example/x", False),
    ("file:///etc/passwd", False),
    ("javascript:alert(1)", False),
    ("https://hooks.example.evil.example/", False),
    ("https://hooks.example/a b", False),
])
def test_check_url_applies_the_allow_list(url, ok):
    allowed = webhooks.allowed_hosts({webhooks.ALLOWED_HOSTS_ENV:
                                      "hooks.example:443,*.trusted.example:8443,[::1]:9000"})
    if ok:
        assert webhooks.check_url(url, allowed) == url
    else:
        with pytest.raises(webhooks.WebhookURLError):
            webhooks.check_url(url, allowed)


def test_signatures_verify_only_for_the_same_body_secret_and_a_recent_time():
    body = webhooks.encode_body({"b": 1, "a": "ü"})
    assert body == '{"a":"ü","b":1}'.encode()
    header = webhooks.signature_header(b"k", body, timestamp=1_000_000)
    assert re.fullmatch(r"t=1000000,v1=[0-9a-f]{64}", header)
    assert webhooks.verify_signature(b"k", body, header, now=1_000_100)
    assert not webhooks.verify_signature(b"k", body + b" ", header, now=1_000_100)
    assert not webhooks.verify_signature(b"other", body, header, now=1_000_100)
    assert not webhooks.verify_signature(b"k", body, header, now=1_000_000 + 301)  # replay
    assert not webhooks.verify_signature(b"k", body, "v1=abc", now=1_000_000)


def test_the_documented_receiver_recipe_verifies_a_real_signature():
    text = (REPO / "docs" / "webhooks.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the receiver recipe must work as printed
    body = webhooks.encode_body({"event": "job.finished"})
    header = webhooks.signature_header(SECRET.encode(), body)
    verify = namespace["verify"]
    assert verify(SECRET.encode(), body, header)
    assert not verify(SECRET.encode(), body + b"x", header)
    old = webhooks.signature_header(SECRET.encode(), body, timestamp=1_000_000)
    assert not verify(SECRET.encode(), body, old)


def test_redact_keeps_only_scheme_host_port_and_path():
    assert webhooks.redact("https://h.example:8443/p/q?token=x#frag") == "https://h.example:8443/p/q"
    assert webhooks.redact("http://[::1]:9/x?y") == "http://[::1]:9/x"


@pytest.mark.parametrize(("setting", "attempts"), [("3", 3), ("lots", 8), (None, 8)])
def test_delivery_attempts_come_from_the_database_setting(db, db_dsn, monkeypatch, setting,
                                                          attempts):
    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, "hooks.example")
    if setting is not None:
        (name,) = db.execute("SELECT current_database()").fetchone()
        db.execute(f'ALTER DATABASE "{name}" SET jobvisor.webhook_max_attempts = {setting!r}')
    with psycopg.connect(db_dsn, autocommit=True) as conn:  # a session that sees the setting
        job_id = q.enqueue(conn, q.NewJob("noop", {}, callback_url="https://hooks.example/"))
        (job,) = q.lease(conn, "noop", 1, worker_id="w", lease_seconds=30)
        q.complete(conn, job.id, job.lease_key, None)
    assert q.webhook_delivery(db, q.webhook_key("job", job_id))["max_attempts"] == attempts
