"""Which backup runs to keep, and listing them.

Layout: one directory per run, `<BACKUP_DIR>/<run_id>/{dump.pgdump,manifest.json}`,
so a run is removed as a whole and nothing else under BACKUP_DIR is ever touched:
only directories whose name is a run id are considered.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from workers.backup.manifest import (
    MANIFEST_NAME,
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_SUCCEEDED,
    Manifest,
    read_manifest,
)

log = logging.getLogger("jobvisor.backup")

# `20251125T030000123456Z-a1b2c3`: sorts by start time; the suffix keeps two runs
# started in the same microsecond (two supervisors) apart.
RUN_ID = re.compile(r"^(\d{8}T\d{12})Z-[0-9a-f]{6}$")
_RUN_ID_TIME = "%Y%m%dT%H%M%S%f"

# A run still "running" (or without a manifest) after this long crashed mid-way.
DEFAULT_STALE_AFTER_S = 24 * 3600.0
# Failed attempts newer than the newest good dump are kept (they show that backups
# are failing right now), but not without bound.
MAX_RECENT_FAILED = 30


@dataclass(frozen=True)
class _Run:
    path: Path
    started: datetime
    manifest: Manifest | None

    @property
    def status(self) -> str | None:
        return self.manifest.status if self.manifest else None

    @property
    def usable(self) -> bool:
        """A success whose dump is still there: only these count as backups."""
        if self.manifest is None or self.manifest.status != STATUS_SUCCEEDED:
            return False
        dump = self.manifest.dump_path
        return dump is not None and dump.is_file()


def new_run_id(now: datetime | None = None, suffix: str = "000000") -> str:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now.strftime(_RUN_ID_TIME)}Z-{suffix}"


def list_backups(backup_dir: Path | str) -> list[Manifest]:
    """Every run's manifest, newest first; runs without a readable manifest are skipped."""
    return [run.manifest for run in _scan(Path(backup_dir)) if run.manifest is not None]


def apply_retention(
    backup_dir: Path | str,
    keep_last: int | None,
    keep_days: float | None,
    now: datetime | None = None,
    *,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> list[Path]:
    """Delete runs the policy does not keep; return the removed run directories.

    A good dump is kept if any configured rule keeps it (among the newest `keep_last`,
    or younger than `keep_days`); with neither rule every good dump is kept. The newest
    good dump is never deleted. Failed attempts older than the newest good dump, and
    runs that crashed mid-way (`stale_after_s`), are removed.
    """
    backup_dir = Path(backup_dir)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    runs = _scan(backup_dir)  # newest first
    good = [r for r in runs if r.usable]
    doomed: list[_Run] = []

    if keep_last is not None or keep_days is not None:
        for index, run in enumerate(good):
            if index == 0:
                continue  # the newest good dump survives any policy
            by_count = keep_last is not None and index < keep_last
            by_age = keep_days is not None and now - run.started <= timedelta(days=keep_days)
            if not (by_count or by_age):
                doomed.append(run)

    newest_good = good[0].started if good else None
    recent_failed = 0
    for run in runs:
        if run.usable:
            continue
        if run.status in (None, STATUS_RUNNING):
            # Possibly another supervisor's backup in progress: only old ones crashed.
            if (now - run.started).total_seconds() > stale_after_s:
                doomed.append(run)
        elif newest_good is not None and run.started < newest_good:
            doomed.append(run)
        else:
            recent_failed += 1
            if recent_failed > MAX_RECENT_FAILED:
                doomed.append(run)
            else:
                _remove_leftovers(run)

    removed: list[Path] = []
    for run in doomed:
        try:
            shutil.rmtree(run.path)
        except OSError as exc:
            log.warning("backup_retention_remove_failed", extra={"run": run.path.name, "errno": exc.errno})
            continue
        removed.append(run.path)
        log.info("backup_retention_removed", extra={"run": run.path.name, "status": run.status})
    return removed


def _scan(backup_dir: Path) -> list[_Run]:
    try:
        entries = list(backup_dir.iterdir())
    except FileNotFoundError:
        return []
    runs: list[_Run] = []
    for entry in entries:
        match = RUN_ID.match(entry.name)
        # Symlinks are never ours: following one could delete something elsewhere.
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            manifest: Manifest | None = read_manifest(entry)
        except (OSError, ValueError, TypeError):
            manifest = None
        runs.append(_Run(entry, _started(match.group(1), manifest), manifest))
    runs.sort(key=lambda r: (r.started, r.path.name), reverse=True)
    return runs


def _started(stamp: str, manifest: Manifest | None) -> datetime:
    if manifest is not None:
        try:
            return datetime.fromisoformat(manifest.started_at).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return datetime.strptime(stamp, _RUN_ID_TIME).replace(tzinfo=UTC)


def _remove_leftovers(run: _Run) -> None:
    """A kept failed run keeps only its manifest: partial dumps are not backups."""
    if run.status != STATUS_FAILED:
        return
    for child in run.path.iterdir():
        if child.name == MANIFEST_NAME:
            continue
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        except OSError as exc:
            log.warning("backup_retention_remove_failed", extra={"run": run.path.name, "errno": exc.errno})
