"""GPU planning sees the model server: /api/ps is read each replan, a model that was
loaded and is unloaded keeps its memory off the GPU budget, and status and the dashboard
show it (docs/planning.md, "Model server memory")."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from supervisor_app import dashboard, registry_table
from supervisor_app import model_servers as ms
from supervisor_app.config import parse_config
from supervisor_app.supervisor import Supervisor
from tests.fakes.ollama import FakeOllama
from tests.test_cli import jv

GiB = 1024**3
VISION = "qwen2.5vl:7b"
FEEDBACK = "llama3.1:8b"
FAKE_SIZE = 4_000_000_000  # what the fake reports as size and size_vram of every model
LOG = "jobvisor.model_servers"


def load(base: str, model: str, keep_alive: str | int = "10m") -> None:
    """Load (or with keep_alive 0 unload) a model the way Ollama's clients do."""
    answer = httpx.post(base + "/api/chat", json={"model": model, "messages": [],
                                                   "keep_alive": keep_alive}, timeout=5)
    assert answer.status_code == 200, answer.text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stub:
    """A tiny HTTP server whose /api/ps answer (status, body, delay) a test sets; the fake
    Ollama reports one fixed size for every model and never answers garbage."""

    def __init__(self) -> None:
        self.status, self.body, self.delay = 200, b'{"models": []}', 0.0
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                stub.requests += 1
                if stub.delay:
                    time.sleep(stub.delay)
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(stub.body)))
                self.end_headers()
                self.wfile.write(stub.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def answer(self, models: list[dict[str, Any]] | None = None, *, raw: bytes | None = None,
               status: int = 200) -> None:
        self.status = status
        self.body = raw if raw is not None else json.dumps({"models": models or []}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


def ps_entry(name: str, size_vram: int) -> dict[str, Any]:
    return {"name": name, "model": name, "size": size_vram, "size_vram": size_vram,
            "digest": "0" * 64, "expires_at": "2031-01-01T00:00:00Z",
            "details": {"family": "x"}}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(url: str) -> list[ms.Target]:
    return ms.targets(None, {"OLLAMA_BASE_URL": url})


# --- reading /api/ps ------------------------------------------------------------------------


def test_the_reading_lists_the_models_the_fake_ollama_has_loaded_with_their_size_vram():
    with FakeOllama(models=[VISION, FEEDBACK]) as fake:
        watch = ms.ModelServerWatch()
        (empty,) = watch.read(local(fake.base_url))
        load(fake.base_url, VISION)
        load(fake.base_url, FEEDBACK)
        (reading,) = watch.read(local(fake.base_url))
    assert (empty.reachable, empty.models, empty.held_bytes) == (True, [], 0)
    assert reading.reachable is True and reading.error is None
    assert {m.name: m.size_vram for m in reading.models} == {VISION: FAKE_SIZE,
                                                             FEEDBACK: FAKE_SIZE}
    assert reading.held_bytes == 2 * FAKE_SIZE and reading.reserved_bytes == 0
    assert reading.source == "OLLAMA_BASE_URL" and reading.url == fake.base_url
    assert all(m.expires_at for m in reading.models)


def test_a_model_unloaded_after_being_seen_stays_reserved_until_the_ttl_runs_out():
    clock = Clock()
    with FakeOllama(models=[VISION, FEEDBACK]) as fake:
        watch = ms.ModelServerWatch(clock=clock)
        load(fake.base_url, VISION)
        load(fake.base_url, FEEDBACK)
        (both,) = watch.read(local(fake.base_url), ttl=3600)
        load(fake.base_url, VISION, keep_alive=0)  # its keep_alive ran out
        clock.now += 600
        (after,) = watch.read(local(fake.base_url), ttl=3600)
        clock.now += 3000  # 3600 s after VISION was last seen loaded: still kept
        (kept,) = watch.read(local(fake.base_url), ttl=3600)
        clock.now += 1
        (forgotten,) = watch.read(local(fake.base_url), ttl=3600)
    assert both.reserved == []
    assert [m.name for m in after.models] == [FEEDBACK] and after.held_bytes == FAKE_SIZE
    assert [(m.name, m.size_vram, m.unloaded_s) for m in after.reserved] == \
        [(VISION, FAKE_SIZE, 600.0)]
    assert kept.reserved_bytes == FAKE_SIZE
    # FEEDBACK, loaded all along, never expires; VISION is forgotten after the TTL.
    assert forgotten.reserved == [] and [m.name for m in forgotten.models] == [FEEDBACK]


def test_the_largest_size_vram_seen_is_what_is_kept(stub):
    watch = ms.ModelServerWatch()
    stub.answer([ps_entry(VISION, 5 * GiB)])
    watch.read(local(stub.url))
    stub.answer([ps_entry(VISION, 3 * GiB)])  # reloaded with a smaller context
    watch.read(local(stub.url))
    stub.answer([])
    (reading,) = watch.read(local(stub.url))
    assert [(m.name, m.size_vram) for m in reading.reserved] == [(VISION, 5 * GiB)]


def test_an_unreachable_server_reads_unknown_logs_one_line_and_keeps_what_it_had(
        stub, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    watch = ms.ModelServerWatch()
    stub.answer([ps_entry(VISION, 5 * GiB)])
    watch.read(local(stub.url))
    stub.close()  # the server is gone (crashed, or restarting)
    caplog.clear()
    readings = [watch.read(local(stub.url)) for _ in range(3)]
    for (r,) in readings:
        assert r.reachable is False and r.held_bytes is None and r.models == []
        assert r.error and "refused" in r.error
        # Unknown: what it had loaded may come back at once, so it stays reserved.
        assert [(m.name, m.size_vram) for m in r.reserved] == [(VISION, 5 * GiB)]
    unreachable = [r for r in caplog.records if r.getMessage() == "model_server_unreachable"]
    assert len(unreachable) == 1 and unreachable[0].levelno == logging.WARNING
    assert unreachable[0].url == stub.url


def test_no_server_behind_the_default_url_is_unknown_without_an_exception(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    watch = ms.ModelServerWatch()
    url = f"http://127.0.0.1:{closed_port()}"
    for _ in range(3):
        (r,) = watch.read(ms.targets(None, {"OLLAMA_BASE_URL": url}))
        assert (r.counted, r.reachable, r.reserved_bytes) == (True, False, 0)
    assert [r.getMessage() for r in caplog.records] == ["model_server_unreachable"]


@pytest.mark.parametrize(("raw", "status", "why"), [
    (b"<html>not json</html>", 200, "not JSON"),
    (b'{"models": [{"name": "x"}]}', 200, "models[0].size_vram is not a byte count"),
    (b'{"models": [{"name": "x", "size_vram": true}]}', 200, "size_vram is not a byte count"),
    (b'{"error": "nope"}', 200, "no 'models' list"),
    (b"[1, 2]", 200, "no 'models' list"),
    (b'{"models": ["x"]}', 200, "models[0] is not an object"),
    (b'{"error": "boom"}', 500, "HTTP 500"),
    (b"\xff\xfe\xfa", 200, "not JSON"),
])
def test_an_answer_that_is_not_ollamas_reads_unknown_logged_once_per_change(
        stub, caplog, raw, status, why):
    caplog.set_level(logging.INFO, logger=LOG)
    watch = ms.ModelServerWatch()
    stub.answer(raw=raw, status=status)
    first, second = watch.read(local(stub.url)), watch.read(local(stub.url))
    assert first[0].reachable is False and why in first[0].error
    assert second[0].reachable is False
    stub.answer([ps_entry(VISION, GiB)])
    (back,) = watch.read(local(stub.url))
    assert back.reachable is True and back.held_bytes == GiB
    assert [r.getMessage() for r in caplog.records] == ["model_server_unreachable",
                                                        "model_server_reachable"]


def test_a_hanging_server_costs_at_most_the_timeout_and_the_next_one_is_skipped(stub):
    stub.delay = 3.0
    watch = ms.ModelServerWatch(timeout=0.3)
    servers = [ms.Target(stub.url, ms.FROM_CONFIG), ms.Target(stub.url + "/b", ms.FROM_CONFIG)]
    # The stub answers after 3 s: a reader without its deadline would see it reachable.
    first, second = watch.read(servers)
    assert first.reachable is False and first.error == "timed out"
    assert second.reachable is False and "ran out" in second.error


def test_a_slow_drip_answer_is_cut_at_the_timeout():
    """One byte at a time, each well within a read timeout: the total still counts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                break
            time.sleep(0.05)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        watch = ms.ModelServerWatch(timeout=0.4)
        got: list = []
        # Without the overall deadline the drip (100 kB at 20 B/s) would go on for
        # over an hour: the read must come back at all, and say why.
        reader = threading.Thread(target=lambda: got.extend(watch.read(
            [ms.Target(f"http://127.0.0.1:{listener.getsockname()[1]}", ms.FROM_CONFIG)])),
            daemon=True)
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), "the read did not stop at its deadline"
        (r,) = got
        assert r.reachable is False and r.error == "timed out"
    finally:
        stop.set()
        listener.close()


# --- which servers ---------------------------------------------------------------------------


def test_a_remote_ollama_base_url_is_not_read_and_not_counted(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    asked: list[str] = []
    client = httpx.Client(transport=httpx.MockTransport(
        lambda request: asked.append(str(request.url)) or httpx.Response(200, json={
            "models": [ps_entry(VISION, 8 * GiB)]})))
    watch = ms.ModelServerWatch(client=client)
    servers = ms.targets(None, {"OLLAMA_BASE_URL": "http://gpu-box.example.org:11434/"})
    for _ in range(2):
        (r,) = watch.read(servers)
    assert asked == []
    assert (r.url, r.counted, r.reachable, r.held_bytes, r.reserved_bytes) == \
        ("http://gpu-box.example.org:11434", False, None, None, 0)
    assert "another host" in r.error
    assert [x.getMessage() for x in caplog.records] == ["model_server_not_counted"]


def test_the_default_and_local_urls_are_read():
    (default,) = ms.targets(None, {})
    assert (default.url, default.source, default.counted) == \
        ("http://localhost:11434", "default", True)
    for url in ("http://127.0.0.1:11434", "http://[::1]:11434", "http://localhost:1/",
                f"http://{socket.gethostname()}:11434"):
        (t,) = ms.targets(None, {"OLLAMA_BASE_URL": url})
        assert t.counted and t.source == "OLLAMA_BASE_URL", url


def test_this_machine_is_loopback_localhost_its_own_name_or_address():
    names, addresses = {"gpu01", "gpu01.lab.example"}, {"192.0.2.10", "fe80::1"}
    for host in ("localhost", "LOCALHOST.", "app.localhost", "127.0.0.1", "127.1.2.3", "::1",
                 "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "gpu01", "GPU01.lab.example",
                 "192.0.2.10", "fe80::1"):
        assert ms.is_this_machine(host, names, addresses), host
    for host in ("ollama", "gpu02", "192.0.2.11", "10.0.0.1", "2001:db8::1", "example.org"):
        assert not ms.is_this_machine(host, names, addresses), host


def test_the_yaml_list_replaces_the_environment_url_and_an_empty_list_reads_none():
    env = {"OLLAMA_BASE_URL": "http://localhost:11434"}
    cfg = parse_config({"supervisor": {"model_servers": ["http://ollama:11434/",
                                                         "http://127.0.0.1:11435"]}})
    listed = ms.targets(cfg.supervisor.model_servers, env)
    # Listed means "on our GPUs": another container on this host is read too.
    assert [(t.url, t.source, t.counted) for t in listed] == [
        ("http://ollama:11434", "supervisor.model_servers", True),
        ("http://127.0.0.1:11435", "supervisor.model_servers", True)]
    off = parse_config({"supervisor": {"model_servers": []}})
    assert ms.targets(off.supervisor.model_servers, env) == []
    assert parse_config({}).supervisor.model_servers is None


def test_credentials_in_the_environment_url_are_used_but_never_shown():
    seen: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(
        lambda request: seen.append(request) or httpx.Response(200, json={"models": []})))
    watch = ms.ModelServerWatch(client=client)
    (r,) = watch.read(ms.targets(None, {"OLLAMA_BASE_URL": "http://u:s3cret@localhost:11434/"}))
    assert r.url == "http://localhost:11434" and "s3cret" not in json.dumps(r.as_dict())
    assert seen and seen[0].headers["Authorization"].startswith("Basic ")


# --- the supervisor: plan, published state, dashboard, status ------------------------------------


@pytest.fixture
def machine_with_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    overrides = tmp_path / "machine.yaml"
    overrides.write_text("memory_available: 64GiB\nmemory_total: 64GiB\ncpu_count: 8\n"
                         "gpu_free: [13GiB]\n")
    monkeypatch.setenv("JOBVISOR_CAPACITY_OVERRIDES", str(overrides))
    return overrides


def gpu_supervisor(dsn: str, url: str) -> Supervisor:
    # 4 GiB a process; 13 GiB free − 1 GiB reserve = 12 GiB: three processes.
    cfg = parse_config({"types": {"ocr": {"processes": {"min": 1, "max": 4}, "concurrency": 2,
                                          "gpu_memory_per_job": "2GiB",
                                          "memory_per_job": "1MiB"}}}, "test.yaml")
    return Supervisor(cfg, Path("test.yaml"), dsn, {"OLLAMA_BASE_URL": url})


def test_the_supervisor_keeps_an_unloaded_models_memory_free_of_its_gpu_types(
        db_dsn, machine_with_gpu):
    with FakeOllama(models=[VISION]) as fake:
        sup = gpu_supervisor(db_dsn, fake.base_url)
        sup._replan()
        assert sup.plan["ocr"].processes == 3
        # The model is loaded: the (overridden) free reading would already show it, so
        # nothing more is taken off.
        load(fake.base_url, VISION)
        sup._replan()
        assert sup.plan["ocr"].processes == 3
        assert sup.view()["readings"]["model_memory_reserved_bytes"] == 0
        load(fake.base_url, VISION, keep_alive=0)
        sup._replan()
    # 12 GiB − 4e9 bytes kept for the unloaded model leaves room for two processes.
    assert sup.plan["ocr"].processes == 2
    assert sup.plan["ocr"].reason == "limited by GPU memory"
    view = sup.view()
    assert view["readings"]["model_memory_reserved_bytes"] == FAKE_SIZE
    assert view["budget"]["gpu_reserved_for_models_bytes"] == FAKE_SIZE
    assert view["budget"]["gpu_bytes"] == 12 * GiB - FAKE_SIZE


def test_the_dashboard_and_the_published_state_show_each_model_server(db_dsn, db, worker_env):
    with FakeOllama(models=[VISION, FEEDBACK]) as fake:
        sup = gpu_supervisor(db_dsn, fake.base_url)
        load(fake.base_url, VISION)
        load(fake.base_url, FEEDBACK)
        sup._replan()
        load(fake.base_url, VISION, keep_alive=0)
        sup._replan()
    answer = dashboard.route(sup, "GET", "/ui/api/state", {}, b"", "192.0.2.7")
    assert answer is not None and answer[0] == 200
    capacity = json.loads(answer[2])["capacity"]
    (server,) = capacity["readings"]["model_servers"]
    assert server["url"] == fake.base_url and server["reachable"] is True
    assert [(m["name"], m["size_vram"]) for m in server["models"]] == [(FEEDBACK, FAKE_SIZE)]
    assert server["held_bytes"] == FAKE_SIZE and server["reserved_bytes"] == FAKE_SIZE
    assert [m["name"] for m in server["reserved"]] == [VISION]
    assert capacity["budget"]["gpu_reserved_for_models_bytes"] == FAKE_SIZE
    js = dashboard.route(sup, "GET", "/ui/static/app.js", {}, b"", "x")[2].decode()
    assert "model_servers" in js and "kept for unloaded models" in js

    # What `jobvisor status` reads: the state the supervisor publishes.
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        registry_table.publish(conn, sup.sup_id, sup.host, 4242, sup.view())
    out = jv(worker_env, "status", "--json")
    assert out.returncode == 0, out.stderr
    (shown,) = json.loads(out.stdout)["model_servers"]
    assert shown["host"] == sup.host and shown["reserved_bytes"] == FAKE_SIZE
    assert shown["held_bytes"] == FAKE_SIZE and shown["reachable"] is True
    text = jv(worker_env, "status").stdout
    assert f"model server {fake.base_url} (OLLAMA_BASE_URL): 1 loaded ({FEEDBACK} 3.7GiB), " \
           f"holding 3.7GiB; 3.7GiB kept for unloaded models ({VISION} 3.7GiB)" in text


def test_status_says_when_a_model_server_does_not_answer(db_dsn, worker_env):
    sup = gpu_supervisor(db_dsn, f"http://127.0.0.1:{closed_port()}")
    sup._replan()
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        registry_table.publish(conn, sup.sup_id, sup.host, 4242, sup.view())
    text = jv(worker_env, "status").stdout
    assert "unreachable (connection refused or host unreachable), loaded models unknown; " \
           "nothing kept for unloaded models" in text


def test_without_a_gpu_the_reading_is_shown_and_gpu_types_get_their_min(db_dsn, tmp_path,
                                                                         monkeypatch):
    overrides = tmp_path / "machine.yaml"
    overrides.write_text("gpu_free: []\n")
    monkeypatch.setenv("JOBVISOR_CAPACITY_OVERRIDES", str(overrides))
    with FakeOllama(models=[VISION]) as fake:
        sup = gpu_supervisor(db_dsn, fake.base_url)
        load(fake.base_url, VISION)
        sup._replan()
        load(fake.base_url, VISION, keep_alive=0)
        sup._replan()
    assert (sup.plan["ocr"].processes, sup.plan["ocr"].reason) == (1, "no GPU (min only)")
    assert sup.view()["readings"]["model_servers"][0]["reserved_bytes"] == FAKE_SIZE
