"""One slot per child process: its state, how it is started, and how it is judged.

States: starting (spawned, not yet healthy for `healthy_after`), running, backoff
(died, waiting to restart), stopping (asked to drain), fatal (failed too often, fast:
health is degraded, and it still retries by itself with a long, capped backoff).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import psutil

from supervisor_app.config import Config, RestartConfig

log = logging.getLogger("jobvisor.children")

STATES = ("starting", "running", "backoff", "stopping", "fatal")
# Before its first heartbeat a child is importing and connecting, which on a loaded
# machine can take longer than a short heartbeat timeout.
START_GRACE = 30.0
EXIT_JOB_TIMEOUT = 3  # workers.core.runtime: a job overran; replace the child, no penalty
FATAL_MAX_BACKOFF = 300.0  # a slot failing past its quick-failure limit retries this often


@dataclass
class Slot:
    job_type: str
    index: int
    fingerprint: str
    state: str = "backoff"
    proc: subprocess.Popen | None = None
    status_fd: int | None = None
    buffer: bytes = b""
    started_at: float = 0.0
    last_seen: float = 0.0
    reported: bool = False  # has this child sent a heartbeat yet?
    restart_at: float = 0.0
    quick_failures: int = 0
    restarts: int = 0
    stop_deadline: float = 0.0
    retire: bool = False  # remove the slot once its child exited (scale down)
    inflight: int = 0
    rss: int = 0
    uss: int = 0
    cpu_seconds: float = 0.0
    last_exit: int | None = None
    # The lease owner id of the running child (host:pid:nonce, see workers.core.runtime).
    worker_id: str | None = None
    recycled: bool = False  # asked to drain because it went over its memory limit
    pending_exit: tuple[int, float] | None = None  # (exit code, ran s) awaiting its rescue
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def view(self, now: float) -> dict[str, Any]:
        return {
            "job_type": self.job_type, "slot": self.index, "pid": self.pid, "state": self.state,
            "rss_bytes": self.rss, "uss_bytes": self.uss, "cpu_seconds": round(self.cpu_seconds, 3),
            "inflight": self.inflight, "restarts": self.restarts,
            "uptime_s": round(now - self.started_at, 1) if self.proc else 0.0,
            "last_exit": self.last_exit, "quick_failures": self.quick_failures,
            "retry_in_s": (round(max(0.0, self.restart_at - now), 1)
                           if self.proc is None and self.state in ("backoff", "fatal")
                           and self.restart_at != math.inf else None),
        }


def worker_command(cfg: Config, job_type: str) -> list[str]:
    """Flags for `python -m workers`: settings only, never secrets (they're in env)."""
    t = cfg.types[job_type]
    cmd = [
        sys.executable, "-m", "workers", "--type", job_type,
        "--concurrency", str(t.concurrency), "--prefetch", str(t.prefetch),
        "--lease", f"{cfg.lease_for(job_type):g}", "--heartbeat", f"{cfg.queue.heartbeat:g}",
        "--poll", f"{cfg.queue.poll:g}", "--timeout", f"{t.timeout:g}",
        "--grace", f"{cfg.supervisor.grace:g}",
        "--max-attempts", str(t.retry.max_attempts), "--backoff", f"{t.retry.backoff:g}",
        "--max-backoff", f"{t.retry.max_backoff:g}",
        "--options", json.dumps(t.options, sort_keys=True, separators=(",", ":")),
        "--attempts-by-type", json.dumps(
            {name: other.retry.max_attempts for name, other in cfg.types.items()},
            sort_keys=True, separators=(",", ":")),
    ]
    if t.handler:
        cmd += ["--handler", t.handler]
    if t.global_concurrency:
        cmd += ["--global-concurrency", str(t.global_concurrency)]
    if t.fair_by:
        cmd.append("--fair")
    if t.max_running_per_key:
        cmd += ["--max-running-per-key", str(t.max_running_per_key)]
    if not cfg.queue.listen:
        cmd.append("--no-listen")
    if not t.keep_completed:
        cmd.append("--no-keep-completed")
    return cmd


def spawn(slot: Slot, cfg: Config, env: dict[str, str], now: float) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    # The child names itself host:pid:nonce; with the nonce we know that name too, so a
    # rescue at its death touches its leases only (not those of a same-pid process on
    # another host of the same name).
    nonce = secrets.token_hex(6)
    child_env = dict(env, JOBVISOR_STATUS_FD=str(write_fd),
                     JOBVISOR_SLOT=f"{slot.job_type}:{slot.index}",
                     JOBVISOR_WORKER_NONCE=nonce, JOBVISOR_PARENT_PID=str(os.getpid()))
    try:
        slot.proc = subprocess.Popen(
            worker_command(cfg, slot.job_type), env=child_env, pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            # Own process group: a terminal's Ctrl-C reaches only the supervisor, which
            # then drains the children itself.
            start_new_session=True,
        )
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    slot.status_fd = read_fd
    slot.worker_id = f"{socket.gethostname()}:{slot.proc.pid}:{nonce}"
    slot.recycled = False
    slot.buffer = b""
    slot.state = "starting"
    slot.started_at = slot.last_seen = now
    slot.reported = False
    slot.stop_deadline = 0.0
    slot.inflight = 0
    log.info("child_started", extra={"job_type": slot.job_type, "slot": slot.index,
                                     "child_pid": slot.proc.pid})


def read_status(slot: Slot, now: float) -> list[dict[str, Any]]:
    """Drain the child's status pipe; returns the reports it sent."""
    if slot.status_fd is None:
        return []
    chunks = []
    while True:
        try:
            data = os.read(slot.status_fd, 65536)
        except BlockingIOError:
            break
        except OSError:
            data = b""
        if not data:
            break
        chunks.append(data)
    if not chunks:
        return []
    slot.buffer += b"".join(chunks)
    *lines, slot.buffer = slot.buffer.split(b"\n")
    reports = []
    for line in lines:
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue
    if reports:
        slot.last_seen = now
        slot.reported = True
        slot.inflight = int(reports[-1].get("inflight", 0))
    return reports


def close_status(slot: Slot) -> None:
    if slot.status_fd is not None:
        os.close(slot.status_fd)
        slot.status_fd = None


def terminate(slot: Slot, now: float, grace: float, *, recycle: bool = False) -> None:
    """Ask the child to drain; it gets `grace` plus a margin before SIGKILL.

    `recycle` (over its memory limit) sends SIGUSR1: a job still running when the grace
    ends is then charged for it rather than put back for free.
    """
    if slot.proc is None or slot.state == "stopping":
        return
    slot.state = "stopping"
    slot.stop_deadline = now + grace + 5.0
    slot.recycled = recycle
    _signal(slot, signal.SIGUSR1 if recycle else signal.SIGTERM)


def kill(slot: Slot) -> None:
    _signal(slot, signal.SIGKILL)


def _signal(slot: Slot, sig: int) -> None:
    if slot.proc is not None and slot.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.proc.pid, sig)


def after_exit(slot: Slot, code: int, now: float, policy: RestartConfig, *,
               awaiting_rescue: bool = True) -> None:
    """A slot's child just exited: an expected exit restarts at once; a crash waits for
    the answer to its rescue (`settle_exit`), which says whether it held jobs."""
    ran = now - slot.started_at
    slot.proc = None
    slot.last_exit = code
    close_status(slot)
    slot.inflight = 0
    slot.rss = slot.uss = 0
    if slot.state == "stopping" or code in (0, EXIT_JOB_TIMEOUT):
        # Asked to stop, drained after a memory recycle, or handed over a stuck job:
        # expected exits, restarted (if still wanted) at once.
        slot.state = "backoff"
        slot.restart_at = now
        if code == EXIT_JOB_TIMEOUT:
            slot.restarts += 1
        return
    slot.restarts += 1
    slot.pending_exit = (code, ran)
    slot.state = "backoff"
    slot.restart_at = math.inf  # until settle_exit
    if not awaiting_rescue:
        settle_exit(slot, 0, now, policy)


def settle_exit(slot: Slot, held: int, now: float, policy: RestartConfig) -> None:
    """Decide when a crashed slot restarts, once its rescue said how many jobs it held.

    A crash while holding jobs is the jobs' fault — crash isolation in the queue charges
    the one that did it — so the slot restarts after the base backoff and the crash does
    not count as a quick failure. A crash holding nothing counts: consecutive quick
    failures back off exponentially (backoff·2^(n−1)) up to `max_backoff`; from
    `max_quick_failures` on the slot is "fatal" (health degraded) but still retries by
    itself after min(FATAL_MAX_BACKOFF, max(max_backoff, backoff·2^(n−1))). A run longer
    than `healthy_after` starts the count afresh.
    """
    if slot.pending_exit is None:
        return
    code, ran = slot.pending_exit
    slot.pending_exit = None
    if held:
        slot.state = "backoff"
        slot.restart_at = now + policy.backoff
        log.warning("child_died", extra={"job_type": slot.job_type, "slot": slot.index,
                                         "exit_code": code, "restart_in_s": policy.backoff,
                                         "ran_s": round(ran, 3), "jobs_held": held})
        return
    slot.quick_failures = 0 if ran >= policy.healthy_after else slot.quick_failures + 1
    # The exponent stops at 1000: every delay before FATAL is exact (max_quick_failures
    # <= 1000); past it, 2**1000 times even a 1 ms backoff is far over the cap and times
    # a 1 d one still a finite float. Uncapped, a slot failing for days overflowed at
    # its ~1,025th try (OverflowError in the loop).
    delay = policy.backoff * 2.0 ** min(max(0, slot.quick_failures - 1), 1000)
    if slot.quick_failures >= policy.max_quick_failures:
        delay = min(FATAL_MAX_BACKOFF, max(policy.max_backoff, delay))
        slot.state = "fatal"
        slot.restart_at = now + delay
        log.error("child_fatal", extra={"job_type": slot.job_type, "slot": slot.index,
                                        "exit_code": code, "failures": slot.quick_failures,
                                        "retry_in_s": round(delay, 3)})
        return
    delay = min(policy.max_backoff, delay)
    slot.state = "backoff"
    slot.restart_at = now + delay
    log.warning("child_died", extra={"job_type": slot.job_type, "slot": slot.index,
                                     "exit_code": code, "restart_in_s": round(delay, 3),
                                     "ran_s": round(ran, 3)})


def measure(slot: Slot, with_uss: bool) -> None:
    """RSS and CPU seconds of the child (USS too, which costs a read of smaps)."""
    if slot.proc is None:
        return
    try:
        p = psutil.Process(slot.proc.pid)
        with p.oneshot():
            slot.rss = p.memory_info().rss
            times = p.cpu_times()
            slot.cpu_seconds = times.user + times.system
        if with_uss:
            slot.uss = p.memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass

