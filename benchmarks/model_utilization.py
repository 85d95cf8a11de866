"""Model-slot utilisation and model calls per submission, against the fake Ollama.

    python -m benchmarks.model_utilization [--slots 4] [--latency 0.5] [--jobs 100]
                                           [--settings serial,planned,shipped_max]
                                           [--processes P] [--concurrency C]
                                           [--failures 0,1,2,3] [--per-k 3]

The fake Ollama (`python -m tests.fakes.ollama`, its own process) serves S parallel
requests per model (`--slots`, Ollama's OLLAMA_NUM_PARALLEL) and holds each for L
seconds (`--latency`); it counts busy slot-seconds per model. It is started with
TCP_NODELAY on its sockets, as Ollama (Go) has them; as shipped it has Nagle on, and each
answer then stalls ~40 ms on the client's delayed ACK (`--no-fake-nodelay` keeps that).

**Utilisation.** A backlog of M vision jobs (one page each, `--page-kb` of PNG) is
read by real `python -m workers --type vision` processes with AI_BACKEND=local and
AI_VISION_BACKEND=ollama, in up to three settings (`--settings`):

* `serial`: 1 process × concurrency 1;
* `planned`: P processes × C threads with P × C = S, the fewest that fill the slots:
  C defaults to the shipped `config/jobvisor.yaml` vision concurrency (2), P to
  ceil(S / C) within the type's `processes.max` (4 shipped);
* `shipped_max`: `processes.max` × C (4 × 2 = 8 in flight), what the planner runs
  for vision when GPU memory allows; requests beyond S wait in the fake's queue, as
  they would in Ollama's.

The workers are started first and waited for until every one LISTENs (checked in
pg_stat_activity), so no process start-up falls in the window. Then the M jobs are
committed in one transaction. The window runs from the first lease (`min(started_at)`,
the database's clock, mapped onto this machine's clock by the best of 5
`clock_timestamp()` round trips) to the commit of the last job, observed as the M-th
`jobvisor_jobs` NOTIFY with payload `feedback`. Each vision job enqueues its feedback
job in its completing transaction, so that NOTIFY is delivered at the job's commit.
(`finished_at` can't be used: it is `now()` of the job's transaction, which starts
before the model call.) utilisation = the fake's busy slot-seconds of the vision model
/ (S × window).

**Calls per submission.** One vision and one feedback worker (1 × 1, DSPy feedback, the
default for AI_BACKEND=local). For each k in `--failures`, `--per-k` submissions are
run one after another; before each, k faults (HTTP 500) are injected for the feedback
model on `/v1/chat/completions` (DSPy) *and* on `/api/chat` (the direct fallback), so
each of the first k feedback attempts really fails and is retried by the queue. The
fake's counters per endpoint and model, read before and after each submission, give its
calls.

Needs a scratch database (the pipeline writes submissions and enqueues feedback jobs);
one per part. Progress goes to stderr; the figures are the last line on stdout, as one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/model_utilization.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from benchmarks._common import (  # noqa: E402
    REPO,
    BenchDatabase,
    BenchFailed,
    WorkerGroup,
    bench_database,
    counts_between,
    emit,
    live_jobs,
    main_guard,
    positive_int,
    progress,
    r3,
    running,
    wait_until,
)
from benchmarks.supervisor_handlers import SHIPPED_CONFIG, load_yaml  # noqa: E402
from supervisor_app.database import DatabaseUnavailable  # noqa: E402
from workers.core.queue import NewJob, enqueue_many  # noqa: E402
from workers.learning.storage import LocalStorage  # noqa: E402

VISION = "bench-vision:latest"
FEEDBACK = "bench-feedback:latest"
OWNER = "bench"
CRITERIA = ["Struktur und Gliederung", "Argumentation"]
TARGET = 0.95
V1 = "/v1/chat/completions"
CHAT = "/api/chat"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_utilization",
                                description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=positive_int, default=4,
                   help="S: requests the fake serves at once per model")
    p.add_argument("--latency", type=float, default=0.5, help="L: seconds per request")
    p.add_argument("--jobs", type=positive_int, default=100, help="M: vision jobs per setting")
    p.add_argument("--settings", default="serial,planned,shipped_max",
                   help="which settings to run, comma-separated")
    p.add_argument("--processes", type=positive_int, default=None,
                   help="planned setting's processes (default ceil(S / concurrency))")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="threads per process of planned and shipped_max "
                        "(default: shipped vision)")
    p.add_argument("--page-kb", type=positive_int, default=200,
                   help="size of each job's page image (incompressible PNG), KiB")
    p.add_argument("--failures", default="0,1,2,3",
                   help="k values: injected feedback failures per submission ('' skips)")
    p.add_argument("--per-k", type=positive_int, default=3, help="submissions per k")
    p.add_argument("--feedback-latency", type=float, default=0.1,
                   help="seconds per feedback-model request (calls part only)")
    p.add_argument("--fake-nodelay", action=argparse.BooleanOptionalAction, default=True,
                   help="answer on TCP_NODELAY sockets, as Ollama does (--no-fake-nodelay: "
                        "the fake as shipped, ~40 ms Nagle/delayed-ACK stall per request)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up (exit 1) when a setting takes longer than this (s)")
    return p


# --- the fake Ollama, in its own process -----------------------------------------------

@dataclass
class FakeServer:
    """`python -m tests.fakes.ollama` on a free port, driven through `/_fake/*`."""

    slots: int
    latency: float
    model_latency: dict[str, float] = field(default_factory=dict)
    nodelay: bool = True
    port: int = 0  # 0: any free one (a restart passes the one it had)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, timeout: float = 30.0) -> str:
        # The fake answers on TCP_NODELAY sockets, as Ollama does; --no-fake-nodelay turns
        # that off to show what Nagle's ~40 ms delayed-ACK stall would cost.
        launch = ["-c", "import sys; from tests.fakes import ollama as f; "
                        f"f._Handler.disable_nagle_algorithm = {self.nodelay!r}; "
                        "sys.exit(f.main(sys.argv[1:]))"]
        cmd = [sys.executable, *launch, "--port", str(self.port),
               "--slots", str(self.slots), "--latency", f"{self.latency:g}",
               "--models", f"{VISION},{FEEDBACK}"]
        for model, seconds in self.model_latency.items():
            cmd += ["--model-latency", f"{model}={seconds:g}"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://"):
            raise BenchFailed(f"fake Ollama did not print its URL within {timeout:g}s")
        self.url = line
        return line

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None
                                     else "POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own localhost
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/_fake/stats")

    def reset(self) -> None:
        self._call("/_fake/reset", {})

    def inject(self, fault: str, count: int, endpoint: str, model: str) -> None:
        self._call("/_fake/faults", {"fault": fault, "count": count, "endpoint": endpoint,
                                     "model": model})

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # its main loop stops the server on Ctrl-C
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def fake_ollama(server: FakeServer) -> Iterator[FakeServer]:
    try:
        server.start()
        progress(f"fake Ollama at {server.url}: {server.slots} slots, "
                 f"{server.latency:g}s per request, TCP_NODELAY {server.nodelay}")
        yield server
    finally:
        server.stop()


def calls_of(stats: dict[str, Any], endpoint: str, model: str) -> int:
    return int(stats["calls"].get(endpoint, {}).get(model, 0))


# --- workers with the AI environment ----------------------------------------------------

@dataclass
class ModelWorkers(WorkerGroup):
    """A WorkerGroup whose processes talk to the fake Ollama."""

    ai_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return super().command() + self.extra_args

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in super()._env().items()
               if not k.startswith(("AI_", "OLLAMA_"))}
        return env | self.ai_env


def ai_env(fake: FakeServer, storage_dir: Path) -> dict[str, str]:
    return {"AI_BACKEND": "local", "AI_VISION_BACKEND": "ollama", "OLLAMA_BASE_URL": fake.url,
            "AI_VISION_MODEL": VISION, "AI_FEEDBACK_MODEL": FEEDBACK, "AI_READ_TIMEOUT": "60",
            "STORAGE_DIR": str(storage_dir)}


# --- submissions and their vision jobs --------------------------------------------------

def page_png(kib: int, rng: random.Random) -> bytes:
    """A valid grayscale PNG of noise, about `kib` KiB (noise doesn't compress)."""
    side = max(8, math.isqrt(kib * 1024))
    raw = b"".join(b"\x00" + rng.randbytes(side) for _ in range(side))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def add_submissions(conn: psycopg.Connection, storage: LocalStorage, n: int, kib: int,
                    rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """n pending submissions, each with one rendered page in storage; their vision
    payloads (as the pdf stage writes them). Committed; nothing enqueued yet."""
    out = []
    with conn.transaction():
        conn.execute("SELECT set_config('app.current_sub', %s, true)", (OWNER,))
        for _ in range(n):
            sid = str(uuid.uuid4())
            page = f"submissions/{sid}/page-1.png"
            storage.write(page, page_png(kib, rng))
            conn.execute(
                "INSERT INTO public.learning_submissions (id, owner_sub, source_key, mime_type,"
                " criteria) VALUES (%s, %s, %s, 'image/png', %s)",
                (sid, OWNER, page, Jsonb(CRITERIA)))
            out.append((sid, {"submission_id": sid, "owner_sub": OWNER, "page_keys": [page]}))
    return out


def vision_jobs(subs: list[tuple[str, dict[str, Any]]]) -> list[NewJob]:
    return [NewJob("vision", payload, key=f"vision:{sid}", max_attempts=3)
            for sid, payload in subs]


# --- part 1: utilisation ----------------------------------------------------------------

def db_clock_offset(conn: psycopg.Connection) -> float:
    """Database clock − this machine's clock (s), from the tightest of 5 round trips."""
    best: tuple[float, float] | None = None
    for _ in range(5):
        t0 = time.time()
        db_now = conn.execute("SELECT clock_timestamp()").fetchone()[0].timestamp()
        t1 = time.time()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, db_now - (t0 + t1) / 2)
    assert best is not None
    return best[1]


def wait_commits(listen: psycopg.Connection, conn: psycopg.Connection, group: WorkerGroup,
                 n: int, timeout: float) -> float:
    """Wait for n `feedback` NOTIFYs (one per completed vision job); the last one's
    arrival time on this machine's clock."""
    deadline = time.monotonic() + timeout
    seen, last = 0, 0.0
    while seen < n:
        if time.monotonic() > deadline:
            raise BenchFailed(f"timed out after {timeout:g}s: {seen} of {n} vision jobs done")
        group.check_alive()
        before = seen
        for note in listen.notifies(timeout=0.5, stop_after=n - seen):
            if note.channel == "jobvisor_jobs" and note.payload == "feedback":
                seen += 1
                last = time.time()
        if seen == before and not live_jobs(conn, "vision"):
            raise BenchFailed(f"vision queue drained with only {seen} of {n} jobs completed")
    return last


def measure_setting(name: str, db: BenchDatabase, conn: psycopg.Connection,
                    fake: FakeServer, storage: LocalStorage, env: dict[str, str],
                    processes: int, concurrency: int, args: argparse.Namespace,
                    rng: random.Random) -> dict[str, Any]:
    group = ModelWorkers(db, "vision", processes, concurrency, ai_env=env)
    progress(f"{name}: {processes} process(es) × concurrency {concurrency}, "
             f"{args.jobs} jobs")
    subs = add_submissions(conn, storage, args.jobs, args.page_kb, rng)
    with running(group), psycopg.connect(db.dsn, autocommit=True) as listen:
        group.wait_started(timeout=60)
        group.wait_listening(conn, timeout=30)
        listen.execute("LISTEN jobvisor_jobs")
        offset = db_clock_offset(conn)
        fake.reset()
        with conn.transaction():
            ids = enqueue_many(conn, vision_jobs(subs))
        committed = time.time()
        progress(f"{name}: workers idle and listening; {args.jobs} jobs committed")
        last_commit = wait_commits(listen, conn, group, args.jobs, args.timeout)
        stats = fake.stats()
    span = (min(ids), max(ids))
    counts = counts_between(conn, *span)
    if counts.get("completed", 0) != args.jobs:
        raise BenchFailed(f"{name}: expected {args.jobs} completed vision jobs, found {counts}")
    first_lease, retried = conn.execute(
        "SELECT min(started_at), count(*) FILTER (WHERE attempts > 1) FROM jobvisor.jobs"
        " WHERE id BETWEEN %s AND %s", span).fetchone()
    first_start = first_lease.timestamp() - offset
    wall = last_commit - first_start
    model = stats["models"].get(VISION, {})
    busy = float(model.get("busy_slot_seconds", 0.0))
    threads = processes * concurrency
    util = busy / (args.slots * wall)
    figures = {
        "processes": processes, "concurrency": concurrency, "jobs": args.jobs,
        "utilisation": round(util, 4), "wall_s": r3(wall),
        "busy_slot_s": r3(busy), "ideal_wall_s": r3(args.jobs * args.latency
                                                     / min(args.slots, threads)),
        "jobs_per_s": round(args.jobs / wall, 2),
        "vision_calls": calls_of(stats, CHAT, VISION),
        "max_concurrent": int(model.get("max_concurrent", 0)),
        "max_queued_at_fake": int(stats.get("max_queued", 0)),
        "retried_jobs": int(retried),
        # Slot-seconds nobody used, per job: with P × C = S, the time a thread spends
        # outside its model call (lease, database work, page, HTTP), plus ramp and tail.
        "idle_slot_ms_per_job": round((args.slots * wall - busy) / args.jobs * 1000, 1),
        "first_lease_after_commit_ms": round((first_start - committed) * 1000, 1),
    }
    progress(f"{name}: utilisation {util:.4f} (busy {busy:.2f} slot-s over "
             f"{args.slots} × {wall:.3f} s); {figures['vision_calls']} vision calls, "
             f"max {figures['max_concurrent']} at once")
    return figures


@dataclass(frozen=True)
class Setting:
    name: str
    processes: int
    concurrency: int
    why: str


def utilisation(args: argparse.Namespace, fake: FakeServer, storage: LocalStorage,
                env: dict[str, str], settings: list[Setting]) -> tuple[dict[str, Any], str]:
    rng = random.Random(1)
    out: dict[str, Any] = {}
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        require_scratch(db)
        conn.execute("SELECT set_config('app.current_sub', %s, false)", (OWNER,))
        for st in settings:
            out[st.name] = measure_setting(st.name, db, conn, fake, storage, env,
                                           st.processes, st.concurrency, args, rng)
    return out, db.server_version


def require_scratch(db: BenchDatabase) -> None:
    if not db.scratch:
        raise DatabaseUnavailable(
            f"{db.where}: this benchmark needs a scratch database (CREATE DATABASE): it "
            "writes submissions and enqueues feedback jobs that real workers would run")


# --- part 2: model calls per submission -------------------------------------------------

def calls_per_submission(args: argparse.Namespace, fake: FakeServer, storage: LocalStorage,
                         env: dict[str, str], ks: list[int]) -> tuple[dict[str, Any], str]:
    rng = random.Random(2)
    # Room for k failures and the success, so no submission fails for lack of attempts.
    attempts = json.dumps({"feedback": max(ks) + 2})
    with bench_database() as db, psycopg.connect(db.dsn, autocommit=True) as conn:
        require_scratch(db)
        conn.execute("SELECT set_config('app.current_sub', %s, false)", (OWNER,))
        vision = ModelWorkers(db, "vision", 1, 1, poll=0.2, ai_env=env,
                              extra_args=["--attempts-by-type", attempts])
        feedback = ModelWorkers(db, "feedback", 1, 1, poll=0.2, ai_env=env,
                                extra_args=["--backoff", "0.05", "--max-backoff", "0.2"])
        with running(vision), running(feedback):
            vision.wait_started(timeout=60)
            feedback.wait_started(timeout=60)
            out: dict[str, Any] = {}
            for k in ks:
                out[str(k)] = _run_k(k, args, conn, fake, storage, (vision, feedback), rng)
    return out, db.server_version


def _run_k(k: int, args: argparse.Namespace, conn: psycopg.Connection, fake: FakeServer,
           storage: LocalStorage, groups: tuple[WorkerGroup, WorkerGroup],
           rng: random.Random) -> dict[str, Any]:
    rows = []
    for i in range(args.per_k):
        if k:
            fake.inject("500", k, V1, FEEDBACK)
            fake.inject("500", k, CHAT, FEEDBACK)
        before = fake.stats()
        ((sid, payload),) = add_submissions(conn, storage, 1, args.page_kb, rng)
        enqueue_many(conn, [NewJob("vision", payload, key=f"vision:{sid}", max_attempts=3)])

        def finished(sid: str = sid) -> str | None:
            for g in groups:
                g.check_alive()
            row = conn.execute("SELECT analysis_status FROM public.learning_submissions"
                               " WHERE id = %s", (sid,)).fetchone()
            return row[0] if row and row[0] in ("completed", "failed") else None

        status = wait_until(finished, timeout=120, what=f"submission {i + 1} of k={k}")
        after = fake.stats()
        attempts = conn.execute(
            "SELECT attempts FROM jobvisor.jobs WHERE idempotency_key = %s",
            (f"feedback:{sid}",)).fetchone()
        row = {"status": status, "feedback_attempts": int(attempts[0]) if attempts else 0,
               "faults_left": int(after["faults_pending"])}
        for label, ep, model in (("vision", CHAT, VISION), ("feedback_v1", V1, FEEDBACK),
                                 ("feedback_api_chat", CHAT, FEEDBACK)):
            row[label] = calls_of(after, ep, model) - calls_of(before, ep, model)
        others = after["calls_total"] - before["calls_total"] - sum(
            row[x] for x in ("vision", "feedback_v1", "feedback_api_chat"))
        row["other_calls"] = others
        rows.append(row)
        progress(f"k={k} submission {i + 1}/{args.per_k}: {status}, vision {row['vision']}, "
                 f"feedback /v1 {row['feedback_v1']} + /api/chat {row['feedback_api_chat']}, "
                 f"{row['feedback_attempts']} attempt(s)")
        if row["faults_left"]:
            raise BenchFailed(f"k={k}: {row['faults_left']} injected faults were not consumed "
                              f"(model name mismatch?)")
    n = len(rows)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in rows) / n, 3)

    return {
        "submissions": n, "completed": sum(r["status"] == "completed" for r in rows),
        "vision_calls_per_submission": mean("vision"),
        "feedback_calls_per_submission": round(mean("feedback_v1") + mean("feedback_api_chat"), 3),
        "feedback_v1_calls": mean("feedback_v1"), "feedback_api_chat_calls": mean("feedback_api_chat"),
        "feedback_attempts": mean("feedback_attempts"), "other_calls": mean("other_calls"),
        "vision_min_max": [min(r["vision"] for r in rows), max(r["vision"] for r in rows)],
    }


# --- the run ----------------------------------------------------------------------------

def choose_settings(args: argparse.Namespace, names: list[str]) -> list[Setting]:
    vision = (load_yaml(SHIPPED_CONFIG).get("types") or {}).get("vision") or {}
    shipped_c = int(vision.get("concurrency", 1))
    shipped_max = int((vision.get("processes") or {}).get("max", 1))
    c = args.concurrency or shipped_c
    c_why = "given" if args.concurrency else "shipped vision concurrency"
    p = args.processes or min(shipped_max, math.ceil(args.slots / c))
    p_why = "given" if args.processes else f"ceil(S / C), within processes.max {shipped_max}"
    every = {
        "serial": Setting("serial", 1, 1, "one process, one job at a time"),
        "planned": Setting("planned", p, c, f"C {c_why}, P {p_why}"),
        "shipped_max": Setting("shipped_max", shipped_max, c,
                               f"processes.max {shipped_max} (shipped), C {c_why}"),
    }
    return [every[n] for n in names]


def run(args: argparse.Namespace, names: list[str], ks: list[int]) -> None:
    settings = choose_settings(args, names)
    load_at_start = round(os.getloadavg()[0], 2)
    for st in settings:
        progress(f"{st.name}: {st.processes} × {st.concurrency} = "
                 f"{st.processes * st.concurrency} in flight for S={args.slots} ({st.why})")
    server = FakeServer(args.slots, args.latency, {FEEDBACK: args.feedback_latency},
                        nodelay=args.fake_nodelay)
    with fake_ollama(server) as fake, tempfile.TemporaryDirectory(prefix="jv-bench-") as tmp:
        storage = LocalStorage(Path(tmp))
        env = ai_env(fake, Path(tmp))
        figures, version = utilisation(args, fake, storage, env, settings) if settings \
            else ({}, "")
        calls, version = calls_per_submission(args, fake, storage, env, ks) if ks \
            else ({}, version)
    emit({
        "slots": args.slots, "latency_s": args.latency, "jobs": args.jobs,
        "page_kib": args.page_kb, "fake_nodelay": args.fake_nodelay, "target": TARGET,
        "settings": figures,
        "target_met": {name: f["utilisation"] >= TARGET for name, f in figures.items()
                       if name != "serial"},
        "calls_per_submission": calls,
        "vision_calls_stay_1": all(v["vision_min_max"] == [1, 1] for v in calls.values()),
        "server_version": version, "load_1m_at_start": load_at_start,
    })


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.latency < 0.1:  # argparse's error: one line on stderr, exit 2
        parser.error("--latency must be at least 0.1 s (the fake's own overhead is a few ms "
                     "per request)")
    try:
        ks = sorted({int(x) for x in args.failures.split(",") if x.strip()})
    except ValueError:
        parser.error("--failures must be comma-separated integers")
    if any(k < 0 for k in ks):
        parser.error("--failures must not be negative")
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(names) - {"serial", "planned", "shipped_max"})
    if unknown:
        parser.error(f"--settings: unknown {', '.join(unknown)} "
                     "(serial, planned, shipped_max)")
    return main_guard(lambda: run(args, list(dict.fromkeys(names)), ks))


if __name__ == "__main__":
    sys.exit(main())
