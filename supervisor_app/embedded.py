"""The embedded PostgreSQL (pgserver) used when no DATABASE_URL is given.

Data lives under `.jobvisor/pgdata` and is kept between runs. pgserver shares one
server between the processes that ask for it and stops it when the last one exits,
so `jobvisor enqueue` next to a running `jobvisor run` reuses the same server.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("jobvisor.embedded")

DEFAULT_HOME = Path(".jobvisor")


def home() -> Path:
    return Path(os.environ.get("JOBVISOR_HOME", DEFAULT_HOME)).resolve()


def start(data_dir: Path | None = None, *, keep_running: bool = False) -> str:
    """Start (or attach to) the embedded server and return its DSN."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
        warnings.simplefilter("ignore")
        import pgserver  # only needed without DATABASE_URL

    data_dir = (data_dir or home() / "pgdata").resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode=None if keep_running else "stop")
    uri = server.get_uri()
    log.info("embedded_postgres_ready", extra={"data_dir": str(data_dir)})
    return uri
