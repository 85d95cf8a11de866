"""The operator dashboard's routes (pages, JSON API, actions) on the supervisor's port."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor


def route(sup: Supervisor, method: str, path: str, headers: Mapping[str, str], body: bytes,
          client: str) -> tuple[int, dict[str, str], bytes] | None:
    """Answer a request as (status, headers incl. Content-Type, body), or None: not ours."""
    return None
