"""The child's side of its status pipe to the supervisor: one JSON line per report.

The write end is non-blocking, so a slow reader never stalls the control loop (a report
that doesn't fit is skipped; the next carries on). A closed read end means the
supervisor is gone: `parent_gone` turns true and the runtime drains and exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class StatusPipe:
    fd: int | None
    parent_gone: bool = False

    @classmethod
    def from_env(cls) -> StatusPipe:
        value = os.environ.get("JOBVISOR_STATUS_FD")
        if not value:
            return cls(None)
        fd = int(value)
        os.set_blocking(fd, False)
        return cls(fd)

    def send(self, report: dict[str, Any]) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(report) + "\n").encode())
        except BlockingIOError:
            pass  # the supervisor is busy; the next report carries on
        except OSError:  # EPIPE: nobody reads any more
            self.fd = None
            self.parent_gone = True
