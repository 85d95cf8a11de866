"""The HTTP port against hostile and broken clients, and one supervisor per home.
Real `jobvisor run`, raw sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import psutil
import psycopg
import pytest

from tests.supervisor_harness import REPO, Supervisor, base_config, free_port

SMALL = {"memory_per_job": "1MiB"}


@pytest.fixture
def sup(db, worker_env, tmp_path):
    s = Supervisor(tmp_path, worker_env, base_config(free_port(), {
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})).start()
    yield s
    assert s.stop() == 0


def _raw(port: int, data: bytes, *, read: bool = True, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = c.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999999999999999"])
def test_a_bad_content_length_is_refused_with_400_before_any_body_is_read(sup, length):
    resp = _raw(sup.port, b"POST /ui/api/jobs/1/cancel HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n")
    assert _status(resp) in (400, 413)
    assert "Traceback" not in sup.log()


def test_a_body_over_the_limit_is_refused_while_reading_and_never_held(sup):
    rss_before = psutil.Process(sup.proc.pid).memory_info().rss
    sent = 0
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        c.sendall(b"POST /ui/api/jobs/1/cancel HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
        try:
            for _ in range(400):  # up to 400 MiB, unauthenticated
                c.sendall(chunk)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            resp = c.recv(65536)
        except ConnectionResetError:
            resp = b""
    assert sent < 400  # the server stopped reading long before
    if resp:
        assert _status(resp) == 413
    grown = psutil.Process(sup.proc.pid).memory_info().rss - rss_before
    assert grown < 32 << 20


def test_half_sent_requests_hold_no_thread_and_healthz_still_answers(sup):
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", sup.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(s)
        status, _, _ = sup.get("/healthz")
        assert status == 200
        assert psutil.Process(sup.proc.pid).num_threads() < 60
    finally:
        for s in socks:
            s.close()


def test_a_keep_alive_connection_is_framed_by_content_length(sup):
    body = b"x" * 10
    two = (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + body
           + b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    resp = _raw(sup.port, two)
    assert resp.count(b"HTTP/1.1 ") == 2
    assert resp.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 200" in resp
    big = (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 << 10)
           + b"GET /healthz HTTP/1.1\r\n\r\n" * 4000)
    resp = _raw(sup.port, big)
    # Refused as a whole: the rest of the oversized body is never parsed as requests.
    assert _status(resp) == 413 and resp.count(b"HTTP/1.1 ") == 1


def test_200_concurrent_scrapers_are_all_answered(sup):
    results: list[int] = []
    lock = threading.Lock()

    def scrape() -> None:
        resp = _raw(sup.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    timeout=30)
        with lock:
            results.append(_status(resp) if resp else 0)

    threads = [threading.Thread(target=scrape) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 200


def _run(env: dict[str, str], config, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_app", "run", "--config",
                           str(config), *extra], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_second_supervisor_in_the_same_home_exits_2_naming_the_running_pid(sup):
    out = _run(sup.env, sup.config_path)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert f"pid {sup.proc.pid}" in line and "another supervisor" in line
    # The first one's pid file is untouched and `jobvisor reload` still finds it.
    assert (sup.dir / "pid").read_text().strip() == str(sup.proc.pid)
    reload = subprocess.run([sys.executable, "-m", "supervisor_app", "reload"], env=sup.env,
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert reload.returncode == 0, reload.stderr


def test_a_taken_port_exits_2_naming_host_and_port_before_migrating(empty_dsn, worker_env,
                                                                    tmp_path):
    dsn = empty_dsn
    blocker = socket.create_server(("127.0.0.1", 0))
    try:
        port = blocker.getsockname()[1]
        env = dict(worker_env, DATABASE_URL=dsn)
        s = Supervisor(tmp_path, env, base_config(port, {"noop": SMALL}))
        out = _run(s.env, s.config_path)
        assert out.returncode == 2
        (line,) = out.stderr.strip().splitlines()
        assert f"127.0.0.1:{port}" in line and "Traceback" not in out.stderr
        with psycopg.connect(dsn) as conn:
            (schema,) = conn.execute("SELECT to_regnamespace('jobvisor')").fetchone()
        assert schema is None  # nothing was migrated
    finally:
        blocker.close()


def test_the_shipped_config_listens_on_loopback_and_the_container_on_every_address():
    import yaml

    shipped = yaml.safe_load((REPO / "config" / "jobvisor.yaml").read_text())
    assert shipped["supervisor"]["http"]["host"] == "127.0.0.1"
    assert "JOBVISOR_HTTP_HOST=0.0.0.0" in (REPO / "Dockerfile").read_text()
    compose = yaml.safe_load((REPO / "compose.yml").read_text())
    envs = [svc.get("environment") or {} for svc in compose["services"].values()]
    assert any(isinstance(e, dict) and e.get("JOBVISOR_HTTP_HOST") == "0.0.0.0" for e in envs)
