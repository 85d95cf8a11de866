"""Built-in types for tests and benchmarks: `noop`, `sleep` and `fail`."""

from __future__ import annotations

import math
from typing import Any

from workers import Job, JobContext, PayloadError, PermanentError, TransientError


def noop(job: Job, ctx: JobContext) -> None:
    return None


def sleep(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Sleep `seconds`, waking early when the job is cancelled."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    seconds = payload.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
        0 <= seconds < math.inf
    ):
        raise PayloadError(f"sleep: 'seconds' must be a non-negative number, got {seconds!r}")
    if ctx.sleep(float(seconds)):
        ctx.check_cancelled()
    return {"slept": seconds}


def fail(job: Job, ctx: JobContext) -> None:
    """Fail as the payload says: `{"kind": "transient"|"permanent"|"crash", "times": n}`;
    after `times` failing attempts (default: always) the job succeeds."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    times = payload.get("times")
    if times is not None and job.attempt > int(times):
        return None
    kind = payload.get("kind", "transient")
    if kind == "transient":
        raise TransientError("fail_transient", f"attempt {job.attempt}")
    if kind == "permanent":
        raise PermanentError("fail_permanent", f"attempt {job.attempt}")
    raise RuntimeError(f"unexpected crash on attempt {job.attempt}")
