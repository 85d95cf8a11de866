"""What an idle supervisor costs: its CPU (% of one core), its RSS, and the RSS of one
child per job type (target: idle supervisor ≤ 1 % of a core).

A real `jobvisor run` with the types of the shipped config (or `--config`), each at
exactly one process (`processes: {min: 1, max: 1}`), cron schedules removed so that
nothing is enqueued. A type whose handler does not import (checked in a subprocess
first) is left out and named in `failed_types`, since one such type stops the whole
supervisor at start. Once every child has been up for `restart.healthy_after` plus
`--settle`, the supervisor's user+system CPU time is read over `--idle` seconds.

    python -m benchmarks.supervisor_overhead [--idle 30] [--settle 5]
        [--config config/jobvisor.yaml] [--types pdf,vision,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks._common import (
    REPO,
    BenchFailed,
    bench_database,
    emit,
    main_guard,
    progress,
    wait_until,
)
from benchmarks.supervisor_handlers import SHIPPED_CONFIG, config_with, load_yaml, supervisor
from supervisor_app.units import parse_duration

TARGET_CPU_PCT = 1.0
MIB = 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.supervisor_overhead",
                                description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=float, default=30.0, help="seconds measured (default 30)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds waited after every child is running, before measuring")
    p.add_argument("--config", type=Path, default=SHIPPED_CONFIG,
                   help="types and settings from this file (default: shipped)")
    p.add_argument("--types", default="", help="only these types (comma-separated)")
    p.add_argument("--timeout", type=float, default=90.0, help="bound of the start-up wait")
    return p


def handler_import_error(name: str, handler: str | None) -> str | None:
    """None if `name`'s handler imports in a fresh interpreter, else the error's last line."""
    code = ("import sys\nfrom workers.core.registry import load\n"
            "load(sys.argv[1], sys.argv[2] or None)\n")
    proc = subprocess.run([sys.executable, "-c", code, name, handler or ""], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _memory(p: psutil.Process) -> tuple[int, int]:
    full = p.memory_full_info()
    return int(full.rss), int(full.uss)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def main() -> int:
    args = _parser().parse_args()

    def body() -> None:
        shipped = load_yaml(args.config)
        types: dict[str, Any] = dict(shipped.get("types") or {})
        if args.types:
            wanted = [t.strip() for t in args.types.split(",") if t.strip()]
            missing = [t for t in wanted if t not in types]
            if missing:
                raise BenchFailed(f"--types: not in {args.config}: {', '.join(missing)}")
            types = {t: types[t] for t in wanted}
        failed: dict[str, str] = {}
        chosen: dict[str, Any] = {}
        for name, t in types.items():
            error = handler_import_error(name, (t or {}).get("handler"))
            if error:
                progress(f"type {name}: handler does not import: {error}")
                failed[name] = f"handler import: {error}"
                continue
            t = dict(t or {})
            t["processes"] = {"min": 1, "max": 1}
            t.pop("schedule", None)
            chosen[name] = t
        if not chosen:
            raise BenchFailed("no type's handler imports")
        cfg = config_with(chosen, args.config)
        healthy_after = parse_duration(cfg["supervisor"].get("restart", {})
                                       .get("healthy_after", "10s"))
        replan = parse_duration(cfg["supervisor"].get("replan", "5s"))
        progress(f"types {', '.join(chosen)}; replan {replan:g}s; "
                 f"healthy_after {healthy_after:g}s")
        with bench_database() as db, tempfile.TemporaryDirectory(prefix="jv-idle-") as tmp, \
                supervisor(db.dsn, cfg, Path(tmp)) as sup:

            def settled() -> list[dict[str, Any]] | None:
                sup.check_alive()
                workers = sup.workers()
                states = {w["job_type"]: w["state"] for w in workers}
                view = sup.view() or {"workers": []}
                for w in view["workers"]:
                    states.setdefault(w["job_type"], w["state"])
                if all(states.get(n) in ("running", "fatal") for n in chosen):
                    return workers
                return None

            workers = wait_until(settled, timeout=healthy_after + args.timeout,
                                 what="every child running (or fatal)", interval=0.2)
            view = sup.view() or {"workers": []}
            for w in view["workers"]:
                if w["state"] != "running" or w["restarts"]:
                    failed[w["job_type"]] = (f"child state {w['state']}, restarts "
                                             f"{w['restarts']}, last exit {w['last_exit']}")
            progress(f"children up; settling {args.settle:g}s, then measuring "
                     f"{args.idle:g}s idle")
            time.sleep(args.settle)
            workers = [w for w in sup.workers(state="running")]
            sup_proc = psutil.Process(sup.pid)
            kids = {w["job_type"]: psutil.Process(w["pid"]) for w in workers}
            rss_before, _ = _memory(sup_proc)
            c0 = _cpu(sup_proc)
            k0 = {n: _cpu(p) for n, p in kids.items()}
            w0 = time.monotonic()
            time.sleep(args.idle)
            c1 = _cpu(sup_proc)
            k1 = {n: _cpu(p) for n, p in kids.items()}
            wall = time.monotonic() - w0
            rss, uss = _memory(sup_proc)
            sup.check_alive()
            children: dict[str, Any] = {}
            for name, p in sorted(kids.items()):
                crss, cuss = _memory(p)
                children[name] = {"rss_mib": _mib(crss), "uss_mib": _mib(cuss),
                                  "cpu_pct": round(100 * (k1[name] - k0[name]) / wall, 2)}
            cpu_pct = 100 * (c1 - c0) / wall
            progress(f"supervisor: {cpu_pct:.2f}% of a core, RSS {_mib(rss)} MiB "
                     f"(USS {_mib(uss)} MiB); children: {children}")
            emit({
                "idle_s": round(wall, 1),
                "supervisor_cpu_pct": round(cpu_pct, 2),
                "supervisor_cpu_s": round(c1 - c0, 3),
                "supervisor_rss_mib": _mib(rss),
                "supervisor_uss_mib": _mib(uss),
                "supervisor_rss_start_mib": _mib(rss_before),
                "children": children,
                "children_rss_total_mib": round(sum(c["rss_mib"] for c in children.values()),
                                                1),
                "failed_types": failed,
                "replan_s": replan,
                "postgres": db.server_version,
                "target_cpu_pct": TARGET_CPU_PCT,
                "target_met": cpu_pct <= TARGET_CPU_PCT,
            })

    return main_guard(body)


if __name__ == "__main__":
    raise SystemExit(main())
