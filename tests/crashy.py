"""A handler module that imports fine in the supervisor but kills every child at start,
so a test can watch restart backoff turn into FATAL."""

import os

if os.environ.get("JOBVISOR_SLOT"):  # set only in children
    os._exit(17)


def handle(job, ctx):  # pragma: no cover - never reached in a child
    return None
