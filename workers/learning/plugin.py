"""The learning pipeline as a jobvisor plug-in: what it brings, named by string so that
declaring it imports nothing (registered in pyproject.toml under `jobvisor.plugins`)."""

from __future__ import annotations

from workers.core.plugins import Plugin

TYPES = ("pdf", "vision", "feedback")

PLUGIN = Plugin(
    name="learning",
    handlers={
        "pdf": "workers.learning.handlers.pdf:handle",
        "vision": "workers.learning.handlers.vision:handle",
        "feedback": "workers.learning.handlers.feedback:handle",
    },
    migrations="workers.learning:sql",
    # Databases from before the plug-in split recorded these as core migrations.
    adopts={"003_learning": 1, "008_clock_times": 2},
    commands="workers.learning.cli:register",
    metrics="workers.learning.metrics:collect",
    job_settings="workers.learning.subject:job_settings",
    outcomes="workers.learning.outcomes:record",
    probes={"/internal/health/learning-worker": "workers.learning.health:probe"},
)
