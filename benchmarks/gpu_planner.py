"""The capacity planner against real GPU memory: a second process takes GPU memory, the
GPU type's planned processes shrink at once, and grow back (after the hysteresis) when
the memory is freed.

Modes:

- `supervisor`: a real `jobvisor run` (DATABASE_URL, else the embedded PostgreSQL) with
  one GPU type, `gpu` (built-in `noop` handler, `gpu_memory_per_job` 8 GiB,
  concurrency 1, processes 0..8). The timeline reads the state the supervisor publishes
  every 2 s (readings, plan, children) and, for exact times, the planner's own
  `plan gpu: A -> B (reason)` lines (the supervisor runs at JOBVISOR_LOG_LEVEL=DEBUG).
- `planner`: no database; `supervisor_app.planner.Planner` fed by
  `supervisor_app.capacity.read_capacity()` in a loop every `--replan` (what the
  supervisor does, without children: no RSS and no GPU memory of our own).

The memory is taken by a second process, `python3 -c <torch>`, which allocates `--take`
with one `torch.empty(..., device="cuda")`, holds it, frees it (`empty_cache`) and
exits. With `--simulate-gpu TOTAL` (no GPU needed) the readings come from a
JOBVISOR_CAPACITY_OVERRIDES file instead and "taking" rewrites that file.

    python -m benchmarks.gpu_planner [--mode supervisor|planner] [--take 60GiB]
        [--per-job 8GiB] [--max 8] [--replan 2s] [--timeline PATH] [--simulate-gpu 80GiB]

Prints the timeline on stderr (and to --timeline), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor_app.capacity import ENV_OVERRIDES, read_capacity
from supervisor_app.planner import PlanEntry, Planner
from supervisor_app.units import parse_bytes, parse_duration

GIB = 1 << 30
TYPE = "gpu"
PRESSURE = r"""
import sys, time
import torch
torch.zeros(1, device="cuda")  # the CUDA context first, so the baseline includes it
print("ready", flush=True)
sys.stdin.readline()
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("allocated", flush=True)
sys.stdin.readline()
del x
torch.cuda.empty_cache()
torch.cuda.synchronize()
print("freed", flush=True)
sys.stdin.readline()
"""


class Failed(Exception):
    pass


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_planner",
                                description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("supervisor", "planner"), default="supervisor")
    p.add_argument("--take", type=parse_bytes, default=60 * GIB, help="GPU memory taken")
    p.add_argument("--per-job", type=parse_bytes, default=8 * GIB,
                   help="gpu_memory_per_job of the type (concurrency 1)")
    p.add_argument("--max", type=int, default=8, help="processes.max of the type (min 0)")
    p.add_argument("--reserve", type=parse_bytes, default=1 * GIB,
                   help="supervisor.reserve.gpu_memory")
    p.add_argument("--replan", type=parse_duration, default=2.0, help="supervisor.replan")
    p.add_argument("--before", type=float, default=8.0, help="seconds before taking")
    p.add_argument("--hold", type=float, default=12.0, help="seconds the memory is held")
    p.add_argument("--after", type=float, default=14.0, help="seconds after freeing")
    p.add_argument("--sample", type=float, default=0.25, help="timeline sampling (s)")
    p.add_argument("--timeline", type=Path, help="also write the timeline here")
    p.add_argument("--torch-python", default="python3",
                   help="interpreter with torch for the memory taker (default python3)")
    p.add_argument("--simulate-gpu", type=parse_bytes, default=None,
                   help="no GPU: fake one of this size through JOBVISOR_CAPACITY_OVERRIDES")
    return p


# --- the memory taker --------------------------------------------------------------------

class Taker:
    """Takes and frees GPU memory on command: a torch process, or an overrides file."""

    def __init__(self, args: argparse.Namespace, overrides: Path | None) -> None:
        self.args = args
        self.overrides = overrides
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if self.overrides is not None:
            self._write_free(self.args.simulate_gpu)
            return
        self.proc = subprocess.Popen(
            [self.args.torch_python, "-c", PRESSURE, str(self.args.take)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready", timeout=120)

    def _write_free(self, free: int) -> None:
        assert self.overrides is not None
        tmp = self.overrides.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpu_free": [free]}))
        tmp.replace(self.overrides)  # atomic: the supervisor re-reads it every replan

    def _expect(self, word: str, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        # readline blocks; the taker prints within seconds or dies (then EOF).
        line = self.proc.stdout.readline().strip()
        if line != word or time.monotonic() > deadline:
            code = self.proc.poll()
            raise Failed(f"memory taker: expected {word!r}, got {line!r} (exit code {code})")

    def _command(self, expect: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._expect(expect, timeout=120)

    def take(self) -> None:
        if self.overrides is not None:
            self._write_free(self.args.simulate_gpu - self.args.take)
        else:
            self._command("allocated")

    def free(self) -> None:
        if self.overrides is not None:
            self._write_free(self.args.simulate_gpu)
        else:
            self._command("freed")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# --- the timeline ------------------------------------------------------------------------

@dataclass
class Row:
    t: float
    event: str
    free_now: float  # GiB, this process's reading right now
    sup_free: float | None  # GiB, the planner's reading at its last replan
    planned: int | None
    reason: str
    children: int | None


class Timeline:
    HEADER = (f"{'t_s':>7}  {'event':<10} {'free_now_GiB':>12} {'plan_free_GiB':>13} "
              f"{'planned':>7}  {'children':>8}  reason")

    def __init__(self, path: Path | None) -> None:
        self.rows: list[Row] = []
        self.lines: list[str] = []
        self.path = path
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, file=sys.stderr, flush=True)

    def add(self, row: Row, force: bool = False) -> None:
        last = self.rows[-1] if self.rows else None
        changed = last is None or force or (
            (row.planned, row.reason, row.children) != (last.planned, last.reason,
                                                        last.children)
            or abs(row.free_now - last.free_now) >= 0.5
            or (row.sup_free is not None and last.sup_free is not None
                and abs(row.sup_free - last.sup_free) >= 0.5))
        if not changed:
            return
        self.rows.append(row)
        sup_free = "-" if row.sup_free is None else f"{row.sup_free:.1f}"
        planned = "-" if row.planned is None else str(row.planned)
        children = "-" if row.children is None else str(row.children)
        self.say(f"{row.t:7.2f}  {row.event:<10} {row.free_now:12.1f} {sup_free:>13} "
                 f"{planned:>7}  {children:>8}  {row.reason}")

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


@dataclass
class PlanType:
    """What the planner reads of a type (the Protocol in supervisor_app.planner)."""

    @dataclass
    class Processes:
        min: int
        max: int

    processes: Processes
    concurrency: int
    memory_per_job: int
    gpu_memory_per_job: int
    priority: int
    cpus_per_process: float = 0.0


def _gib(n: int) -> float:
    return n / GIB


def _free_now() -> tuple[float, str]:
    r = read_capacity()
    name = ", ".join(g.name for g in r.gpus) or "no GPU"
    return _gib(r.gpu_free), name


# --- the two ways to run the planner -------------------------------------------------------

Sampler = Callable[[], tuple[float | None, int | None, str, int | None]]


def run_phases(args: argparse.Namespace, timeline: Timeline, taker: Taker,
               sample: Sampler) -> dict[str, float]:
    """before → take → hold → free → after, sampling all along; returns event times."""
    marks: dict[str, float] = {}

    def record(event: str, force: bool = False) -> None:
        sup_free, planned, reason, children = sample()
        free_now, _ = _free_now()
        timeline.add(Row(timeline.now(), event, free_now, sup_free, planned, reason,
                         children), force=force)

    def sample_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            record("")
            time.sleep(args.sample)

    timeline.t0, timeline.wall0 = time.monotonic(), time.time()  # t = 0: the first sample
    record("start", force=True)
    sample_for(args.before)
    marks["take"] = timeline.now()
    progress(f"taking {_gib(args.take):g} GiB")
    taker.take()
    marks["taken"] = timeline.now()
    record("taken", force=True)
    sample_for(args.hold)
    marks["free"] = timeline.now()
    progress("freeing it")
    taker.free()
    marks["freed"] = timeline.now()
    record("freed", force=True)
    sample_for(args.after)
    record("end", force=True)
    return marks


def planner_mode(args: argparse.Namespace, timeline: Timeline, taker: Taker) -> dict[str, Any]:
    types = {TYPE: PlanType(PlanType.Processes(0, args.max), 1, 16 << 20, args.per_job, 10)}
    planner = Planner(reserve_memory=512 << 20, reserve_gpu_memory=args.reserve)
    state: dict[str, Any] = {"next": 0.0, "plan": None, "free": None}
    changes: list[tuple[float, int, str]] = []

    def sample() -> tuple[float | None, int | None, str, int | None]:
        if time.monotonic() >= state["next"]:
            readings = read_capacity()
            entry: PlanEntry = planner.replan(types, readings, {}, 0)[TYPE]
            if state["plan"] is None or entry.processes != state["plan"].processes:
                changes.append((timeline.now(), entry.processes, entry.reason))
            state.update(plan=entry, free=_gib(readings.gpu_free),
                         next=time.monotonic() + args.replan)
        entry = state["plan"]
        return state["free"], entry.processes, entry.reason, None

    marks = run_phases(args, timeline, taker, sample)
    return {"marks": marks, "changes": changes}


def supervisor_mode(args: argparse.Namespace, timeline: Timeline, taker: Taker,
                    workdir: Path, env_extra: dict[str, str]) -> dict[str, Any]:
    from benchmarks._common import bench_database
    from benchmarks.supervisor_handlers import config_with, parse_ts, supervisor

    types = {TYPE: {"handler": "workers.core.builtin:noop",
                    "processes": {"min": 0, "max": args.max}, "concurrency": 1,
                    "memory_per_job": "16MiB", "gpu_memory_per_job": args.per_job,
                    "priority": 10, "timeout": "30s"}}
    cfg = config_with(types, replan=f"{args.replan:g}s",
                      reserve={"gpu_memory": args.reserve})
    env = dict(env_extra, JOBVISOR_LOG_LEVEL="DEBUG")
    with bench_database() as db, supervisor(db.dsn, cfg, workdir, env) as sup:
        progress(f"PostgreSQL {db.server_version}; waiting for the first plan")

        def first_plan() -> bool:
            sup.check_alive()
            v = sup.view() or {}
            return TYPE in (v.get("plan") or {})
        deadline = time.monotonic() + 60
        while not first_plan():
            if time.monotonic() > deadline:
                raise Failed("no plan published within 60 s")
            time.sleep(0.2)

        def sample() -> tuple[float | None, int | None, str, int | None]:
            sup.check_alive()
            v = sup.view() or {}
            plan = (v.get("plan") or {}).get(TYPE) or {}
            gpus = (v.get("readings") or {}).get("gpus") or []
            free = _gib(sum(g["free_bytes"] for g in gpus)) if gpus else None
            alive = sum(1 for w in v.get("workers", []) if w["job_type"] == TYPE and w["pid"]
                        and w["state"] in ("starting", "running"))
            return free, plan.get("processes"), str(plan.get("reason", "")), alive

        marks = run_phases(args, timeline, taker, sample)
        changes = []
        for line in sup.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            event = str(rec.get("event", "")) if isinstance(rec, dict) else ""
            if event.startswith(f"plan {TYPE}:"):
                t = parse_ts(rec["ts"]) - timeline.wall0
                _, _, rest = event.partition(":")
                before_after, _, reason = rest.strip().partition(" (")
                after = int(before_after.split("->")[1])
                changes.append((round(t, 2), after, reason.rstrip(")")))
        started = len(sup.events("child_started"))
        return {"marks": marks, "changes": changes, "children_started": started,
                "postgres": db.server_version}


def _first(changes: list[tuple[float, int, str]], after: float,
           test: Callable[[int], bool]) -> float | None:
    for t, processes, _ in changes:
        if t >= after and test(processes):
            return t
    return None


def main() -> int:
    args = _parser().parse_args()
    timeline = Timeline(args.timeline)
    with tempfile.TemporaryDirectory(prefix="jv-gpu-") as tmp:
        overrides = None
        env_extra: dict[str, str] = {}
        if args.simulate_gpu is not None:
            overrides = Path(tmp) / "capacity.json"
            os.environ[ENV_OVERRIDES] = str(overrides)
            env_extra[ENV_OVERRIDES] = str(overrides)
        taker = Taker(args, overrides)
        try:
            taker.start()
            free, gpu_name = _free_now()
            if gpu_name == "no GPU":
                raise Failed("no GPU reading (NVML unavailable); use --simulate-gpu")
            timeline.say(f"# mode {args.mode}; GPU {gpu_name}; free {free:.1f} GiB at start; "
                         f"type {TYPE}: gpu_memory_per_job {_gib(args.per_job):g} GiB x "
                         f"concurrency 1, processes 0..{args.max}; reserve "
                         f"{_gib(args.reserve):g} GiB; replan {args.replan:g}s; taking "
                         f"{_gib(args.take):g} GiB"
                         + (" (simulated)" if overrides else " (torch, second process)"))
            timeline.say("# free_now: this script's reading at the sample; plan_free: the "
                         "planner's reading at its last replan")
            timeline.say(Timeline.HEADER)
            if args.mode == "planner":
                result = planner_mode(args, timeline, taker)
            else:
                result = supervisor_mode(args, timeline, taker, Path(tmp) / "sup", env_extra)
        except Failed as exc:
            print(f"benchmark: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - database or start-up trouble: say which
            if type(exc).__name__ in ("BenchFailed", "DatabaseUnavailable"):
                print(f"benchmark: {exc}", file=sys.stderr)
                return 2 if type(exc).__name__ == "DatabaseUnavailable" else 1
            raise
        finally:
            taker.stop()
    changes: list[tuple[float, int, str]] = result["changes"]
    marks = result["marks"]
    timeline.say("# applied plan changes (t_s, processes, reason)"
                 + (" from the supervisor's planner log" if args.mode == "supervisor" else ""))
    for t, processes, reason in changes:
        timeline.say(f"#   {t:7.2f}  {processes}  {reason}")
    before = next((p for t, p, _ in reversed(changes) if t < marks["take"]), None)
    if before is None and changes:
        before = changes[0][1]
    low = min((p for t, p, _ in changes if marks["take"] <= t < marks["free"] + 0.5),
              default=before)
    shrink_at = _first(changes, marks["take"], lambda p: p < (before or 0))
    grow_at = _first(changes, marks["free"], lambda p: p >= (before or 0))
    pending = [r.reason for r in timeline.rows if r.reason.startswith("growth to")]
    timeline.write()
    figures = {
        "mode": args.mode,
        "simulated": overrides is not None,
        "taken_gib": round(_gib(args.take), 1),
        "processes_before": before,
        "processes_while_taken": low,
        "processes_after": changes[-1][1] if changes else None,
        "shrink_s": None if shrink_at is None else round(shrink_at - marks["taken"], 2),
        "grow_back_s": None if grow_at is None else round(grow_at - marks["freed"], 2),
        "pending_reasons_seen": sorted(set(pending)),
        "replan_s": args.replan,
    }
    if "postgres" in result:
        figures["postgres"] = result["postgres"]
        figures["children_started"] = result["children_started"]
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
