"""Backups of the jobvisor database with `pg_dump`, for the `backup` job type.

`run_backup(BackupSettings.from_env())` writes `<BACKUP_DIR>/<run_id>/dump.pgdump` and
`manifest.json` beside it; see docs/backups.md.
"""

from workers.backup.dump import (
    BACKUP_CANCELLED,
    BACKUP_CONFIG_INVALID,
    BACKUP_DUMP_FAILED,
    BACKUP_SERVER_UNAVAILABLE,
    BACKUP_STORAGE_UNAVAILABLE,
    BACKUP_TIMEOUT,
    BACKUP_TOOL_MISSING,
    BACKUP_VERSION_MISMATCH,
    BackupConfigError,
    BackupSettings,
    backup_dir_from_env,
    find_pg_dump_candidates,
    run_backup,
    run_backup_or_raise,
)
from workers.backup.manifest import Manifest, sanitize_message
from workers.backup.retention import apply_retention, list_backups

__all__ = [
    "BACKUP_CANCELLED",
    "BACKUP_CONFIG_INVALID",
    "BACKUP_DUMP_FAILED",
    "BACKUP_SERVER_UNAVAILABLE",
    "BACKUP_STORAGE_UNAVAILABLE",
    "BACKUP_TIMEOUT",
    "BACKUP_TOOL_MISSING",
    "BACKUP_VERSION_MISMATCH",
    "BackupConfigError",
    "BackupSettings",
    "Manifest",
    "apply_retention",
    "backup_dir_from_env",
    "find_pg_dump_candidates",
    "list_backups",
    "run_backup",
    "run_backup_or_raise",
    "sanitize_message",
]
