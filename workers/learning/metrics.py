"""The metrics the learning platform already alerts on. They predate the plug-in split and
keep their meaning: they count every type this supervisor runs (a `phase` is a job type),
so the platform's alerts see backups and webhooks fail too."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from workers.core.plugins import MetricsView


def collect(view: MetricsView) -> Iterator[Metric]:
    inflight = GaugeMetricFamily("analysis_jobs_inflight",
                                 "Jobs being processed right now, all children")
    inflight.add_metric([], sum(view.inflight.values()))
    yield inflight

    retry = CounterMetricFamily("ai_worker_retry", "Retried attempts by phase (job type)",
                                labels=["phase"])
    failed = CounterMetricFamily("ai_worker_failed", "Jobs failed for good, by error code",
                                 labels=["error_code"])
    per_phase: dict[str, float] = {}
    per_code: dict[str, float] = {}
    for (job_type, outcome, code), n in view.outcomes.items():
        if outcome in ("retried", "timeout"):
            per_phase[job_type] = per_phase.get(job_type, 0) + n
        if outcome == "failed":
            per_code[code or "unknown"] = per_code.get(code or "unknown", 0) + n
    for phase, n in sorted(per_phase.items()):
        retry.add_metric([phase], n)
    for code, n in sorted(per_code.items()):
        failed.add_metric([code], n)
    yield retry
    yield failed
