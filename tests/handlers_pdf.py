"""The built-in `pdf` handler with a render a test holds up: `--handler
tests.handlers_pdf:gated` with JOBVISOR_TEST_RENDER_GATE=DIR in the worker's environment.

Each render touches `DIR/rendering` and waits (cancellable, bounded) until `DIR/go`
exists, then renders for real: the test decides how long the slow work lasts and
looks at the worker's connections meanwhile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workers import Job, JobContext
from workers.learning.handlers import pdf

_real_render = pdf._render
GATE_WAIT = 120.0  # seconds a render waits for the test at most


def _gated_render(data: bytes, mime_type: str, storage: Any, ctx: JobContext) -> Any:
    gate = Path(os.environ["JOBVISOR_TEST_RENDER_GATE"])
    (gate / "rendering").touch()
    deadline = time.monotonic() + GATE_WAIT
    while not (gate / "go").exists() and time.monotonic() < deadline:
        if ctx.sleep(0.02):
            break
    return _real_render(data, mime_type, storage, ctx)


pdf._render = _gated_render


def gated(job: Job, ctx: JobContext) -> dict[str, Any]:
    return pdf.handle(job, ctx)
