"""Handlers the benchmarks pass with `--handler benchmarks.handlers:NAME`."""

from __future__ import annotations

import time
from typing import Any

from workers import Job, JobContext


def stamp(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Record when the handler started (wall clock), as the job's result."""
    return {"t": time.time()}
