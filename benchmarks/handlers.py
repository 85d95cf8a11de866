"""Handlers the benchmarks pass with `--handler benchmarks.handlers:NAME`."""

from __future__ import annotations

import time
from typing import Any

from workers import Job, JobContext


def stamp(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Record when the handler started (wall clock), as the job's result."""
    return {"t": time.time()}


def model_call(job: Job, ctx: JobContext) -> dict[str, Any]:
    """One `/api/chat` request to payload["base_url"] through the real client, and so
    through the model gate (workers/core/model_gate.py)."""
    from workers.learning.ai import ollama

    text = ollama.chat(job.payload["base_url"], job.payload["model"],
                       [{"role": "user", "content": f"job {job.id}"}], timeout=(5.0, 120.0))
    return {"chars": len(text)}
