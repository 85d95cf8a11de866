"""The example as a jobvisor plug-in: what it brings, each part named by string, so that
declaring it imports nothing (registered in pyproject.toml under `jobvisor.plugins`).

This is the same mechanism jobvisor's own learning pipeline and backups use
(workers/learning/plugin.py, workers/backup/plugin.py); docs/job_types.md walks through it.
"""

from __future__ import annotations

from workers.core.plugins import Plugin

PLUGIN = Plugin(
    name="example",  # its migrations are recorded under this name
    # Job type -> handler. A type is declared once: not also as a `jobvisor.handlers`
    # entry point. (`example_checksum` is registered by its YAML `handler:` line instead.)
    handlers={"example_wordcount": "jobvisor_example.handlers:wordcount"},
    # NNN_name.sql files in the package's `sql/` folder, applied by `jobvisor migrate`
    # (and at `jobvisor run` start) after the core's.
    migrations="jobvisor_example:sql",
    # Adds `jobvisor example-totals`.
    commands="jobvisor_example.cli:register",
    # Adds `example_wordcount_jobs_total{outcome}` to the supervisor's /metrics.
    metrics="jobvisor_example.metrics:collect",
)
