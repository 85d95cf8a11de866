"""Whose data a learning job touches: the subject row-level security isolates it by."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SETTING = "app.current_sub"


def owner(payload: Any) -> str:
    """The submission owner a job's payload names ('' when none)."""
    if isinstance(payload, dict):
        return str(payload.get("owner_sub") or payload.get("owner") or "")
    return ""


def job_settings(job: Any) -> Mapping[str, str]:
    """Set in every transaction of the job: the policies on learning_submissions read it."""
    return {SETTING: owner(job.payload)}
