"""The embedded PostgreSQL (pgserver) used when no database variable is set.

The core lives in workers.core.embedded, so a bare `python -m workers` can use it too
(workers never imports supervisor_app); this module keeps the supervisor's name for it.
Its lifetime (held by the processes using it, pinned by `jobvisor db start`) is
described there and in the README, "The embedded database".
"""

from __future__ import annotations

from workers.core.embedded import (
    DEFAULT_HOME,
    EmbeddedUnavailable,
    ServerHeld,
    Status,
    data_dir,
    home,
    psql_path,
    start,
    status,
    stop,
)

__all__ = ["DEFAULT_HOME", "EmbeddedUnavailable", "ServerHeld", "Status", "data_dir", "home",
           "psql_path", "start", "status", "stop"]
