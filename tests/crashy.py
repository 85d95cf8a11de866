"""A handler module that imports fine in the supervisor but kills every child at start,
so a test can watch restart backoff turn into FATAL. With CRASHY_MARKER set, children die
only while that file exists (a broken dependency that gets fixed)."""

import os

_marker = os.environ.get("CRASHY_MARKER")
if os.environ.get("JOBVISOR_SLOT") and (_marker is None or os.path.exists(_marker)):
    os._exit(17)  # set only in children


def handle(job, ctx):  # pragma: no cover - never reached in a crashing child
    return None
