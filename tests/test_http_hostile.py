"""The HTTP port against hostile and broken clients, and one supervisor per home.
Real `jobvisor run`, raw sockets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from supervisor_app import http
from tests.helpers import wait_for
from tests.supervisor_harness import REPO, Supervisor, base_config, free_port

SMALL = {"memory_per_job": "1MiB"}


@pytest.fixture
def sup(db, worker_env, tmp_path):
    s = Supervisor(tmp_path, worker_env, base_config(free_port(), {
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})).start()
    yield s
    assert s.stop() == 0


def _raw(port: int, data: bytes, *, read: bool = True, timeout: float = 10) -> bytes:
    return _raw_to("127.0.0.1", port, data, read=read, timeout=timeout)


def _raw_to(host: str, port: int, data: bytes, *, read: bool = True,
            timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as c:
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


@pytest.mark.parametrize(("length", "expected"), [
    (b"-1", 400), (b"abc", 400), (b"1e3", 400), (b" 12x", 400),
    (b"99999999999999999999999", 413),  # a number, just too large: 413
])
def test_a_bad_content_length_is_refused_with_400_before_any_body_is_read(sup, length,
                                                                         expected):
    # No body follows the headers: the answer comes before the server read any.
    resp = _raw(sup.port, b"POST /ui/api/jobs/1/cancel HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n")
    assert _status(resp) == expected, resp[:200]
    assert "Traceback" not in sup.log()


def _listening(port: int) -> list[list[str]]:
    """`ss` rows (state, Recv-Q, Send-Q, local, peer) of the sockets listening on `port`;
    for a listening socket Send-Q is its backlog (the kernel's, after somaxconn)."""
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed: the listen backlog can't be read")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_the_port_listens_with_a_backlog_of_at_least_128(sup):
    (row,) = _listening(sup.port)
    state, _recv_q, send_q, local, _peer = row[:5]
    assert state == "LISTEN" and local == f"127.0.0.1:{sup.port}"
    assert int(send_q) >= 128  # the floor (it was 5)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(send_q) == min(http.BACKLOG, somaxconn)  # what we ask, as far as allowed


@pytest.mark.parametrize("half", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # headers never finished
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",  # body
])
def test_a_half_sent_request_is_closed_by_the_server_after_the_read_timeout(sup, half):
    slack = 5.0
    bound = http.IDLE_TIMEOUT + http.CLEANUP_INTERVAL + slack
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        c.sendall(half)
        sent = time.monotonic()
        c.settimeout(bound)
        try:
            data = c.recv(65536)  # b"": the server closed the connection
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            pytest.fail(f"the half-sent request was still open after {bound:g}s")
        took = time.monotonic() - sent
    assert data == b""
    # Closed by the idle timeout, not refused at once.
    assert http.IDLE_TIMEOUT - 1 <= took <= bound


def test_jobvisor_http_host_0000_binds_every_address(db, worker_env, tmp_path):
    env = dict(worker_env, JOBVISOR_HTTP_HOST="0.0.0.0")
    # The file says loopback; the variable (the Dockerfile's and compose's) wins.
    s = Supervisor(tmp_path, env, base_config(free_port(), {
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})).start()
    try:
        listening = {(c.laddr.ip, c.laddr.port) for c in
                     psutil.Process(s.proc.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("0.0.0.0", s.port)}
        assert [r[3] for r in _listening(s.port)] == [f"0.0.0.0:{s.port}"]
        wait_for(lambda: (s.get("/healthz") or (0,))[0] == 200, what="/healthz 200")
        # Reachable on an address other than loopback, where the machine has one.
        other = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not a.address.startswith("127.")]
        if other:
            resp = _raw_to(other[0], s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n\r\n")
            assert _status(resp) == 200
    finally:
        assert s.stop() == 0


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
